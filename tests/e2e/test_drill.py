"""Reliability drills: each under steady client traffic from every node, counting every request.

One lab for the module (``system_helpers.system_lab``: node-1 a netns node
without IPVS, node-2 and node-3 UML guests with IPVS; operator and agents
running) with an echo Deployment behind Service ``web`` and a policy that runs
it in ipvs mode (rr). Every drill runs a client loop in the client namespace of
every node for its whole length, prints requests sent / failed per node and
asserts that none failed. Drills: agent kill -9 and restart, operator kill -9
and restart (and a standby replica taking over), the API server stopped for
30 s, a live mode switch ipvs -> iptables -> userspace -> ipvs, and the
handover with the real kube-proxy. Foreign state (an IPVS service and
netfilter rules made outside svcproxy) is created first and checked last.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from system_helpers import (
    NODES,
    Batch,
    SystemLab,
    echo_deployment,
    echo_service,
    rule_lines,
    system_lab,
    wait_for,
)

from svcproxy_lab import controlplane
from svcproxy_lab.node import terminate
from svcproxy_lab.pki import Pki

pytestmark = [pytest.mark.lab, pytest.mark.uml, pytest.mark.root]

NS = "drill"
POLICY = "p"
IPVS_NODES = ("node-2", "node-3")
FOREIGN_VIP = "10.96.250.250"
FOREIGN_CHAIN = "E2E-FOREIGN"
SELECT = {"serviceSelector": {"matchLabels": {"e2e": "drill"}}}


def spec(mode: str) -> dict[str, Any]:
    out: dict[str, Any] = {**SELECT, "mode": mode}
    if mode != "iptables":
        out["ipvs"] = {"scheduler": "rr"}
    return out


@pytest.fixture(scope="module")
def dlab(lab_slot: None) -> Iterator[SystemLab]:
    with system_lab() as lab:
        lab.kubectl("create", "namespace", NS)
        wait_for("the default ServiceAccount",
                 lambda: lab.get("serviceaccount", "default", "-n", NS))
        lab.apply([echo_deployment("web", 3),
                   echo_service("web", "web", [("http", "TCP", 80)], labels={"e2e": "drill"})],
                  NS)
        lab.wait_ready_pods(NS, "app=web", 3)
        make_foreign_state(lab)
        yield lab


def make_foreign_state(lab: SystemLab) -> None:
    """An IPVS service in every IPVS node and a filter chain with a rule in every node
    (checked after every drill by :func:`check_foreign_state`)."""
    for node in IPVS_NODES:
        run = lab.nodes[node].run(["ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:80", "-s", "wlc"])
        assert run.returncode == 0, run.stderr.decode()
    for node in NODES:
        tool = iptables(node)
        for argv in ([tool, "-t", "filter", "-N", FOREIGN_CHAIN],
                     [tool, "-t", "filter", "-A", FOREIGN_CHAIN, "-s", "192.0.2.1",
                      "-j", "RETURN"]):
            run = lab.nodes[node].run(argv)
            assert run.returncode == 0, f"{node}: {argv}: {run.stderr.decode()}"


def iptables(node: str) -> str:
    # The UML kernel has x_tables but no nf_tables tables: its users need the -legacy tools.
    return "iptables-legacy" if node in IPVS_NODES else "iptables"


def foreign_state(lab: SystemLab) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node in NODES:
        rules = lab.nodes[node].run([f"{iptables(node)}-save", "-t", "filter"]).stdout.decode()
        found[node] = [ln for ln in rules.splitlines() if FOREIGN_CHAIN in ln]
        if node in IPVS_NODES:
            found[node] += [ln for ln in lab.ipvs_table(node).splitlines() if FOREIGN_VIP in ln]
    return found


def program(lab: SystemLab, mode: str) -> dict[str, str]:
    lab.apply_policy(NS, POLICY, spec(mode))
    lab.wait_programmed(NS, POLICY)
    pods = lab.ready_pods(NS, "app=web")
    lab.wait_applied(NS, "web", set(pods.values()))
    return pods


def data_plane(lab: SystemLab) -> dict[str, Any]:
    """What carries the Service on every node: IPVS tables and svcproxy's nat rules."""
    state: dict[str, Any] = {}
    for node in NODES:
        state[node] = [ln for ln in rule_lines(lab.nat_rules(node)) if "SVCPROXY" in ln]
        if node in IPVS_NODES:
            state[node] += lab.ipvs_table(node).splitlines()
    return state


def check_foreign_state(lab: SystemLab) -> None:
    """The foreign IPVS service and filter rule made before the drills are all still there."""
    found = foreign_state(lab)
    for node in NODES:
        assert any(f"-A {FOREIGN_CHAIN} -s 192.0.2.1/32 -j RETURN" in ln for ln in found[node]), \
            f"{node}: the foreign filter rule is gone: {found[node]}"
    for node in IPVS_NODES:
        assert f"-A -t {FOREIGN_VIP}:80 -s wlc" in found[node], \
            f"{node}: the foreign IPVS service is gone: {found[node]}"


def report(drill: str, results: dict[str, Batch], lab: SystemLab) -> None:
    sent = sum(b.sent for b in results.values())
    failed = sum(b.failed for b in results.values())
    per_node = ", ".join(f"{n} {b.sent}/{b.failed}" for n, b in sorted(results.items()))
    print(f"\nDRILL {drill}: sent {sent} failed {failed} (sent/failed per node: {per_node})")
    assert set(results) == set(NODES), f"a client did not report: {sorted(results)}"
    problems = [f"{node}: {b.failed}/{b.sent} requests failed: {b.errors}; answers before "
                f"each failure: {b.around_failures()}"
                for node, b in sorted(results.items()) if b.failed or not b.sent]
    drops = conntrack_drops(lab)
    assert not problems, f"{drill}:\n" + "\n".join(problems) + f"\nconntrack table full: {drops}"
    assert not any(drops.values()), f"a guest's conntrack table overflowed: {drops}"
    check_foreign_state(lab)


def conntrack_drops(lab: SystemLab) -> dict[str, int]:
    """How often each IPVS guest's kernel dropped a packet for a full conntrack table.

    A full table drops new connections in and out of the node, which looks like
    a proxy failure; the lab sizes the table as kube-proxy would (``lab/uml.py``).
    """
    drops = {}
    for node in IPVS_NODES:
        proc = lab.nodes[node].run(["sh", "-c", "dmesg | grep -c 'table full' || true"])
        drops[node] = int(proc.stdout.decode().strip() or 0)
    return drops


def scale_and_wait(lab: SystemLab, replicas: int, timeout: float = 60) -> None:
    lab.kubectl("scale", "deployment", "web", f"--replicas={replicas}", "-n", NS)
    pods = lab.wait_ready_pods(NS, "app=web", replicas)
    lab.wait_applied(NS, "web", set(pods.values()), timeout=timeout)


def test_agent_kill_9_and_restart(dlab: SystemLab) -> None:
    program(dlab, "ipvs")
    vip = dlab.cluster_ip(NS, "web")
    before = data_plane(dlab)
    with dlab.steady_traffic(vip, 80) as results:
        for node in ("node-1", "node-2"):
            last = dlab.proxynode(node).get("lastSyncTime")
            dlab.nodes[node].stop_process("agent", signal.SIGKILL)
            assert data_plane(dlab) == before, f"rules changed after kill -9 on {node}"
            time.sleep(2)  # traffic flows through the agent-less node for a while
            dlab.nodes[node].start_process("agent", dlab.agent_argv(node))

            def synced(n: str = node, t: Any = last) -> bool:
                return dlab.proxynode(n).get("lastSyncTime") not in (None, t)

            wait_for(f"the restarted agent's first sync on {node}", synced)
            dlab.wait_applied(NS, "web")
            assert data_plane(dlab) == before, f"rules changed after the restart on {node}"
    report("agent kill -9 + restart (node-1, node-2)", results, dlab)


def test_operator_kill_9_and_restart(dlab: SystemLab) -> None:
    pods = program(dlab, "ipvs")
    vip = dlab.cluster_ip(NS, "web")
    before = data_plane(dlab)
    with dlab.steady_traffic(vip, 80) as results:
        dlab.kill_operator()
        time.sleep(3)  # the data plane must not notice: compare after a while
        assert data_plane(dlab) == before
        dlab.start_operator()
        # A change after the restart is programmed again.
        scale_and_wait(dlab, 4, timeout=30)
        scale_and_wait(dlab, len(pods), timeout=30)
    report("operator kill -9 + restart", results, dlab)


def test_operator_standby_takes_over(dlab: SystemLab) -> None:
    """Two replicas with kopf peering: the lab's operator (priority 0) and a standby
    (priority -1). Kill the active one: the standby programs new changes."""
    program(dlab, "ipvs")
    vip = dlab.cluster_ip(NS, "web")
    # Another host process: its own metrics port, no second liveness endpoint.
    dlab.start_operator("operator-standby", "--priority", "-1", "--metrics-port", "9110",
                        "--liveness-port", "0")
    try:
        with dlab.steady_traffic(vip, 80) as results:
            dlab.kill_operator()
            scale_and_wait(dlab, 4, timeout=120)
            scale_and_wait(dlab, 3, timeout=60)
        report("operator kill -9, standby takes over", results, dlab)
    finally:
        dlab.kill_operator("operator-standby")
        dlab.start_operator()


def test_api_server_stopped_for_30_s(dlab: SystemLab) -> None:
    program(dlab, "ipvs")
    vip = dlab.cluster_ip(NS, "web")
    before = data_plane(dlab)
    with dlab.steady_traffic(vip, 80) as results:
        terminate(controlplane.pid_file(dlab.ctx, "kube-apiserver"))
        time.sleep(30)  # the drill is "down for 30 s": nothing to poll for
        assert data_plane(dlab) == before, "the data plane changed while the API was down"
        controlplane.start(dlab.ctx, Pki(dlab.ctx.pki_dir), lambda _msg: None)
        scale_and_wait(dlab, 4, timeout=120)
        scale_and_wait(dlab, 3, timeout=60)
    report("API server down 30 s", results, dlab)


def test_live_mode_switch(dlab: SystemLab) -> None:
    program(dlab, "ipvs")
    vip = dlab.cluster_ip(NS, "web")
    with dlab.steady_traffic(vip, 80) as results:
        for mode in ("iptables", "userspace", "ipvs"):
            program(dlab, mode)
            time.sleep(2)  # traffic in the new mode for a while before the next switch
    report("mode switch ipvs -> iptables -> userspace -> ipvs", results, dlab)


def legacy_path(lab: SystemLab) -> str:
    """A PATH whose iptables* are the x_tables tools (what iptables-wrapper does in the
    kube-proxy image), under the lab folder, which UML guests see at the same path."""
    folder = lab.ctx.state_dir / "legacy-bin"
    folder.mkdir(exist_ok=True)
    for tool in ("iptables", "iptables-save", "iptables-restore",
                 "ip6tables", "ip6tables-save", "ip6tables-restore"):
        link = folder / tool
        if not link.is_symlink():
            link.symlink_to(f"/usr/sbin/{tool.replace('tables', 'tables-legacy', 1)}")
    return f"{folder}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"


def start_kube_proxy(lab: SystemLab) -> None:
    """The real kube-proxy (iptables mode) on every node. The UML kernel has no nft NAT,
    so in the guests it runs with the -legacy tools first on PATH."""
    path = legacy_path(lab)
    for name, node in lab.nodes.items():
        argv = lab.cluster.kube_proxy_argv(lab.ctx, node, "iptables")
        if name in IPVS_NODES:
            argv = ["env", f"PATH={path}", *argv]
        node.start_process("kube-proxy", argv)


def stop_kube_proxy(lab: SystemLab) -> None:
    path = legacy_path(lab)
    for name, node in lab.nodes.items():
        node.stop_process("kube-proxy")
        argv = [str(lab.ctx.bin_dir / "kube-proxy"), "--cleanup"]
        if name in IPVS_NODES:
            argv = ["env", f"PATH={path}", *argv]
        proc = node.run(argv, timeout=120)
        assert proc.returncode == 0, f"{name}: kube-proxy --cleanup: {proc.stderr.decode()[-500:]}"


def test_handover_with_kube_proxy(dlab: SystemLab) -> None:
    vip = dlab.cluster_ip(NS, "web")
    label = "service.kubernetes.io/service-proxy-name"
    dlab.kubectl("delete", "spp", POLICY, "-n", NS, "--ignore-not-found")
    wait_for("the program withdrawn", lambda: dlab.get("pvs", "web", "-n", NS) is None)
    start_kube_proxy(dlab)
    try:
        # kube-proxy carries the Service everywhere before the drill starts.
        for node in NODES:
            def carried(n: str = node) -> bool:
                rules = dlab.nat_rules(n)
                return f"{vip}/32" in rules and "KUBE-SVC" in rules

            wait_for(f"kube-proxy's rules for {vip} on {node}", carried)
        with dlab.steady_traffic(vip, 80) as results:
            program(dlab, "ipvs")
            wait_for("the handover label", lambda: (dlab.get("service", "web", "-n", NS)
                     ["metadata"].get("labels") or {}).get(label) == "svcproxy")
            for node in NODES:  # kube-proxy let it go
                def released(n: str = node) -> bool:
                    kube = [ln for ln in dlab.nat_rules(n).splitlines() if "KUBE-" in ln]
                    return not any(f"{vip}/32" in ln for ln in kube)

                wait_for(f"kube-proxy's rules for {vip} gone on {node}", released)
            time.sleep(3)  # svcproxy alone carries it for a while
            dlab.kubectl("delete", "spp", POLICY, "-n", NS)
            wait_for("the label removed", lambda: label not in (
                dlab.get("service", "web", "-n", NS)["metadata"].get("labels") or {}))
            wait_for("the program withdrawn", lambda: dlab.get("pvs", "web", "-n", NS) is None)
            time.sleep(3)  # kube-proxy alone carries it again
        report("handover svcproxy <-> kube-proxy (iptables)", results, dlab)
    finally:
        stop_kube_proxy(dlab)
        program(dlab, "ipvs")
