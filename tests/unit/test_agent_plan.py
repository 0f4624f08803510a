"""The agent's sync plan (svcproxy.agent.plan): which mode gets which owners, what moves
between modes, who claims a contested key, and what each mode holds afterwards."""

from __future__ import annotations

from svcproxy.agent.plan import Holdings, Placement, SyncPlan, SyncStep, plan_sync
from svcproxy.dataplane.table import RealServer, VirtualServer

MODES = frozenset({"iptables", "userspace", "ipvs"})


def vs(owner: str, vip: str = "10.96.0.10", port: int = 80) -> VirtualServer:
    return VirtualServer.create("TCP", vip, port, [RealServer("10.244.1.5", 8080)], owner=owner)


def at(mode: str, *servers: VirtualServer) -> Placement:
    return {mode: {s.key: s for s in servers}}


def plan(owners: set[str], routed: dict[str, Placement], holdings: Holdings | None = None, *,
         full: bool = False, conflicted: frozenset[str] = frozenset(), live: set[str] | None = None,
         modes: frozenset[str] = MODES) -> SyncPlan:
    return plan_sync(full=full, owners=owners, routed=routed, holdings=holdings or Holdings(),
                     live=live if live is not None else set(routed), conflicted=conflicted,
                     proxier_modes=modes)


def test_a_new_owner_goes_to_its_mode_only() -> None:
    a = vs("ns/a")
    p = plan({"ns/a"}, {"ns/a": at("ipvs", a)})
    assert p.modes == ("iptables", "userspace", "ipvs")
    assert p.make("iptables") is None and p.make("userspace") is None
    assert p.make("ipvs") == SyncStep("ipvs", {a.key: a}, frozenset({"ns/a"}), frozenset({"ns/a"}))
    assert p.moving == {} and p.withdrawals(set()) == []
    assert p.claims == {"ipvs": {a.key: "ns/a"}}


def test_a_mode_change_keeps_the_old_mode_until_the_new_one_holds_it() -> None:
    a = vs("ns/a")
    holdings = Holdings()
    holdings.hold("ns/a", at("iptables", a))
    holdings.claim("ns/a", at("iptables", a))
    p = plan({"ns/a"}, {"ns/a": at("userspace", a)}, holdings)
    assert p.moving == {"iptables": {"ns/a": {a.key: a}}}
    # Phase 1: iptables still gets the key, userspace gets it too.
    assert p.make("iptables") == SyncStep("iptables", {a.key: a}, frozenset({"ns/a"}), frozenset({"ns/a"}))
    assert p.make("userspace") == SyncStep("userspace", {a.key: a}, frozenset({"ns/a"}), frozenset({"ns/a"}))
    # Phase 2 withdraws it from iptables, unless the make failed.
    assert p.withdrawals(set()) == [SyncStep("iptables", {}, frozenset({"ns/a"}), frozenset({"ns/a"}))]
    assert p.withdrawals({"ns/a"}) == []
    # What the modes hold afterwards.
    assert p.held("ns/a", {"iptables", "userspace"}, withdrawn=True) == at("userspace", a)
    assert p.held("ns/a", {"iptables"}, withdrawn=False) == {**at("iptables", a)}
    assert p.held("ns/a", {"iptables", "userspace"}, withdrawn=False) == {**at("iptables", a),
                                                                          **at("userspace", a)}
    assert p.held("ns/a", set(), withdrawn=False) == at("iptables", a)  # unknown: as before


def test_a_key_held_by_a_live_owner_is_refused_and_a_released_one_unblocks() -> None:
    a, b = vs("ns/a"), vs("ns/b")
    holdings = Holdings()
    holdings.hold("ns/a", at("iptables", a))
    holdings.claim("ns/a", at("iptables", a))
    refused = plan({"ns/b"}, {"ns/b": at("iptables", b)}, holdings, live={"ns/a", "ns/b"})
    assert refused.new == {"ns/b": {}}
    assert "already programmed by ns/a" in refused.conflicts["ns/b"]
    assert refused.conflicted == {"ns/b"} and refused.unblock == frozenset()
    holdings.apply(refused.claims)
    assert holdings.key_owner["iptables"] == {a.key: "ns/a"}
    # a is deleted: its key is released and b, refused before, is due again.
    freed = plan({"ns/a"}, {}, holdings, live={"ns/b"}, conflicted=frozenset({"ns/b"}))
    assert freed.new == {"ns/a": {}} and freed.unblock == {"ns/b"}
    assert freed.make("iptables") == SyncStep("iptables", {}, frozenset({"ns/a"}), frozenset({"ns/a"}))
    holdings.apply(freed.claims)
    assert holdings.key_owner["iptables"] == {}


def test_within_one_batch_the_first_owner_in_order_keeps_a_contested_key() -> None:
    a, b = vs("ns/a"), vs("ns/b")
    p = plan({"ns/b", "ns/a"}, {"ns/a": at("iptables", a), "ns/b": at("iptables", b)})
    assert p.new == {"ns/a": at("iptables", a), "ns/b": {}}
    assert set(p.conflicts) == {"ns/b"}


def test_a_full_plan_visits_every_mode_with_a_proxier_and_skips_empty_absent_ones() -> None:
    a = vs("ns/a")
    p = plan({"ns/a"}, {"ns/a": at("iptables", a)}, full=True, modes=frozenset({"iptables", "ipvs"}))
    assert p.modes == ("iptables", "ipvs")
    assert p.make("ipvs") == SyncStep("ipvs", {}, None, frozenset())  # sweeps whatever it owns
    assert p.make("userspace") is None
    # ipvs wanted where no ipvs proxier exists: still planned, the executor reports it.
    b = vs("ns/b", "10.96.0.11")
    q = plan({"ns/b"}, {"ns/b": at("ipvs", b)}, modes=frozenset({"iptables"}))
    assert q.modes == ("iptables", "ipvs") and q.make("ipvs") is not None


def test_taken_over_owners_continue_from_what_their_partial_sync_left() -> None:
    a, b = vs("ns/a"), vs("ns/b", "10.96.0.11")
    holdings = Holdings()
    for owner, s in (("ns/a", a), ("ns/b", b)):
        holdings.hold(owner, at("ipvs", s))
    p = plan({"ns/a", "ns/b"}, {"ns/a": at("iptables", a), "ns/b": at("iptables", b)}, holdings,
             full=True)
    assert set(p.moving["ipvs"]) == {"ns/a", "ns/b"}
    # A partial sync moved a back to ipvs meanwhile.
    q = p.taken_over({"ns/a"}, {"ns/a": at("ipvs", a)})
    assert q.new["ns/a"] == q.old["ns/a"] == at("ipvs", a)
    assert set(q.moving["ipvs"]) == {"ns/b"}
    ipvs = q.make("ipvs")
    assert ipvs is not None and ipvs.desired == {a.key: a, b.key: b}
    assert [s.owners for s in q.withdrawals(set())] == [frozenset({"ns/b"})]
    assert p.taken_over(set(), {}) is p
