"""The iptables mode's loadBalancerSourceRanges: the exact firewall chain (rules.py),
connections traced by their source through the in-memory netfilter (the ranges and the
node pass, everyone else is dropped, REJECT for all with no endpoint), with
externalTrafficPolicy Local behind it, partial syncs that add and lift the filter, a
steady full sync that writes nothing, drift repaired, and IPv6 in ip6tables."""

from __future__ import annotations

from nftrace import Source, trace
from proxierkit import iptables_on_fake, sync_ok

from svcproxy.base import IPFamily
from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.table import LocalPolicy, RealServer, SourceRanges, VirtualServer, make_table

LB_IP, LB_IP6 = "198.51.100.3", "2001:db8::3"
NODE_IP = "172.29.0.11"
CIDRS = ("10.244.0.0/16", "fd00:244::/56")
BACKENDS = ("10.244.1.2", "10.244.2.2")
BACKENDS6 = ("fd00:244::2", "fd00:244::3")
IN_RANGE, OUTSIDE = Source("203.0.113.9"), Source("192.0.2.200")
POD, NODE = Source("10.244.1.9"), Source(NODE_IP, local=True)


def lb(ranges: SourceRanges = ("203.0.113.0/24",), *, address: str = LB_IP, policy: LocalPolicy = "",
       reals: tuple[str, ...] = BACKENDS, owner: str = "ns/web") -> VirtualServer:
    return VirtualServer.create("TCP", address, 80, [RealServer(a, 8080, local=a == BACKENDS[0])
                                                     for a in reals],
                                owner=owner, local_policy=policy, source_ranges=ranges)


def both(reals: tuple[str, ...] = BACKENDS) -> set[str]:
    return {f"{IPFamily.bracketed(a)}:8080" for a in reals}


def where(nf: FakeNetfilter, src: Source, address: str = LB_IP) -> set[str]:
    """Where a new connection from ``src`` ends: DNAT targets, else the filter's verdict."""
    chain = "OUTPUT" if src.local else "PREROUTING"
    nat = trace(nf, address, 80, chain=chain, src=src) - {"masq"}
    return nat or trace(nf, address, 80, table="filter", chain="OUTPUT" if src.local else "FORWARD", src=src)


def test_the_firewall_chain_sits_between_the_jump_and_the_service_chain() -> None:
    v = lb(("203.0.113.0/24", "10.0.0.0/8"))
    svc, fw = rules.service_chain(v.key), rules.firewall_chain(v.key)
    assert fw.startswith("SVCPROXY-FWL-") and len(fw) == len(svc) <= 28
    assert rules.chains_of(v)[:2] == [svc, fw]
    assert rules.service_jump(v) == (
        f"-A SVCPROXY-SERVICES -d {LB_IP}/32 -p tcp -m comment --comment ns/web -m tcp --dport 80 -j {fw}")
    written = rules.service_rules(v, CIDRS, False)
    assert [r for r in written if r.startswith(f"-A {fw} ")] == [
        f"-A {fw} -s 203.0.113.0/24 -j {svc}",
        f"-A {fw} -s 10.0.0.0/8 -j {svc}",
        f"-A {fw} -m addrtype --src-type LOCAL -j {svc}",
    ]
    unfiltered = rules.service_rules(lb(None), CIDRS, False)
    assert [r for r in written if not r.startswith(f"-A {fw} ")] == unfiltered
    assert rules.reject_rule(v) == (
        f"-A SVCPROXY-NO-ENDPOINTS -d {LB_IP}/32 -p tcp -m comment --comment ns/web -m tcp --dport 80"
        " -j DROP")
    assert rules.rule_count(v, CIDRS, False) == 2 + len(written)
    assert rules.reject_rule(lb(reals=())).endswith("-j REJECT --reject-with icmp-port-unreachable")
    assert rules.reject_rule(lb(None)) is None and rules.service_jump(lb(None)).endswith(svc)


def test_only_the_ranges_and_the_node_reach_the_endpoints() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([lb(), lb((), address="198.51.100.4", owner="ns/closed"),
                           lb(address="198.51.100.5", reals=(), owner="ns/empty")]))
    assert where(nf, IN_RANGE) == both()
    assert trace(nf, LB_IP, 80, src=IN_RANGE) == both() | {"masq"}  # not a Pod: masqueraded
    assert where(nf, OUTSIDE) == {"drop"} and where(nf, POD) == {"drop"}  # Pods too, as kube-proxy
    assert where(nf, NODE) == both()
    # An LB IP that is one of the node's addresses: dropped on INPUT.
    assert trace(nf, LB_IP, 80, table="filter", chain="INPUT", src=OUTSIDE) == {"drop"}
    # No range of the family: the node only. No endpoint: REJECT for every client.
    assert where(nf, IN_RANGE, "198.51.100.4") == {"drop"} and where(nf, NODE, "198.51.100.4") == both()
    assert where(nf, OUTSIDE, "198.51.100.5") == where(nf, IN_RANGE, "198.51.100.5") == {"reject"}
    # Not the ClusterIP, nor another port of the LB IP.
    assert trace(nf, LB_IP, 443, table="filter", chain="FORWARD", src=OUTSIDE) == set()
    sync_ok(p, make_table([lb(), lb((), address="198.51.100.4", owner="ns/closed"),
                           lb(address="198.51.100.5", reals=(), owner="ns/empty")]))
    assert p.last_full.restores == 0  # the firewall chains read back as written


def test_external_local_behind_the_firewall() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([lb(policy="external"), lb(policy="external", address="198.51.100.4",
                                                     reals=("10.244.2.2",), owner="ns/none-here")]))
    assert trace(nf, LB_IP, 80, src=IN_RANGE) == {"10.244.1.2:8080"}  # local only, address kept
    assert where(nf, OUTSIDE) == {"drop"} and where(nf, POD) == {"drop"}
    assert where(nf, NODE) == both()
    # Ready endpoints elsewhere only: a client in range is dropped too, as kube-proxy.
    assert where(nf, IN_RANGE, "198.51.100.4") == {"drop"}
    assert where(nf, NODE, "198.51.100.4") == {"10.244.2.2:8080"}


def test_partial_syncs_add_and_lift_the_filter_and_full_syncs_repair_it() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([lb(None)]))
    assert where(nf, OUTSIDE) == both()
    sync_ok(p, make_table([lb()]), {"ns/web"})  # ranges set: the jump moves to the firewall
    assert where(nf, OUTSIDE) == {"drop"} and where(nf, IN_RANGE) == both()
    assert len(nf.rules("nat", rules.SERVICES)) == 1
    sync_ok(p, make_table([lb(("192.0.2.0/24",))]), {"ns/web"})  # other ranges
    assert where(nf, OUTSIDE) == both() and where(nf, IN_RANGE) == {"drop"}
    sync_ok(p, make_table([lb(("192.0.2.0/24",))]))
    assert p.last_full.restores == 0
    sync_ok(p, make_table([lb()]), {"ns/web"})
    fw = rules.firewall_chain(lb().key)
    nf.tables["nat"][fw].rules.clear()  # drift by hand: nobody passes
    sync_ok(p, make_table([lb()]))
    assert p.last_full.dirty_services == 1 and where(nf, IN_RANGE) == both()
    sync_ok(p, make_table([lb(None)]), {"ns/web"})  # lifted: chain and filter rule gone
    assert where(nf, OUTSIDE) == both() and fw not in nf.tables["nat"]
    assert nf.rules("filter", rules.NO_ENDPOINTS) == []
    sync_ok(p, make_table([lb(None)]))
    assert p.last_full.restores == 0


def test_a_full_sync_adds_and_lifts_the_filter_too() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([lb(None)]))
    sync_ok(p, make_table([lb()]))
    assert where(nf, OUTSIDE) == {"drop"} and where(nf, IN_RANGE) == both()
    assert len(nf.rules("nat", rules.SERVICES)) == 1
    sync_ok(p, make_table([lb(None)]))
    assert where(nf, OUTSIDE) == both() and not any(c.startswith("SVCPROXY-FWL-") for c in nf.tables["nat"])


def test_ipv6_ranges_filter_in_ip6tables() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([lb(("2001:db8:1::/48",), address=LB_IP6, reals=BACKENDS6)]))
    nf6 = nf.family(True)
    assert trace(nf6, LB_IP6, 80, src=Source("2001:db8:1::9")) == both(BACKENDS6) | {"masq"}
    assert trace(nf6, LB_IP6, 80, src=Source("2001:db8:2::9")) == set()
    assert trace(nf6, LB_IP6, 80, table="filter", chain="FORWARD", src=Source("2001:db8:2::9")) == {"drop"}
    assert "SVCPROXY-FWL-" not in nf.save()
