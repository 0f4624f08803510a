"""The e2e matrix: every mode and scheduler, checked with real traffic from every node.

One lab for the module (``system_helpers.system_lab``: node-1 a netns node
without IPVS, node-2 and node-3 UML guests with IPVS; operator and agents
running), one echo Deployment of 3 Pods behind Service ``web`` (TCP 80, UDP 80,
TCP 8080) and one ServiceProxyPolicy ``p`` that selects Services by label and
is edited between cases. Each case applies the policy with kubectl, waits for
Programmed at the policy's current generation, sends a batch of requests from
the client namespace of every node (one client process per node) and checks
what the policy promises: rr/wrr spread evenly on IPVS nodes, hash schedulers
and ClientIP affinity pin a client, only Ready Pods answer, the node without
IPVS serves ipvs through the iptables fallback and the policy says Degraded
naming it. Then: TCP and UDP and two ports per mode, an unready Pod, scaling up
and down, a Service created after the policy, and a mode edit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from system_helpers import (
    Batch,
    SystemLab,
    echo_deployment,
    echo_service,
    system_lab,
    wait_for,
)

from svcproxy.api.policy import IPVS_SCHEDULERS
from svcproxy.lab import traffic

pytestmark = [pytest.mark.lab, pytest.mark.uml, pytest.mark.root]

NS = "system"
POLICY = "p"
SELECT = {"serviceSelector": {"matchLabels": {"e2e": "system"}}}
IPVS_NODES = ("node-2", "node-3")
PINNING = {"sh", "dh", "mh"}  # hash schedulers: one client, one backend
EVEN = {"rr", "wrr"}  # equal weights: sequential requests from one client rotate
N = 12  # requests per node per batch (a multiple of the Pod count)


@pytest.fixture(scope="module")
def slab(lab_slot: None) -> Iterator[SystemLab]:
    with system_lab() as lab:
        lab.kubectl("create", "namespace", NS)
        wait_for("the default ServiceAccount",
                 lambda: lab.get("serviceaccount", "default", "-n", NS))
        ports = [("http", "TCP", 80), ("dns", "UDP", 80), ("alt", "TCP", 8080)]
        lab.apply([echo_deployment("web", 3),
                   echo_service("web", "web", ports, labels={"e2e": "system"})], NS)
        lab.wait_ready_pods(NS, "app=web", 3)
        yield lab


def policy(mode: str, scheduler: str | None = None, affinity: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {**SELECT, "mode": mode}
    if scheduler:
        spec["ipvs"] = {"scheduler": scheduler}
    if affinity:
        spec["sessionAffinity"] = {"type": "ClientIP", "timeoutSeconds": 600}
    return spec


def program(lab: SystemLab, spec: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """Apply ``spec``, wait for Programmed at this generation and for every agent to run
    the program with exactly the Ready Pods; returns (ready Pods, conditions)."""
    lab.apply_policy(NS, POLICY, spec)
    conds = lab.wait_programmed(NS, POLICY)
    pods = lab.ready_pods(NS, "app=web")
    lab.wait_applied(NS, "web", set(pods.values()))
    return pods, conds


def check_batches(batches: dict[str, Batch], pods: dict[str, str]) -> None:
    for node, b in batches.items():
        assert b.failed == 0, f"{node}: {b.failed}/{b.sent} requests failed: {b.errors}"
        strangers = set(b.counts) - set(pods)
        assert not strangers, f"{node}: answers from Pods that are not Ready: {strangers}"


def pinned(b: Batch) -> bool:
    return len(b.counts) == 1


def even(b: Batch, pods: dict[str, str]) -> bool:
    return set(b.counts) == set(pods) and len(set(b.counts.values())) == 1


@pytest.mark.parametrize("affinity", [False, True], ids=["noaffinity", "clientip"])
@pytest.mark.parametrize("scheduler", IPVS_SCHEDULERS)
def test_ipvs_scheduler(slab: SystemLab, scheduler: str, affinity: bool) -> None:
    offered = slab.proxynode("node-2")["capabilities"]["schedulers"]
    if scheduler not in offered:
        pytest.skip(f"the UML kernel does not offer {scheduler} (offers {offered})")
    pods, conds = program(slab, policy("ipvs", scheduler, affinity))
    # node-1 has no IPVS: its agent serves ipvs as iptables and the policy says so.
    degraded = conds.get("Degraded") or {}
    assert degraded.get("status") == "True", conds
    assert "node-1" in degraded["message"], degraded
    assert "node-2" not in degraded["message"] and "node-3" not in degraded["message"], degraded
    vip = slab.cluster_ip(NS, "web")
    for node in IPVS_NODES:
        table = slab.ipvs_table(node)
        line = next((ln for ln in table.splitlines() if ln.startswith(f"-A -t {vip}:80 ")), "")
        assert f"-s {scheduler}" in line, f"{node}: {vip}:80 not with {scheduler}:\n{table}"
        assert ("-p 600" in line) == affinity, f"{node}: persistence wrong: {line}"
    batches = slab.batch(vip, 80, N)
    check_batches(batches, pods)
    for node, b in batches.items():
        if affinity:
            assert pinned(b), f"{node}: ClientIP affinity did not pin the client: {b.counts}"
        elif node in IPVS_NODES and scheduler in PINNING:
            assert pinned(b), f"{node}: {scheduler} did not pin the client: {b.counts}"
        elif node in IPVS_NODES and scheduler in EVEN:
            assert even(b, pods), f"{node}: {scheduler} did not spread evenly: {b.counts}"


@pytest.mark.parametrize("affinity", [False, True], ids=["noaffinity", "clientip"])
@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_netfilter_modes(slab: SystemLab, mode: str, affinity: bool) -> None:
    pods, conds = program(slab, policy(mode, None, affinity))
    assert (conds.get("Degraded") or {}).get("status") != "True", conds
    vip = slab.cluster_ip(NS, "web")
    for node in IPVS_NODES:  # the Service left IPVS on the nodes that have it
        assert f"{vip}:80" not in slab.ipvs_table(node), f"{node} still has {vip} in IPVS"
    batches = slab.batch(vip, 80, N)
    check_batches(batches, pods)
    for node, b in batches.items():
        if affinity:
            assert pinned(b), f"{node}: ClientIP affinity did not pin the client: {b.counts}"
        elif mode == "userspace":  # the agent's own rr balancer, one client per node
            assert even(b, pods), f"{node}: userspace rr did not spread evenly: {b.counts}"
        else:  # random with kube-proxy's probabilities: 12 all alike has p < 1e-5
            assert len(b.counts) >= 2, f"{node}: iptables sent all to one Pod: {b.counts}"


@pytest.mark.parametrize("mode", ["ipvs", "iptables", "userspace"])
def test_tcp_udp_and_two_ports(slab: SystemLab, mode: str) -> None:
    pods, _ = program(slab, policy(mode, "rr" if mode != "iptables" else None))
    vip = slab.cluster_ip(NS, "web")
    for proto, port in (("tcp", 80), ("udp", 80), ("tcp", 8080)):
        batches = slab.batch(vip, port, 6, proto=proto)
        check_batches(batches, pods)
        for node, b in batches.items():
            assert b.sent == 6 and len(b.counts) >= 2, f"{node} {proto}/{port}: {b.counts}"


def test_unready_pod_stops_getting_new_connections(slab: SystemLab) -> None:
    pods, _ = program(slab, policy("ipvs", "rr"))
    vip = slab.cluster_ip(NS, "web")
    name, ip = sorted(pods.items())[0]
    traffic.set_ready("node-1", ip, 80, False)
    try:
        rest = {k: v for k, v in pods.items() if k != name}
        wait_for(f"{name} unready", lambda: set(slab.ready_pods(NS, "app=web")) == set(rest))
        slab.wait_applied(NS, "web", set(rest.values()))
        batches = slab.batch(vip, 80, N)
        check_batches(batches, rest)
        for node in IPVS_NODES:
            assert even(batches[node], rest), f"{node}: {batches[node].counts}"
    finally:
        traffic.set_ready("node-1", ip, 80, True)
    wait_for(f"{name} Ready again", lambda: set(slab.ready_pods(NS, "app=web")) == set(pods))
    slab.wait_applied(NS, "web", set(pods.values()))
    batches = slab.batch(vip, 80, N)
    check_batches(batches, pods)
    for node in IPVS_NODES:
        assert even(batches[node], pods), f"{node}: {batches[node].counts}"


def test_scaling_up_and_down_is_followed(slab: SystemLab) -> None:
    program(slab, policy("ipvs", "rr"))
    vip = slab.cluster_ip(NS, "web")
    for replicas in (4, 2, 3):
        slab.kubectl("scale", "deployment", "web", f"--replicas={replicas}", "-n", NS)
        pods = slab.wait_ready_pods(NS, "app=web", replicas)
        slab.wait_applied(NS, "web", set(pods.values()))
        batches = slab.batch(vip, 80, 4 * replicas)
        check_batches(batches, pods)
        for node in IPVS_NODES:
            assert even(batches[node], pods), f"{replicas} replicas, {node}: {batches[node].counts}"


def test_service_created_after_the_policy(slab: SystemLab) -> None:
    pods, _ = program(slab, policy("ipvs", "rr"))
    slab.apply([echo_service("late", "web", [("http", "TCP", 80)], labels={"e2e": "system"})], NS)
    try:
        slab.wait_applied(NS, "late", set(pods.values()))
        slab.wait_programmed(NS, POLICY)
        status = slab.get("spp", POLICY, "-n", NS)["status"]
        assert "late" in {s["name"] for s in status["services"]}, status
        vip = slab.cluster_ip(NS, "late")
        assert re.search(rf"-A -t {re.escape(vip)}:80 -s rr", slab.ipvs_table("node-2"))
        batches = slab.batch(vip, 80, N)
        check_batches(batches, pods)
        for node in IPVS_NODES:
            assert even(batches[node], pods), f"{node}: {batches[node].counts}"
    finally:
        slab.kubectl("delete", "service", "late", "-n", NS)


def test_policy_edited_from_one_mode_to_another(slab: SystemLab) -> None:
    vip = slab.cluster_ip(NS, "web")
    for mode in ("ipvs", "iptables", "userspace", "ipvs"):
        pods, _ = program(slab, policy(mode, "rr" if mode != "iptables" else None))
        in_ipvs = f"{vip}:80" in slab.ipvs_table("node-2")
        assert in_ipvs == (mode == "ipvs"), f"after the edit to {mode}: IPVS has it: {in_ipvs}"
        check_batches(slab.batch(vip, 80, 6), pods)
    pn = slab.proxynode("node-2")
    assert any(m["requested"] == "ipvs" and m["effective"] == "ipvs"
               for m in pn.get("modes", [])), pn.get("modes")

