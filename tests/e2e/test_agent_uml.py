"""The agent in ipvs mode inside user-mode-linux nodes (a real IPVS kernel).

Brings up its own lab (``--nodes 3 --ipvs-nodes 2 --no-svcproxy``: node-1 a
netns node without IPVS, node-2 and node-3 UML guests), applies the CRDs and
starts the agent on node-1 and node-2 itself. A hand-written ipvs
ProxyVirtualServer points at echo Pods on node-1 and node-3. Checked with
real traffic from node-2's client namespace inside the guest and read back
with ``ipvsadm -Ln``: round robin over both Pods, a foreign IPVS service
survives the agent's syncs, kill -9 and restart under steady traffic loses no
request and leaves the IPVS table as it was; node-1 serves the same program
through the iptables fallback and says so in its ProxyNode.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from waiting import wait_until

from svcproxy_lab import traffic
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import LabNode

pytestmark = [
    pytest.mark.uml,
    pytest.mark.lab,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
]

REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("SVCPROXY_E2E_AGENT_UML_STATE_DIR", "/tmp/svcproxy-e2e-agent-uml"))
PY = sys.executable
NS = "agent-uml"
FOREIGN = "10.96.250.250"

CLIENT = r"""
import socket, sys, time
ok = failed = 0
end = time.monotonic() + float(sys.argv[2])
seen = []
while time.monotonic() < end or ok + failed < int(sys.argv[3]):
    try:
        c = socket.create_connection((sys.argv[1], 80), timeout=3)
        c.sendall(b"hello\n")
        seen.append(c.makefile().readline().split()[0])
        c.close()
        ok += 1
    except OSError as err:
        failed += 1
        print("FAIL", err, file=sys.stderr, flush=True)
    if float(sys.argv[2]) > 0:
        time.sleep(0.02)
print(ok, failed, " ".join(seen))
"""


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "svcproxy.cli", "lab", *args, "--state-dir", str(STATE)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(what: str, check: Any, timeout: float = 120) -> Any:
    return wait_until(what, check, timeout)


class AgentLab:
    def __init__(self) -> None:
        self.cluster = LabCluster(STATE)
        state = self.cluster.load()
        assert state is not None
        self.kubectl_bin = str(Path(state["bin_dir"]) / "kubectl")
        self.nodes = {n.name: n for n in self.cluster.nodes(state)}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.cluster.admin_kubeconfig),
                               *args], input=input, capture_output=True, text=True, timeout=120,
                              check=False)
        if check:
            assert proc.returncode == 0, f"kubectl {args}: {proc.stderr}"
        return proc.stdout

    def agent_argv(self, node: LabNode, *extra: str) -> list[str]:
        kubeconfig = STATE / "pki" / "admin-node.kubeconfig"
        return [PY, "-m", "svcproxy.cli", "agent", "--kubeconfig", str(kubeconfig),
                "--node-name", node.name, *(extra or ("--full-sync-interval", "5"))]

    def status(self, node: str) -> dict[str, Any]:
        out = self.kubectl("get", "proxynode", node, "-o", "json", check=False)
        return dict(json.loads(out).get("status") or {}) if out else {}


@pytest.fixture(scope="module")
def alab(lab_slot: None) -> Iterator[AgentLab]:
    refused = False  # another lab holds the machine's slot: nothing here to take down
    try:
        proc = cli("up", "--nodes", "3", "--ipvs-nodes", "2", "--no-svcproxy")
        refused = proc.returncode != 0 and "another lab" in proc.stderr.lower()
        if refused:
            pytest.skip(f"another lab runs on this machine: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, f"lab up failed:\n{proc.stderr[-4000:]}"
        lab = AgentLab()
        lab.kubectl("apply", "-f", str(REPO / "crds"))
        wait_for("the CRDs", lambda: lab.kubectl("get", "pvs", "-A", check=False) is not None
                 and "proxyvirtualservers" in lab.kubectl("api-resources", check=False))
        for name in ("node-1", "node-2"):
            lab.nodes[name].start_process("agent", lab.agent_argv(lab.nodes[name]))
        yield lab
    finally:
        # After a failed up too: one killed by the timeout cannot undo what it started.
        if not refused:
            cli("down", timeout=300)


def _pods(lab: AgentLab) -> dict[str, str]:
    items = [{"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": f"echo-on-{i}", "labels": {"app": "echo"}},
              "spec": {"nodeName": f"node-{i}",
                       "containers": [{"name": "echo", "image": "svcproxy.io/echo",
                                       "ports": [{"containerPort": 80}],
                                       "readinessProbe": {"tcpSocket": {"port": 80},
                                                          "periodSeconds": 1}}]}}
             for i in (1, 3)]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo"},
           "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 80}]}}
    lab.kubectl("create", "namespace", NS, check=False)
    lab.kubectl("apply", "-n", NS, "-f", "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [*items, svc]}))

    def ready() -> dict[str, str] | None:
        pods = json.loads(lab.kubectl("get", "pods", "-n", NS, "-o", "json"))["items"]
        ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods
               if any(c["type"] == "Ready" and c["status"] == "True"
                      for c in p.get("status", {}).get("conditions") or [])}
        return ips if len(ips) == 2 else None

    ips: dict[str, str] = wait_for("both echo Pods Ready", ready)
    return ips


def _client(node: Any, vip: str, seconds: float, at_least: int) -> tuple[int, int, list[str]]:
    proc = node.run_client([PY, "-c", CLIENT, vip, str(seconds),
                            str(at_least)], timeout=seconds + 120)
    assert proc.returncode == 0, proc.stderr.decode()
    ok, failed, *seen = proc.stdout.decode().split()
    return int(ok), int(failed), seen


def test_ipvs_program_in_a_guest_and_fallback_on_a_netns_node(alab: AgentLab) -> None:
    ips = _pods(alab)
    vip = alab.kubectl("get", "service", "echo", "-n", NS, "-o", "jsonpath={.spec.clusterIP}")
    guest = alab.nodes["node-2"]
    # A foreign IPVS service, made before the agent programs anything of ours.
    run = guest.run(["ipvsadm", "-A", "-t", f"{FOREIGN}:80", "-s", "rr"])
    assert run.returncode == 0, run.stderr.decode()
    reals = sorted(({"address": ip, "port": 80} for ip in ips.values()), key=lambda r: r["address"])
    program = {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
               "metadata": {"name": "echo"},
               "spec": {"service": {"name": "echo"}, "policy": {"name": "e2e"}, "mode": "ipvs",
                        "scheduler": "rr", "contentHash": "uml-1",
                        "virtualServers": [{"address": vip, "port": 80, "mode": "ipvs",
                                            "scheduler": "rr", "realServers": reals}]}}
    alab.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(program))
    for node in ("node-1", "node-2"):
        wait_for(f"uml-1 applied on {node}",
                 lambda n=node: alab.status(n).get("applied", {}).get(f"{NS}/echo") == "uml-1", 90)
    st2 = alab.status("node-2")
    assert st2["capabilities"]["ipvs"] is True and "rr" in st2["capabilities"]["schedulers"]
    assert {"requested": "ipvs", "effective": "ipvs", "reason": ""} in [
        {"reason": "", **m} for m in st2["modes"]]
    st1 = alab.status("node-1")
    assert any(m["requested"] == "ipvs" and m["effective"] == "iptables" for m in st1["modes"])

    table = guest.run(["ipvsadm", "-Ln"]).stdout.decode()
    assert re.search(rf"TCP\s+{re.escape(vip)}:80 rr", table), table
    for ip in ips.values():
        assert re.search(rf"-> {re.escape(ip)}:80\s+Masq\s+1\s", table), table
    ok, failed, seen = _client(guest, vip, 0, 4)
    assert (ok, failed) == (4, 0)
    assert sorted(seen) == ["echo-on-1", "echo-on-1", "echo-on-3", "echo-on-3"]
    assert seen[0] != seen[1] and seen[1] != seen[2]  # rr alternates
    # The netns node serves the same program through the iptables fallback.
    answers = {traffic.answered_by(traffic.request(1, vip, 80)) for _ in range(8)}
    assert answers == {"echo-on-1", "echo-on-3"}

    # kill -9 and restart under steady traffic: no request lost, IPVS table unchanged.
    before = guest.run(["ipvsadm", "-Sn"]).stdout.decode()
    last_sync = st2.get("lastSyncTime")
    result: dict[str, tuple[int, int, list[str]]] = {}
    worker = threading.Thread(target=lambda: result.update(r=_client(guest, vip, 12, 10)))
    worker.start()
    time.sleep(2)  # let traffic flow first (the client runs for a fixed window)
    guest.stop_process("agent", signal.SIGKILL)
    assert not guest.process_alive("agent")
    assert guest.run(["ipvsadm", "-Sn"]).stdout.decode() == before
    guest.start_process("agent", alab.agent_argv(guest))
    wait_for("the restarted agent's sync", lambda: alab.status("node-2").get("lastSyncTime")
             not in (None, last_sync), 60)
    worker.join(timeout=180)
    ok, failed, _ = result["r"]
    assert failed == 0 and ok >= 10, f"{failed} of {ok + failed} requests failed"
    after = guest.run(["ipvsadm", "-Sn"]).stdout.decode()
    assert after == before
    assert f"-A -t {FOREIGN}:80 -s rr" in after
