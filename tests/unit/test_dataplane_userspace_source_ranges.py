"""The userspace mode's loadBalancerSourceRanges on the in-memory netfilter: the exact
rules (portals.py), connections traced by their source (the ranges and the node are
redirected to the listener, the rest dropped in the filter chain, everyone refused
with no endpoint), partial syncs that add, change and lift the filter keeping the
listener and the chain layout, IPv6 in ip6tables, and cleanup of the filter chain. No
traffic is sent here (that is tests/dataplane/test_userspace_source_ranges.py)."""

from __future__ import annotations

from nftrace import Source, trace
from proxierkit import userspace_env  # noqa: F401 (the fixture env)
from proxierkit import userspace_ok as ok

from svcproxy.base import IPFamily
from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.table import RealServer, SourceRanges, VirtualServer, make_table
from svcproxy.dataplane.userspace.portals import (
    CHAIN,
    FILTER_JUMPS,
    FIREWALL,
    NODEPORTS_JUMP,
    portal_rules,
)
from svcproxy.dataplane.userspace.proxier import UserspaceProxier

LB_IP, LB_IP6, NODE_IP = "198.51.100.3", "2001:db8::3", "172.29.0.11"
IN_RANGE, OUTSIDE, NODE = Source("203.0.113.9"), Source("192.0.2.200"), Source(NODE_IP, local=True)


def lb(ranges: SourceRanges = ("203.0.113.0/24",), *, address: str = LB_IP, weights: tuple[int, ...] = (1,),
       owner: str = "ns/web") -> VirtualServer:
    six = IPFamily.is_v6(address)
    reals = [RealServer(f"fd00:244::{i + 2}" if six else f"10.244.1.{i + 2}", 8080, w)
             for i, w in enumerate(weights)]
    return VirtualServer.create("TCP", address, 80, reals, owner=owner, source_ranges=ranges)


def where(nf: FakeNetfilter, src: Source, address: str = LB_IP) -> set[str]:
    """Where a new connection from ``src`` ends: its REDIRECT, else the filter's verdict."""
    chain = "OUTPUT" if src.local else "PREROUTING"
    return (trace(nf, address, 80, chain=chain, src=src)
            or trace(nf, address, 80, table="filter", chain="OUTPUT" if src.local else "INPUT", src=src))


def test_one_redirect_per_range_and_for_the_node_and_a_drop_for_the_rest() -> None:
    def refuse() -> int:
        return 4999

    rules = portal_rules(lb(("203.0.113.0/24", "10.0.0.0/8")), 4001, refuse)
    head = f"-d {LB_IP}/32 -p tcp -m comment --comment ns/web"
    assert rules.nat == (
        f"-A {CHAIN} -s 203.0.113.0/24 {head} -m tcp --dport 80 -j REDIRECT --to-ports 4001",
        f"-A {CHAIN} -s 10.0.0.0/8 {head} -m tcp --dport 80 -j REDIRECT --to-ports 4001",
        f"-A {CHAIN} {head} -m addrtype --src-type LOCAL -m tcp --dport 80 -j REDIRECT --to-ports 4001",
    )
    assert rules.drop == f"-A {FIREWALL} {head} -m tcp --dport 80 -j DROP"
    assert portal_rules(lb(None), 4001, refuse).nat == (
        f"-A {CHAIN} {head} -m tcp --dport 80 -j REDIRECT --to-ports 4001",)
    assert portal_rules(lb(None), 4001, refuse).drop == ""
    none = portal_rules(lb(weights=(0,)), 4001, refuse)  # no endpoint: every client refused
    assert none.nat == (f"-A {CHAIN} {head} -m tcp --dport 80 -j REDIRECT --to-ports 4999",) and not none.drop


async def test_only_the_ranges_and_the_node_reach_the_listener(env: tuple[FakeNetfilter, UserspaceProxier]
                                                               ) -> None:
    nf, p = env
    await ok(p, make_table([lb(), lb((), address="198.51.100.4", owner="ns/closed"),
                            lb(address="198.51.100.5", weights=(0,), owner="ns/empty")]))
    listener = where(nf, IN_RANGE)
    assert len(listener) == 1 and next(iter(listener)).startswith("redirect:")
    assert where(nf, NODE) == listener
    assert where(nf, OUTSIDE) == {"drop"}
    assert trace(nf, LB_IP, 80, table="filter", chain="FORWARD", src=OUTSIDE) == {"drop"}  # not the node's IP
    assert trace(nf, LB_IP, 443, table="filter", chain="FORWARD", src=OUTSIDE) == set()  # another port
    closed = where(nf, NODE, "198.51.100.4")
    assert where(nf, IN_RANGE, "198.51.100.4") == {"drop"} and closed != listener and closed
    refused = where(nf, OUTSIDE, "198.51.100.5")
    assert refused == where(nf, IN_RANGE, "198.51.100.5") and refused not in (listener, closed)
    assert {j.line for j in FILTER_JUMPS} <= nf.jumps("filter")
    assert nf.rules("nat", CHAIN)[-1] == NODEPORTS_JUMP


async def test_partial_syncs_add_change_and_lift_the_filter(env: tuple[FakeNetfilter, UserspaceProxier]
                                                            ) -> None:
    nf, p = env
    await ok(p, make_table([lb(None), lb(None, address="198.51.100.9", owner="ns/other")]))
    listener = where(nf, OUTSIDE)
    result = await ok(p, make_table([lb(), lb(None, address="198.51.100.9", owner="ns/other")]), {"ns/web"})
    assert result.operations == {"update_virtual_server": 1}  # the listener stays
    assert where(nf, OUTSIDE) == {"drop"} and where(nf, IN_RANGE) == where(nf, NODE) == listener
    await ok(p, make_table([lb(("192.0.2.0/24",)), lb(None, address="198.51.100.9", owner="ns/other")]),
             {"ns/web"})
    assert where(nf, OUTSIDE) == listener and where(nf, IN_RANGE) == {"drop"}
    assert nf.rules("nat", CHAIN)[-1] == NODEPORTS_JUMP and len(nf.rules("filter", FIREWALL)) == 1
    # A full sync writes what the partial ones left.
    before = (nf.rules("nat", CHAIN), nf.rules("filter", FIREWALL))
    await ok(p, make_table([lb(("192.0.2.0/24",)), lb(None, address="198.51.100.9", owner="ns/other")]))
    assert (nf.rules("nat", CHAIN), nf.rules("filter", FIREWALL)) == before
    await ok(p, make_table([lb(None), lb(None, address="198.51.100.9", owner="ns/other")]), {"ns/web"})
    assert where(nf, IN_RANGE) == listener and nf.rules("filter", FIREWALL) == []
    assert len(nf.rules("nat", CHAIN)) == 3
    await ok(p, make_table([lb(None, address="198.51.100.9", owner="ns/other")]), {"ns/web"})
    assert len(nf.rules("nat", CHAIN)) == 2


async def test_ipv6_ranges_filter_in_ip6tables_and_cleanup_removes_the_filter_chain(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    await ok(p, make_table([lb(), lb(("2001:db8:1::/48",), address=LB_IP6, owner="ns/six")]))
    nf6 = nf.family(True)
    assert where(nf6, Source("2001:db8:1::9"), LB_IP6) != {"drop"}
    assert where(nf6, Source("2001:db8:2::9"), LB_IP6) == {"drop"}
    assert where(nf, OUTSIDE) == {"drop"}
    assert (await p.cleanup()).ok
    assert "SVCPROXY" not in nf.save() and "SVCPROXY" not in nf6.save()
