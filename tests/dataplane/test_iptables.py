"""iptables mode on the host kernel: real traffic from a client netns through the node netns."""

from __future__ import annotations

import asyncio
from collections import Counter

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by
from svcproxy_lab.topology import Topology, in_ns

VIP = "10.96.5.10"


def proxier(topo: Topology) -> IptablesProxier:
    return IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))


def svc(topo: Topology, *, port: int = 80, persistence: int = 0, weights: tuple[int, ...] = (1, 1, 1),
        owner: str = "ns/web", protocol: str = "TCP") -> VirtualServer:
    reals = [RealServer(a, 8080, w) for a, w in zip(topo.backends, weights, strict=False)]
    return VirtualServer.create(protocol, VIP, port, reals, persistence=persistence,  # type: ignore[arg-type]
                                owner=owner)


def saved(topo: Topology) -> str:
    return in_ns(topo.node, "iptables-save", "-t", "nat").stdout


def test_even_spread_over_ready_endpoints(topo: Topology) -> None:
    p = proxier(topo)
    result = asyncio.run(p.sync(make_table([svc(topo)])))
    assert result.ok, result.errors
    counts = Counter(topo.ask(VIP, 80, 150))
    assert set(counts) == {"be0", "be1", "be2"}, counts
    assert min(counts.values()) >= 25, counts  # 50 expected each; random, generous bound
    udp = asyncio.run(p.sync(make_table([svc(topo, protocol="UDP", port=53)])))
    assert udp.ok
    assert set(topo.ask(VIP, 53, 60, udp=True)) == {"be0", "be1", "be2"}
    asyncio.run(p.cleanup())


def test_client_ip_affinity_pins_the_client(topo: Topology) -> None:
    p = proxier(topo)
    asyncio.run(p.sync(make_table([svc(topo, persistence=600)])))
    names = topo.ask(VIP, 80, 30)
    assert len(set(names)) == 1 and names[0] != "-", names
    asyncio.run(p.cleanup())


def test_draining_endpoint_takes_no_new_connections(topo: Topology) -> None:
    p = proxier(topo)
    asyncio.run(p.sync(make_table([svc(topo, weights=(1, 0, 1))])))
    counts = Counter(topo.ask(VIP, 80, 60))
    assert set(counts) == {"be0", "be2"}, counts
    asyncio.run(p.cleanup())


def test_foreign_rule_and_chain_survive_every_sync_and_cleanup(topo: Topology) -> None:
    in_ns(topo.node, "iptables", "-t", "nat", "-N", "FOREIGN-CHAIN")
    in_ns(topo.node, "iptables", "-t", "nat", "-A", "FOREIGN-CHAIN", "-d", "192.0.2.1/32", "-j", "RETURN")
    in_ns(topo.node, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "192.0.2.2/32", "-j", "FOREIGN-CHAIN")
    in_ns(topo.node, "iptables", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.3/32", "-j", "ACCEPT")

    def foreign() -> list[str]:
        text = in_ns(topo.node, "iptables-save").stdout
        return [line for line in text.splitlines() if "192.0.2." in line or "FOREIGN" in line]

    before = foreign()
    assert len(before) == 4
    p = proxier(topo)
    a, b = svc(topo), svc(topo, port=81, owner="ns/other")
    asyncio.run(p.sync(make_table([a, b])))
    assert foreign() == before
    asyncio.run(p.sync(owned_by(make_table([a]), {"ns/other"}), frozenset({"ns/other"})))
    assert foreign() == before
    asyncio.run(p.sync(make_table([a])))
    assert foreign() == before
    asyncio.run(p.cleanup())
    assert foreign() == before
    assert "SVCPROXY" not in saved(topo)


def test_partial_sync_rewrites_only_the_changed_service(topo: Topology) -> None:
    p = proxier(topo)
    a, b = svc(topo), svc(topo, port=81, owner="ns/other")
    asyncio.run(p.sync(make_table([a, b])))
    chain_b = rules.service_chain(b.key)
    # Zero the packet counters of b's chain by reading them; then change a only.
    before_b = [line for line in saved(topo).splitlines() if chain_b in line]
    changed = svc(topo, weights=(1, 1, 0))
    result = asyncio.run(p.sync(make_table([changed]), frozenset({"ns/web"})))
    assert result.ok and result.operations == {"update_virtual_server": 1}
    after = saved(topo)
    assert [line for line in after.splitlines() if chain_b in line] == before_b
    assert Counter(topo.ask(VIP, 80, 40)).keys() == {"be0", "be1"}
    assert set(topo.ask(VIP, 81, 30)) == {"be0", "be1", "be2"}
    # Withdraw b alone: its chains go, a keeps working.
    asyncio.run(p.sync({}, frozenset({"ns/other"})))
    assert chain_b not in saved(topo)
    assert set(topo.ask(VIP, 81, 3)) == {"-"}
    assert set(topo.ask(VIP, 80, 10)) <= {"be0", "be1"}
    asyncio.run(p.cleanup())


def test_restarted_proxier_keeps_traffic_and_adopts_rules(topo: Topology) -> None:
    a = svc(topo)
    asyncio.run(proxier(topo).sync(make_table([a])))
    restarted = proxier(topo)
    result = asyncio.run(restarted.sync(make_table([a])))
    assert result.ok
    assert "-" not in topo.ask(VIP, 80, 20)
    asyncio.run(restarted.cleanup())


def test_full_sync_in_batches_keeps_one_jump_per_service(topo: Topology, monkeypatch: object) -> None:
    import pytest

    from svcproxy.dataplane.iptables import proxier as mod

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(mod, "NFT_BATCH", 2)  # 5 services -> 3 iptables-restore inputs
    servers = [svc(topo, port=80 + i, owner=f"ns/s{i}") for i in range(5)]
    stale = svc(topo, port=90, owner="ns/gone")
    p = proxier(topo)
    assert asyncio.run(p.sync(make_table([*servers, stale]))).ok

    def services_jumps() -> list[str]:
        return [line for line in saved(topo).splitlines() if line.startswith(f"-A {rules.SERVICES} ")]

    assert len(services_jumps()) == 6
    # A restarted agent's full sync: same rules, nothing doubled, the stale service swept.
    restarted = proxier(topo)
    result = asyncio.run(restarted.sync(make_table(servers)))
    assert result.ok, result.errors
    assert sorted(map(rules.same_rule, services_jumps())) == sorted(
        rules.same_rule(rules.service_jump(v)) for v in servers
    )
    text = saved(topo)
    assert not any(c in text for c in rules.chains_of(stale))
    for i in range(5):
        assert set(topo.ask(VIP, 80 + i, 6)) <= {"be0", "be1", "be2"}
    assert set(topo.ask(VIP, 90, 2)) == {"-"}
    asyncio.run(restarted.cleanup())


def test_service_without_ready_endpoints_refuses_connections(topo: Topology) -> None:
    topo.route_services_nowhere()
    p = proxier(topo)
    empty = svc(topo, weights=())
    other = svc(topo, port=81, owner="ns/other")
    assert asyncio.run(p.sync(make_table([empty, other]))).ok
    assert topo.connect_error(VIP, 80) == "ECONNREFUSED"
    assert topo.connect_error(VIP, 81) == "connected"
    # Endpoints come (a partial sync): served; all drain away: refused again.
    assert asyncio.run(p.sync(make_table([svc(topo)]), frozenset({"ns/web"}))).ok
    assert topo.connect_error(VIP, 80) == "connected"
    drained = svc(topo, weights=(0, 0, 0))
    assert asyncio.run(p.sync(make_table([drained]), frozenset({"ns/web"}))).ok
    assert topo.connect_error(VIP, 80) == "ECONNREFUSED"
    # A restarted agent (full sync) keeps refusing; cleanup removes the filter chain.
    restarted = proxier(topo)
    assert asyncio.run(restarted.sync(make_table([drained, other]))).ok
    assert topo.connect_error(VIP, 80) == "ECONNREFUSED"
    asyncio.run(restarted.cleanup())
    assert rules.NO_ENDPOINTS not in in_ns(topo.node, "iptables-save", "-t", "filter").stdout
