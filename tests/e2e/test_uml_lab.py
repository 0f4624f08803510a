"""A lab with user-mode-linux nodes: 1 host-namespace node and 2 UML guests with IPVS.

``svcproxy lab up --nodes 3 --ipvs-nodes 2`` makes node-1 a network namespace
(no IPVS) and node-2, node-3 UML guests. The tests check that the guests are
Ready Nodes running Pods, that their kernel has IPVS with every scheduler, that
an IPVS virtual service programmed with pyroute2 inside node-2 (NAT) carries
traffic from node-2's client namespace to Pods on node-1 and node-3, and that
``svcproxy lab down`` leaves no guest, tap, namespace or route behind.

One lab runs per machine (fixed addresses), so this module brings up its own
lab in its own state folder. If the e2e suite's own lab (the session fixture's,
``SVCPROXY_E2E_STATE_DIR``) runs, the module borrows the machine: takes that lab
down and brings it back afterwards with the same layout. Any other lab makes
the module fail with the lab's own message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from svcproxy_lab import network
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import LabContext
from svcproxy_lab.uml import (
    UmlNode,
    kernel_dir,
    kernel_paths,
    kernel_schedulers,
    probed_schedulers,
    scheduler_probe,
)

pytestmark = [
    pytest.mark.uml,
    pytest.mark.lab,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

STATE = Path(os.environ.get("SVCPROXY_E2E_UML_STATE_DIR", "/tmp/svcproxy-e2e-uml-lab"))
PY = sys.executable
VIP = "10.96.250.1"
SCHEDULERS = {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf"}

PROGRAM = r"""
import socket, sys
from pyroute2 import IPVS, IPVSDest, IPVSService
vip, backends = sys.argv[1], sys.argv[2:]
ipvs = IPVS()
svc = IPVSService(addr=vip, port=80, protocol=socket.IPPROTO_TCP, sched_name="rr",
                  flags={"flags": 0, "mask": 0xFFFF}, timeout=0, netmask="255.255.255.255")
ipvs.service("add", service=svc)
for ip in backends:
    # fwd_method 0 = NAT; pyroute2's default (3) is direct routing.
    ipvs.dest("add", service=svc, dest=IPVSDest(addr=ip, port=8080, fwd_method=0, weight=1))
ipvs.close()
"""

CLIENT = r"""
import socket, sys
for _ in range(int(sys.argv[2])):
    c = socket.create_connection((sys.argv[1], 80), timeout=5)
    c.sendall(b"hello\n")
    print(c.makefile().readline().strip(), flush=True)
    c.close()
"""


SUITE_STATE = Path(os.environ.get("SVCPROXY_E2E_STATE_DIR", "/tmp/svcproxy-e2e-lab"))


def cli(*args: str, timeout: float = 900, state: Path = STATE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "svcproxy.cli", "lab", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def borrow_suite_lab() -> list[str] | None:
    """Take the e2e suite's lab down if it runs; return the `lab up` args to restore it."""
    suite = LabCluster(SUITE_STATE)
    state = suite.load()
    if state is None or not suite.alive():
        return None
    kinds = [n["kind"] for n in state["nodes"]]
    args = ["up", "--nodes", str(len(kinds)), "--ipvs-nodes", str(kinds.count("uml"))]
    if not state.get("svcproxy"):
        args.append("--no-svcproxy")
    proc = cli("down", state=SUITE_STATE, timeout=300)
    assert proc.returncode == 0, f"could not take the suite's lab down: {proc.stderr}"
    return args


def wait_for(what: str, check: Any, timeout: float = 120) -> Any:
    return wait_until(what, check, timeout)


class UmlLab:
    def __init__(self) -> None:
        self.cluster = LabCluster(STATE)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        state = self.cluster.load()
        assert state is not None
        proc = subprocess.run(
            [str(Path(state["bin_dir"]) / "kubectl"), "--kubeconfig",
             str(self.cluster.admin_kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, f"kubectl {args}: {proc.stderr}"
        return proc.stdout

    def node(self, index: int) -> UmlNode:
        state = self.cluster.load()
        assert state is not None
        node = UmlNode(index, self.cluster.context(state))
        assert node.guest.is_running(), f"guest of node-{index} is not running"
        return node


@pytest.fixture(scope="module")
def uml_lab() -> Iterator[UmlLab]:
    restore = borrow_suite_lab()
    try:
        proc = cli("up", "--nodes", "3", "--ipvs-nodes", "2", "--no-svcproxy")
        assert proc.returncode == 0, f"lab up failed:\n{proc.stderr[-4000:]}"
        yield UmlLab()
    finally:
        cli("down", timeout=300)
        if restore is not None:
            back = cli(*restore, state=SUITE_STATE)
            assert back.returncode == 0, f"could not restore the suite's lab: {back.stderr}"


def run_ok(node: UmlNode, argv: list[str], timeout: float = 60) -> str:
    proc = node.run(argv, timeout=timeout)
    assert proc.returncode == 0, f"{argv} on {node.name}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def test_uml_nodes_are_ready_and_labelled(uml_lab: UmlLab) -> None:
    nodes = json.loads(uml_lab.kubectl("get", "nodes", "-o", "json"))["items"]
    ipvs = {n["metadata"]["name"]: n["metadata"]["labels"].get("svcproxy.io/lab-ipvs")
            for n in nodes}
    assert ipvs == {"node-1": "false", "node-2": "true", "node-3": "true"}
    for n in nodes:
        ready = [c for c in n["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", n["metadata"]["name"]
    # The guests run the UML kernel (its modules folder is named after its
    # release), not the host's.
    _, modules = kernel_paths(kernel_dir())
    release = run_ok(uml_lab.node(2), ["uname", "-r"]).strip()
    assert [p.name for p in modules.iterdir()] == [release] != [os.uname().release]
    assert run_ok(uml_lab.node(2), ["ip", "route", "show", "default"]) == ""


def test_uml_node_loads_ip_vs_and_every_scheduler(uml_lab: UmlLab) -> None:
    node = uml_lab.node(2)
    _, modules = kernel_paths(kernel_dir())
    present = kernel_schedulers(modules)
    assert present >= SCHEDULERS
    table = run_ok(node, ["sh", "-c", scheduler_probe(sorted(present))])
    assert probed_schedulers(table) == present, table


def pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "uml-echo"}},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "echo", "image": "svcproxy.io/echo",
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
            }],
        },
    }


def test_ipvs_in_a_guest_carries_traffic_to_pods_on_two_other_nodes(uml_lab: UmlLab) -> None:
    ns = "uml-e2e"
    uml_lab.kubectl("create", "namespace", ns)
    try:
        items = [pod("echo-on-1", "node-1"), pod("echo-on-3", "node-3")]
        uml_lab.kubectl("apply", "-n", ns, "-f", "-",
                        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

        def ready_ips() -> dict[str, str] | None:
            pods = json.loads(uml_lab.kubectl("get", "pods", "-n", ns, "-o", "json"))["items"]
            ips = {}
            for p in pods:
                conds = p.get("status", {}).get("conditions") or []
                if any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    ips[p["metadata"]["name"]] = p["status"]["podIP"]
            return ips if len(ips) == 2 else None

        ips = wait_for("both echo Pods Ready", ready_ips)
        assert ips["echo-on-1"].startswith("10.244.1.") and ips["echo-on-3"].startswith("10.244.3.")
        node = uml_lab.node(2)
        run_ok(node, ["sh", "-ec", f"ip link add svcproxy0 type dummy 2>/dev/null || true\n"
                                   f"ip addr replace {VIP}/32 dev svcproxy0\n"
                                   "ip link set svcproxy0 up\n"])
        run_ok(node, [PY, "-c", PROGRAM, VIP, *sorted(ips.values())], timeout=120)
        proc = node.run_client([PY, "-c", CLIENT, VIP, "4"], timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        client = network.client_address(2)
        answers = sorted(line.split()[0] for line in proc.stdout.decode().splitlines())
        assert answers == ["echo-on-1"] * 2 + ["echo-on-3"] * 2, proc.stdout
        # The Pods saw the client's own address: IPVS NAT, no SNAT on the way.
        assert all(f" {client}:" in line for line in proc.stdout.decode().splitlines())
        table = run_ok(node, ["ipvsadm", "-Ln"])
        assert re.search(rf"TCP\s+{VIP}:80 rr", table), table
        for ip in ips.values():
            assert re.search(rf"-> {re.escape(ip)}:8080\s+Masq\s+1\s", table), table
    finally:
        uml_lab.kubectl("delete", "namespace", ns, "--wait=false")


def test_lab_down_leaves_no_guest_tap_namespace_or_route(uml_lab: UmlLab) -> None:
    state = uml_lab.cluster.load()
    assert state is not None
    ctx: LabContext = uml_lab.cluster.context(state)
    umids = [UmlNode(i, ctx).guest.umid for i in (2, 3)]
    proc = cli("down", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert cli("down", timeout=300).returncode == 0  # twice is fine
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert not [line for line in ps.splitlines() if any(f"umid={u}" in line for u in umids)]
    assert network.leftovers() == []
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert "svcp-n2" not in links and "svcp-n3" not in links
    assert not any(Path("/run/svcproxy-uml", u).exists() for u in umids)
    # The guests' folder mounts were inside the guests; nothing on the host mounts them.
    assert str(STATE) not in Path("/proc/mounts").read_text()
