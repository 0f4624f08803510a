"""The userspace mode's traffic policies Local on the in-memory netfilter: each
listener's endpoints (scopes), the exact rules (portals.py), connections traced by
their source (Pods and the node to the portal's listener, outside clients to the local
one; none local: dropped, none at all: refused), source ranges in front, and partial
syncs that open and close the second listener. No traffic is sent here (that is
tests/dataplane/test_userspace_local.py)."""

from __future__ import annotations

from nftrace import Source, trace
from proxierkit import userspace_ok as ok

from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.table import LocalPolicy, RealServer, SourceRanges, VirtualServer, make_table
from svcproxy.dataplane.userspace.balancer import Balancer
from svcproxy.dataplane.userspace.portals import CHAIN, FIREWALL, NODEPORTS, portal_rules, scopes
from svcproxy.dataplane.userspace.proxier import UserspaceProxier

LOCAL, REMOTE = "10.244.1.2", "10.244.2.2"
NODE_IP, LB_IP = "172.29.0.11", "198.51.100.3"
CIDRS = ("10.244.0.0/16", "fd00:244::/56")
OUTSIDE, POD, NODE = Source("203.0.113.9"), Source("10.244.1.9"), Source(NODE_IP, local=True)
ADDRESSES = frozenset({NODE_IP, "127.0.0.1"})


def vs(address: str, port: int, policy: LocalPolicy, *, local: tuple[str, ...] = (LOCAL,),
       reals: tuple[str, ...] = (LOCAL, REMOTE), weights: dict[str, int] | None = None,
       drain: tuple[str, ...] = (), ranges: SourceRanges = None, owner: str = "ns/web") -> VirtualServer:
    return VirtualServer.create(
        "TCP", address, port,
        [RealServer(a, 8080, (weights or {}).get(a, 1), local=a in local, cluster_drain=a in drain)
         for a in reals],
        owner=owner, local_policy=policy, source_ranges=ranges)


def refuse() -> int:
    return 4999


def where(nf: FakeNetfilter, src: Source, address: str, port: int) -> set[str]:
    """Where a new connection from ``src`` ends: its REDIRECT, else the filter's verdict."""
    chain = "OUTPUT" if src.local else "PREROUTING"
    return (trace(nf, address, port, chain=chain, local=ADDRESSES, src=src)
            or trace(nf, address, port, table="filter", chain="OUTPUT" if src.local else "INPUT",
                     local=ADDRESSES, src=src))


def test_each_listener_chooses_among_its_scope() -> None:
    internal, none = scopes(vs("10.96.0.10", 80, "internal"))
    assert [r.address for r in internal.real_servers] == [LOCAL] and none is None
    # A local endpoint that only the local scope uses (terminating here, ready elsewhere).
    cluster, local = scopes(vs("0.0.0.0", 30080, "external", drain=(LOCAL,)))
    assert local is not None and [r.address for r in local.real_servers] == [LOCAL]
    assert [(r.address, r.weight) for r in cluster.real_servers] == [(LOCAL, 0), (REMOTE, 1)]
    assert Balancer(cluster).candidates("c") == [(REMOTE, 8080)]
    assert Balancer(local).candidates("c") == [(LOCAL, 8080)]
    plain = vs("10.96.0.10", 80, "")
    assert scopes(plain) == (plain, None)


def test_the_exact_rules_of_an_external_policy() -> None:
    head = "-p tcp -m comment --comment ns/web"
    rules = portal_rules(vs("0.0.0.0", 30080, "external"), 4001, refuse, local_port=4002, cluster_cidrs=CIDRS)
    assert rules.nat == (
        f"-A {NODEPORTS} -s 10.244.0.0/16 {head} -m tcp --dport 30080 -j REDIRECT --to-ports 4001",
        f"-A {NODEPORTS} {head} -m addrtype --src-type LOCAL -m tcp --dport 30080"
        " -j REDIRECT --to-ports 4001",
        f"-A {NODEPORTS} {head} -m tcp --dport 30080 -j REDIRECT --to-ports 4002",
    ) and rules.drop == ""
    none_here = portal_rules(vs("0.0.0.0", 30080, "external", local=()), 4001, refuse, local_port=4002,
                             cluster_cidrs=CIDRS)
    assert none_here.nat == rules.nat[:2]
    assert none_here.drop == f"-A {FIREWALL} {head} -m addrtype --dst-type LOCAL -m tcp --dport 30080 -j DROP"
    empty = portal_rules(vs("0.0.0.0", 30080, "external", reals=()), 4001, refuse, local_port=4002)
    assert empty.nat == (f"-A {NODEPORTS} {head} -m tcp --dport 30080 -j REDIRECT --to-ports 4999",)
    # Source ranges in front: the Pods within them and the node to every endpoint, the
    # rest of the ranges to this node's; the others dropped.
    lb = portal_rules(vs(LB_IP, 80, "external", ranges=("10.0.0.0/8", "203.0.113.0/24")), 4001, refuse,
                      local_port=4002, cluster_cidrs=CIDRS)
    dst = f"-d {LB_IP}/32 {head}"
    assert lb.nat == (
        f"-A {CHAIN} -s 10.244.0.0/16 {dst} -m tcp --dport 80 -j REDIRECT --to-ports 4001",
        f"-A {CHAIN} {dst} -m addrtype --src-type LOCAL -m tcp --dport 80 -j REDIRECT --to-ports 4001",
        f"-A {CHAIN} -s 10.0.0.0/8 {dst} -m tcp --dport 80 -j REDIRECT --to-ports 4002",
        f"-A {CHAIN} -s 203.0.113.0/24 {dst} -m tcp --dport 80 -j REDIRECT --to-ports 4002",
    ) and lb.drop == f"-A {FIREWALL} {dst} -m tcp --dport 80 -j DROP"


def test_the_exact_rules_of_an_internal_policy() -> None:
    dst = "-d 10.96.0.10/32 -p tcp -m comment --comment ns/web"
    assert portal_rules(vs("10.96.0.10", 80, "internal"), 4001, refuse).nat == (
        f"-A {CHAIN} {dst} -m tcp --dport 80 -j REDIRECT --to-ports 4001",)
    none_here = portal_rules(vs("10.96.0.10", 80, "internal", local=()), 4001, refuse)
    assert none_here.nat == () and none_here.drop == f"-A {FIREWALL} {dst} -m tcp --dport 80 -j DROP"
    assert portal_rules(vs("10.96.0.10", 80, "internal", reals=()), 4001, refuse).nat == (
        f"-A {CHAIN} {dst} -m tcp --dport 80 -j REDIRECT --to-ports 4999",)


async def test_connections_go_to_a_listener_by_their_source() -> None:
    nf = FakeNetfilter()
    p = UserspaceProxier(nf, cluster_cidrs=CIDRS)
    try:
        table = make_table([
            vs("0.0.0.0", 30080, "external"), vs("192.0.2.7", 80, "external", owner="ns/ext"),
            vs("0.0.0.0", 30081, "external", local=(), owner="ns/elsewhere"),
            vs("10.96.0.10", 80, "internal", owner="ns/itp"),
            vs("10.96.0.11", 80, "internal", local=(), owner="ns/itp-elsewhere"),
        ])
        await ok(p, table)
        for address, port in ((NODE_IP, 30080), ("192.0.2.7", 80)):
            outside, pod, node = (where(nf, s, address, port) for s in (OUTSIDE, POD, NODE))
            assert pod == node and len(pod | outside) == 2, (pod, outside)  # two listeners
            assert next(iter(outside)).startswith("redirect:")
        assert where(nf, OUTSIDE, NODE_IP, 30081) == {"drop"}
        assert where(nf, POD, NODE_IP, 30081) == where(nf, NODE, "127.0.0.1", 30081) != {"drop"}
        assert where(nf, POD, "10.96.0.10", 80) != {"drop"}
        assert where(nf, POD, "10.96.0.11", 80) == {"drop"}
        assert p.counts().virtual_servers == 5
    finally:
        await p.close()


async def test_partial_syncs_open_and_close_the_local_listener() -> None:
    nf = FakeNetfilter()
    p = UserspaceProxier(nf, cluster_cidrs=CIDRS)
    try:
        await ok(p, make_table([vs("0.0.0.0", 30080, "")]))
        listener = where(nf, OUTSIDE, NODE_IP, 30080)
        assert where(nf, POD, NODE_IP, 30080) == listener
        result = await ok(p, make_table([vs("0.0.0.0", 30080, "external")]), {"ns/web"})
        assert result.operations == {"update_virtual_server": 1}
        assert where(nf, POD, NODE_IP, 30080) == listener  # the portal keeps its listener
        local = where(nf, OUTSIDE, NODE_IP, 30080)
        assert local != listener
        await ok(p, make_table([vs("0.0.0.0", 30080, "external", local=())]), {"ns/web"})
        assert where(nf, OUTSIDE, NODE_IP, 30080) == {"drop"}
        await ok(p, make_table([vs("0.0.0.0", 30080, "external")]), {"ns/web"})
        assert where(nf, OUTSIDE, NODE_IP, 30080) == local and nf.rules("filter", FIREWALL) == []
        before = nf.rules("nat", NODEPORTS)
        await ok(p, make_table([vs("0.0.0.0", 30080, "external")]))  # a full sync writes the same
        assert nf.rules("nat", NODEPORTS) == before
        await ok(p, make_table([vs("0.0.0.0", 30080, "")]), {"ns/web"})
        assert where(nf, OUTSIDE, NODE_IP, 30080) == listener and len(nf.rules("nat", NODEPORTS)) == 1
        assert all(portal.local is None for portal in p._portals.values())  # its socket closed
    finally:
        await p.close()
