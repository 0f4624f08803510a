"""Partial syncs beside a full sync's read (svcproxy.agent.fullsync), against a fake
partial sync and fake time: what they start from, what they take over, what waits."""

from __future__ import annotations

import asyncio

from svcproxy.agent.fullsync import Beside, InFlight, between
from svcproxy.agent.plan import Holdings, Placement, SyncPlan, plan_sync
from svcproxy.agent.tracker import Batch, ChangeTracker
from svcproxy.dataplane.table import RealServer, VirtualServer

A = VirtualServer.create("TCP", "10.96.0.10", 80, [RealServer("10.244.1.5", 8080)], owner="ns/a")
B = VirtualServer.create("TCP", "10.96.0.11", 80, [RealServer("10.244.1.6", 8080)], owner="ns/b")


def at(mode: str, vs: VirtualServer) -> Placement:
    return {mode: {vs.key: vs}}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def full_plan(holdings: Holdings) -> SyncPlan:
    """a held in ipvs, moving to iptables; b new in iptables."""
    holdings.hold("ns/a", at("ipvs", A))
    holdings.claim("ns/a", at("ipvs", A))
    plan = plan_sync(full=True, owners={"ns/a", "ns/b"},
                     routed={"ns/a": at("iptables", A), "ns/b": at("iptables", B)},
                     holdings=holdings, live={"ns/a", "ns/b"}, conflicted=frozenset(),
                     proxier_modes={"iptables", "ipvs"})
    holdings.apply(plan.claims)
    return plan


def tracker_after_start(clock: Clock) -> ChangeTracker:
    tracker = ChangeTracker(min_interval=0.05, full_interval=60, now=clock())
    first = tracker.take(clock())
    assert first is not None and first.full
    return tracker


class Partial:
    """Stands in for the agent's partial sync: records what it was asked and what the
    mirror said at that point, applies the batch's new placement, ends the read."""

    def __init__(self, holdings: Holdings, until: asyncio.Future[None], now: dict[str, Placement]) -> None:
        self.holdings, self.until, self.now = holdings, until, now
        self.batches: list[Batch] = []
        self.started_from: list[dict[str, Placement]] = []

    async def __call__(self, batch: Batch) -> object:
        self.batches.append(batch)
        self.started_from.append({o: self.holdings.held(o) for o in batch.owners})
        for owner in batch.owners:
            self.holdings.hold(owner, self.now.get(owner, {}))
        if not self.until.done():
            self.until.set_result(None)
        return None


def test_mid_way_the_kernel_holds_the_new_placement_only_where_written_and_not_failed() -> None:
    holdings = Holdings()
    plan = full_plan(holdings)
    nothing_written = InFlight(plan, {})
    assert nothing_written.held("ns/a") == at("ipvs", A) and nothing_written.held("ns/b") == {}
    written = InFlight(plan, {"iptables": set()}, done={"iptables"})
    assert written.held("ns/a") == {**at("iptables", A), **at("ipvs", A)}  # not withdrawn yet
    assert written.held("ns/b") == at("iptables", B)
    failed = InFlight(plan, {"iptables": {"ns/a"}}, done={"iptables"})
    assert failed.held("ns/a") == at("ipvs", A) and failed.held("ns/b") == at("iptables", B)


async def test_a_change_due_during_the_read_syncs_from_what_the_kernel_holds_now() -> None:
    clock, holdings = Clock(), Holdings()
    plan = full_plan(holdings)
    inflight = InFlight(plan, {"iptables": set()}, done={"iptables"})
    tracker = tracker_after_start(clock)
    tracker.changed("ns/a", clock())
    clock.t = 0.1
    until: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    partial = Partial(holdings, until, {"ns/a": at("ipvs", A)})  # a goes back to ipvs
    touched = await between(inflight, until, Beside(tracker, clock, asyncio.Event(), holdings, partial))
    assert touched == {"ns/a"} and inflight.overtaken == {"ns/a"}
    assert partial.batches == [Batch(False, frozenset({"ns/a"}), {"ns/a": 0.0})]
    # It started from both modes (iptables written by this full sync, ipvs not yet) ...
    assert partial.started_from == [{"ns/a": {**at("iptables", A), **at("ipvs", A)}}]
    assert holdings.key_owner["iptables"][A.key] == "ns/a" and holdings.key_owner["ipvs"][A.key] == "ns/a"
    # ... and the rest of the full sync continues a from what the partial sync left.
    inflight.take_over(holdings)
    assert inflight.plan.new["ns/a"] == inflight.plan.old["ns/a"] == at("ipvs", A)
    assert inflight.plan.moving == {}
    assert inflight.plan.new["ns/b"] == at("iptables", B)


async def test_a_full_sync_asked_for_meanwhile_waits_for_this_one_to_end() -> None:
    clock, holdings = Clock(), Holdings()
    inflight = InFlight(full_plan(holdings), {})
    tracker = tracker_after_start(clock)
    tracker.request_full()
    clock.t = 0.1
    loop = asyncio.get_running_loop()
    until: asyncio.Future[None] = loop.create_future()
    partial = Partial(holdings, until, {})
    loop.call_soon(until.set_result, None)  # the read ends while between waits
    touched = await between(inflight, until, Beside(tracker, clock, asyncio.Event(), holdings, partial))
    assert touched == frozenset() and partial.batches == []
    clock.t = 1.0
    after = tracker.take(clock())
    assert after is not None and after.full


async def test_a_change_arriving_while_between_waits_wakes_it() -> None:
    clock, holdings = Clock(), Holdings()
    inflight = InFlight(full_plan(holdings), {})
    tracker = tracker_after_start(clock)
    wake = asyncio.Event()
    loop = asyncio.get_running_loop()
    until: asyncio.Future[None] = loop.create_future()
    partial = Partial(holdings, until, {"ns/c": at("iptables", B)})

    def change() -> None:  # what Agent.upsert does, for an owner the full sync does not know
        clock.t = 0.2
        tracker.changed("ns/c", clock())
        wake.set()

    loop.call_soon(change)
    started = loop.time()
    touched = await between(inflight, until, Beside(tracker, clock, wake, holdings, partial))
    assert loop.time() - started < 0.9  # woken, not by the 1 s poll
    assert touched == {"ns/c"} and holdings.held("ns/c") == at("iptables", B)
    assert partial.started_from == [{"ns/c": {}}]
