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

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from system_helpers import (
    NODES,
    PY,
    Batch,
    SystemLab,
    echo_deployment,
    echo_service,
    system_lab,
    wait_for,
)

from svcproxy.api.policy import IPVS_SCHEDULERS
from svcproxy_lab import traffic

pytestmark = [pytest.mark.lab, pytest.mark.uml, pytest.mark.root]

NS = "system"
POLICY = "p"
SELECT = {"serviceSelector": {"matchLabels": {"e2e": "system"}}}
IPVS_NODES = ("node-2", "node-3")
PINNING = {"sh", "dh", "mh"}  # hash schedulers: one client, one backend
EVEN = {"rr", "wrr"}  # equal weights: sequential requests from one client rotate
N = 12  # requests per node per batch (a multiple of the Pod count)
# Short ClientIP timeouts, so that expiry can be watched. IPVS needs more: its
# persistence template expires timeoutSeconds after the client's last new connection
# only if none of the client's connections is left in IPVS's table by then (a
# connection closed with a RST stays 10 s, in CLOSE); otherwise the kernel extends
# the template by 60 s at a time (ip_vs_conn_expire). 15 s > 10 s.
AFFINITY_TIMEOUT = {"ipvs": 15, "iptables": 5, "userspace": 5}


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
    # rr spreads 6 over the Pods for sure; iptables picks at random, and 6 answers from
    # one of 3 Pods happen 1 time in 243 per batch (seen once in CI): 24 make it ~1e-11.
    count = 24 if mode == "iptables" else 6
    for proto, port in (("tcp", 80), ("udp", 80), ("tcp", 8080)):
        batches = slab.batch(vip, port, count, proto=proto)
        check_batches(batches, pods)
        for node, b in batches.items():
            assert b.sent == count and len(b.counts) >= 2, f"{node} {proto}/{port}: {b.counts}"


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



@pytest.mark.parametrize("mode", ["ipvs", "iptables", "userspace"])
def test_clientip_affinity_expires(slab: SystemLab, mode: str) -> None:
    """Pinned within timeoutSeconds; after that long without traffic, free to move."""
    timeout = AFFINITY_TIMEOUT[mode]
    spec = policy(mode, "rr" if mode != "iptables" else None)
    spec["sessionAffinity"] = {"type": "ClientIP", "timeoutSeconds": timeout}
    pods, _ = program(slab, spec)
    vip = slab.cluster_ip(NS, "web")
    if mode == "ipvs":
        for node in IPVS_NODES:
            assert re.search(rf"-A -t {re.escape(vip)}:80 -s rr -p {timeout}\b",
                             slab.ipvs_table(node)), f"{node}: {slab.ipvs_table(node)}"
    # Within the timeout: idle gaps of a third of it between requests keep the Pod.
    # Every TCP connection ends with a RST (see AFFINITY_TIMEOUT).
    gap = timeout / 3
    batches = slab.batch(vip, 80, 3, interval=gap, reset=True)
    check_batches(batches, pods)
    first = {}
    for node, b in batches.items():
        assert pinned(b), f"{node}: requests {gap:.1f} s apart left the pinned Pod: {b.answers}"
        first[node] = b.answers[0]
    # Any request refreshes the affinity, so expiry cannot be polled with requests:
    # each try waits out the timeout idle, then sends one request from every node that
    # has not moved yet. rr (IPVS, userspace) moves on the first try; iptables picks at
    # random and may land on the same Pod again (1 in 3 per try). In ipvs mode node-1
    # is the iptables fallback, whose expiry the iptables case covers: IPVS nodes only.
    watched = IPVS_NODES if mode == "ipvs" else NODES
    idle = timeout + 2
    moved: dict[str, str] = {}
    tries = 0
    while len(moved) < len(watched) and tries < 8:
        time.sleep(idle)
        tries += 1
        waiting = tuple(n for n in watched if n not in moved)
        for node, b in slab.batch(vip, 80, 1, nodes=waiting, reset=True).items():
            check_batches({node: b}, pods)
            if b.answers[0] != first[node]:
                moved[node] = b.answers[0]
    assert set(moved) == set(watched), (
        f"after {tries} idle periods of {idle} s (timeoutSeconds {timeout}), still on "
        f"the first Pod: {sorted(set(watched) - set(moved))} (first: {first})")


# A second client namespace in each IPVS node, with the same addresses on both nodes
# (outside the cluster CIDRs, so the node masquerades them and replies come back).
EXT_NS = "svcp-e2e-ext"
EXT_GATEWAY = "192.0.2.254"
EXT_SOURCES = [f"192.0.2.{i}" for i in range(1, 9)]
EXT_SCRIPT = f"""
ns={EXT_NS}; gw={EXT_GATEWAY}
[ -e /run/netns/$ns ] || ip netns add $ns
ip -n $ns link show eth0 >/dev/null 2>&1 || ip link add ext0 type veth peer name eth0 netns $ns
ip addr replace $gw/32 dev ext0
ip link set ext0 up
ip route replace 192.0.2.0/28 dev ext0 scope link src $gw
ip -n $ns link set lo up
for a in {" ".join(EXT_SOURCES)}; do ip -n $ns addr replace $a/32 dev eth0; done
ip -n $ns link set eth0 up
ip -n $ns route replace $gw dev eth0 scope link
ip -n $ns route replace 10.96.0.0/16 via $gw dev eth0
"""
# Two rounds over every source address (each bound explicitly): source -> answering Pods.
EXT_CLIENT = r"""
import json, socket, sys
vip, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
seen = {s: [] for s in sources}
for _ in range(2):
    for src in sources:
        with socket.socket() as s:
            s.settimeout(3)
            s.bind((src, 0))
            s.connect((vip, port))
            s.sendall(b"hello\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            seen[src].append(data.decode().split()[0])
print(json.dumps(seen))
"""


def ext_choices(lab: SystemLab, node: str, vip: str) -> dict[str, list[str]]:
    run = lab.nodes[node].run(["nsenter", f"--net=/run/netns/{EXT_NS}", "--", PY,
                               "-c", EXT_CLIENT, vip, "80", ",".join(EXT_SOURCES)])
    assert run.returncode == 0, f"{node}: {run.stderr.decode(errors='replace')[-1500:]}"
    out: dict[str, list[str]] = json.loads(run.stdout.decode().strip().splitlines()[-1])
    return out


def kernel_order(lab: SystemLab, node: str, vip: str, port: int = 80) -> list[str]:
    """The real servers of ``vip``:``port`` in the kernel's list order, which the hash
    schedulers' tables follow. ``ipvsadm`` sorts them; /proc/net/ip_vs does not."""
    proc = lab.nodes[node].run(["cat", "/proc/net/ip_vs"])
    assert proc.returncode == 0, proc.stderr.decode()
    service = f"{socket.inet_aton(vip).hex().upper()}:{port:04X}"
    reals: list[str] = []
    inside = False
    for line in proc.stdout.decode().splitlines():
        words = line.split()
        if line.startswith(("TCP", "UDP", "SCTP", "FWM")):
            inside = words[0] == "TCP" and words[1] == service
        elif inside and words[:1] == ["->"]:
            addr, hexport = words[1].split(":")
            reals.append(f"{socket.inet_ntoa(bytes.fromhex(addr))}:{int(hexport, 16)}")
    return reals


@pytest.mark.parametrize("scheduler", ["sh", "mh"])
def test_hash_schedulers_agree_across_ipvs_nodes(slab: SystemLab, scheduler: str) -> None:
    """The same client address gets the same Pod from every IPVS node.

    Clients behind different nodes have different addresses, so the test gives
    both IPVS nodes an extra client namespace holding the same 8 addresses. The
    claim holds because the agent adds real servers in one canonical order (the
    kernel's hash tables follow that order): checked first, then the choices.
    """
    pods, _ = program(slab, policy("ipvs", scheduler))
    vip = slab.cluster_ip(NS, "web")
    orders = {node: kernel_order(slab, node, vip) for node in IPVS_NODES}
    assert len(orders["node-2"]) == len(pods) and orders["node-2"] == orders["node-3"], orders
    choices = {}
    try:
        for node in IPVS_NODES:
            run = slab.nodes[node].run(["sh", "-ec", EXT_SCRIPT])
            assert run.returncode == 0, f"{node}: {run.stderr.decode()}"
            choices[node] = ext_choices(slab, node, vip)
    finally:
        for node in IPVS_NODES:
            slab.nodes[node].run(["sh", "-c", f"ip netns del {EXT_NS}; ip link del ext0"])
    for node, seen in choices.items():
        strangers = {p for ps in seen.values() for p in ps} - set(pods)
        assert not strangers, f"{node}: answers from Pods that are not Ready: {strangers}"
        for src, answered in seen.items():
            assert len(set(answered)) == 1, f"{node}: {scheduler} moved {src}: {answered}"
    print(f"\n{scheduler}: source address -> Pod on node-2 / node-3: {choices}")
    assert choices["node-2"] == choices["node-3"], (
        f"{scheduler}: the IPVS nodes chose differently for the same client addresses: {choices}")
    # The choice depends on the address (8 addresses all on one of 3 Pods: p = 3^-7).
    spread = {seen[0] for seen in choices["node-2"].values()}
    assert len(spread) >= 2, f"{scheduler}: every address went to one Pod: {choices['node-2']}"
