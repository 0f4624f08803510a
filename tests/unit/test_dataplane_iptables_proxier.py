"""The iptables proxier on the in-memory netfilter: connections traced through the rules
it leaves, drift repaired by full syncs only, foreign rules untouched, restart adoption,
no-endpoint rejects, a node without iptables. The same proxier on the real kernel:
tests/dataplane/test_iptables*.py."""

from __future__ import annotations

import asyncio

from nftrace import trace
from proxierkit import iptables_on_fake, sync_ok

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.proxier import ModeUnavailableError
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by

VIP = "10.96.5.10"
BACKENDS = ("10.244.1.2", "10.244.1.3", "10.244.1.4")


def svc(port: int = 80, weights: tuple[int, ...] = (1, 1, 1), owner: str = "ns/web",
        persistence: int = 0) -> VirtualServer:
    reals = [RealServer(a, 8080, w) for a, w in zip(BACKENDS, weights, strict=False)]
    return VirtualServer.create("TCP", VIP, port, reals, persistence=persistence, owner=owner)


def dests(*indexes: int) -> set[str]:
    return {f"{BACKENDS[i]}:8080" for i in indexes}




def test_connections_go_to_ready_endpoints_from_outside_and_from_the_node() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([svc(), svc(81, (1, 0, 1), "ns/drain"), svc(82, persistence=600, owner="ns/s")]))
    for chain in ("PREROUTING", "OUTPUT"):
        assert trace(nf, VIP, 80, chain=chain) == dests(0, 1, 2)
    assert trace(nf, VIP, 81) == dests(0, 2)  # draining: no new connections
    assert trace(nf, VIP, 82) == dests(0, 1, 2)
    assert trace(nf, VIP, 83) == set() and trace(nf, VIP, 80, "udp") == set()


def test_a_partial_sync_rewrites_only_the_changed_service() -> None:
    nf, p = iptables_on_fake()
    a, b = svc(), svc(81, owner="ns/other")
    sync_ok(p, make_table([a, b]))
    chain_b = rules.service_chain(b.key)
    before_b = nf.chains("nat", chain_b)
    sync_ok(p, make_table([svc(weights=(1, 1, 0))]), {"ns/web"})
    assert trace(nf, VIP, 80) == dests(0, 1)
    assert nf.chains("nat", chain_b) == before_b
    sync_ok(p, {}, {"ns/other"})  # withdrawn: its chains go, a keeps working
    assert trace(nf, VIP, 81) == set()
    assert not any(c in nf.save() for c in rules.chains_of(b))
    assert trace(nf, VIP, 80) == dests(0, 1)


def test_drift_is_repaired_by_the_next_full_sync_only_and_then_nothing_is_written() -> None:
    nf, p = iptables_on_fake()
    table = make_table([svc(), svc(81, owner="ns/other")])
    sync_ok(p, table)
    commits = nf.commits
    sync_ok(p, table)  # steady: reads, writes nothing
    assert nf.commits == commits and p.last_full.restores == 0
    svc_chain = rules.service_chain(svc().key)
    nf.tables["nat"][svc_chain].rules.pop(0)  # by hand: the first endpoint's branch and the mark
    nf.tables["nat"][svc_chain].rules.pop(0)
    assert trace(nf, VIP, 80) == dests(1, 2)
    sync_ok(p, owned_by(table, {"ns/other"}), {"ns/other"})  # a partial sync does not see it
    assert trace(nf, VIP, 80) == dests(1, 2)
    sync_ok(p, table)
    assert (p.last_full.dirty_services, p.last_full.restores) == (1, 1)
    assert trace(nf, VIP, 80) == dests(0, 1, 2)
    sync_ok(p, table)
    assert p.last_full.restores == 0


def test_foreign_chains_and_rules_survive_syncs_and_cleanup() -> None:
    nf, p = iptables_on_fake()
    nf.restore("*nat\n:FOREIGN - [0:0]\n-A FOREIGN -d 192.0.2.1/32 -j RETURN\n"
               "-A PREROUTING -d 192.0.2.2/32 -j FOREIGN\nCOMMIT\n"
               "*filter\n-A INPUT -s 192.0.2.3/32 -j ACCEPT\nCOMMIT\n")

    def foreign() -> list[str]:
        return [line for line in nf.save().splitlines() if "192.0.2." in line or "FOREIGN" in line]

    before = foreign()
    sync_ok(p, make_table([svc(), svc(81, owner="ns/other")]))
    sync_ok(p, {}, {"ns/other"})
    sync_ok(p, make_table([svc()]))
    assert foreign() == before
    assert asyncio.run(p.cleanup()).ok
    assert foreign() == before
    assert "SVCPROXY" not in nf.save()


def test_a_restarted_proxier_adopts_the_rules_and_rewrites_them_once() -> None:
    nf, p = iptables_on_fake()
    table = make_table([svc(), svc(81, owner="ns/other")])
    sync_ok(p, table)
    saved = nf.save()
    restarted = IptablesProxier(nf, nf.family(True))
    sync_ok(restarted, table)
    assert restarted.last_full.rewrite_all and nf.save() == saved  # the same rules, written again
    sync_ok(restarted, table)
    assert restarted.last_full.restores == 0


def test_a_partial_sync_first_after_a_restart_adopts_without_flushing() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([svc(), svc(81, owner="ns/other")]))
    restarted = IptablesProxier(nf, nf.family(True))
    sync_ok(restarted, make_table([svc(weights=(0, 1, 1))]), {"ns/web"})
    assert trace(nf, VIP, 80) == dests(1, 2)
    assert trace(nf, VIP, 81) == dests(0, 1, 2)
    assert sum(line.startswith(f"-A {rules.SERVICES} ") for line in nf.save().splitlines()) == 2


def test_a_service_without_ready_endpoints_is_rejected_until_one_comes() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([svc(weights=()), svc(81, owner="ns/other")]))
    for chain in ("INPUT", "FORWARD", "OUTPUT"):
        assert trace(nf, VIP, 80, table="filter", chain=chain) == {"reject"}
    assert trace(nf, VIP, 81, table="filter", chain="INPUT") == set()
    sync_ok(p, make_table([svc()]), {"ns/web"})
    assert trace(nf, VIP, 80, table="filter", chain="INPUT") == set()
    assert trace(nf, VIP, 80) == dests(0, 1, 2)
    sync_ok(p, make_table([svc(weights=(0, 0, 0))]), {"ns/web"})
    assert trace(nf, VIP, 80, table="filter", chain="INPUT") == {"reject"}
    assert asyncio.run(p.cleanup()).ok
    assert rules.NO_ENDPOINTS not in nf.save()


def test_ipv6_services_go_to_ip6tables_only() -> None:
    nf, p = iptables_on_fake()
    six = VirtualServer.create("TCP", "fd00:96::10", 80, [RealServer("fd00:244::2", 8080)], owner="ns/six")
    sync_ok(p, make_table([svc(), six]))
    assert trace(nf.family(True), "fd00:96::10", 80) == {"[fd00:244::2]:8080"}
    assert trace(nf, "fd00:96::10", 80) == set() and trace(nf.family(True), VIP, 80) == set()


def test_a_node_without_iptables_reports_why_and_programs_nothing() -> None:
    nf = FakeNetfilter(backend="", reason="iptables-restore is not installed")
    p = IptablesProxier(nf, nf.family(True))
    caps = p.capabilities()
    assert not caps.available and "not installed" in caps.reason
    result = asyncio.run(p.sync(make_table([svc()])))
    assert result.failed_owners == {"ns/web"}
    assert any(isinstance(e, ModeUnavailableError) for e in result.errors)
    assert nf.tables == {}


def test_a_refused_restore_is_an_error_to_retry_and_leaves_the_rules() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([svc()]))
    saved = nf.save()
    nf.restore("*nat\n:FOREIGN - [0:0]\n-A FOREIGN -j " + rules.service_chain(svc().key) + "\nCOMMIT\n")
    result = asyncio.run(p.sync({}, frozenset({"ns/web"})))  # its chain is jumped to: -X refused
    assert result.failed_owners == {"ns/web"} and not result.ok
    assert [line for line in nf.save().splitlines() if "FOREIGN" not in line] == saved.splitlines()
