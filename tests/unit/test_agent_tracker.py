"""The change tracker: bursts coalesce, syncs are rate-bounded, full syncs come on time, and
the pause after a costly sync coalesces streams without delaying a lone change (fake time)."""

from __future__ import annotations

import asyncio
import itertools

from test_agent_fake import FakeKernel, FakeProxier

from svcproxy.agent.agent import Agent
from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.tracker import ChangeTracker
from svcproxy.dataplane.proxier import SyncResult
from svcproxy.dataplane.table import RealServer, Table, VirtualServer


def test_first_batch_is_full_and_bursts_coalesce() -> None:
    t = ChangeTracker(min_interval=0.1, full_interval=60, now=0.0)
    for i in range(100):
        t.changed(f"ns/s{i}", now=0.001 * i)
    batch = t.take(0.2)
    assert batch is not None and batch.full
    assert len(batch.owners) == 100
    assert batch.seen["ns/s0"] == 0.0
    assert t.take(0.25) is None  # nothing pending


def test_partial_batches_respect_min_interval() -> None:
    t = ChangeTracker(min_interval=0.1, full_interval=60, now=0.0)
    assert t.take(0.0) is not None  # initial full
    t.changed("ns/a", now=0.01)
    t.changed("ns/a", now=0.02)  # the older change time is kept
    t.changed("ns/b", now=0.03)
    assert t.due_at() == 0.1
    assert t.take(0.05) is None  # too soon after the last sync
    batch = t.take(0.1)
    assert batch is not None and not batch.full
    assert batch.owners == {"ns/a", "ns/b"}
    assert batch.seen["ns/a"] == 0.01


def test_full_sync_every_interval_leaves_pending_owners_to_partial_syncs() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, now=0.0)
    t.take(0.0)
    assert t.take(30) is None
    assert t.due_at() == 60
    t.changed("ns/a", now=59.99)
    batch = t.take(60)
    # The periodic full sync (seconds of read-back at 10k) does not swallow the pending
    # change: a partial sync takes it beside the full sync's read, at its own pace.
    assert batch is not None and batch.full and batch.owners == frozenset()
    assert t.pending == {"ns/a"} and t.due_at() == 60.05
    partial = t.take(60.05)
    assert partial is not None and not partial.full and partial.seen == {"ns/a": 59.99}
    assert t.due_at() == 120


def test_a_requested_full_sync_covers_pending_owners() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, now=0.0)
    t.take(0.0)
    t.changed("ns/a", now=10.0)
    t.request_full()  # e.g. after a sync crashed: trust nothing, sync everything
    batch = t.take(10.0)
    assert batch is not None and batch.full and batch.owners == {"ns/a"}
    assert not t.pending


def test_retry_comes_back_after_interval_with_original_seen_time() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, retry_interval=1.0, now=0.0)
    t.take(0.0)
    t.changed("ns/a", now=1.0)
    batch = t.take(1.1)
    assert batch is not None
    t.retry(["ns/a"], now=1.2, seen=batch.seen)
    assert t.take(1.5) is None
    again = t.take(2.2)
    assert again is not None and again.owners == {"ns/a"} and again.seen["ns/a"] == 1.0


def test_change_during_retry_wait_syncs_at_once() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, retry_interval=5.0, now=0.0)
    t.take(0.0)
    t.retry(["ns/a"], now=0.1, seen={"ns/a": 0.05})
    t.changed("ns/a", now=0.2)
    batch = t.take(0.3)
    assert batch is not None and batch.owners == {"ns/a"} and batch.seen["ns/a"] == 0.05


# ---- the pause after a costly sync (adaptive window) ------------------------------------


def stream(tracker: ChangeTracker, cost: float, *, count: int = 300, rate: float = 100.0,
           start: float = 1.0) -> list[tuple[float, float, int]]:
    """Drive ``tracker`` as the agent's sync loop would (fake time): ``count`` owners change
    one after another at ``rate`` per second, each partial sync takes ``cost`` seconds, and
    changes that arrive during a sync are the next one's. Returns (start, end, owners) per sync."""
    events = [(start + i / rate, f"ns/s{i}") for i in range(count)]
    t, i, syncs = start, 0, []
    while i < len(events) or tracker.pending:
        while i < len(events) and events[i][0] <= t:
            tracker.changed(events[i][1], events[i][0])
            i += 1
        due = tracker.due_at()
        if due > t:
            t = min(due, events[i][0]) if i < len(events) else due
            continue
        batch = tracker.take(t)
        assert batch is not None and not batch.full
        end = t + cost
        syncs.append((t, end, len(batch.owners)))
        tracker.synced(t, end, full=False)
        t = end
    return syncs


def started(min_interval: float = 0.05, **kw: float) -> ChangeTracker:
    t = ChangeTracker(min_interval=min_interval, full_interval=1e9, now=0.0, **kw)
    batch = t.take(0.0)  # the first (full) sync, cheap: the node starts empty
    assert batch is not None and batch.full
    t.synced(0.0, 0.01, full=True)
    return t


def test_a_stream_coalesces_into_fewer_syncs_as_each_sync_costs_more() -> None:
    counts = {cost: len(stream(started(), cost)) for cost in (0.01, 0.05, 0.2, 0.5)}
    assert counts[0.01] > counts[0.05] > counts[0.2] > counts[0.5]
    # The fixed window alone (pause off): the loop runs back to back, one sync per cost.
    fixed = {cost: len(stream(started(pause_ratio=0.0), cost)) for cost in (0.2, 0.5)}
    assert counts[0.2] < fixed[0.2] and counts[0.5] < fixed[0.5]


def test_the_pause_keeps_the_sync_loop_busy_at_most_half_the_time_at_ratio_one() -> None:
    syncs = stream(started(pause_ratio=1.0), 0.2)
    assert sum(n for _, _, n in syncs) == 300  # every change went out
    for (_, end, _), (nxt, _, _) in itertools.pairwise(syncs):
        assert nxt - end >= 0.2 - 1e-9  # a pause as long as the sync before it
    busy = sum(e - s for s, e, _ in syncs)
    assert busy <= 0.5 * (syncs[-1][1] - syncs[0][0]) + 0.2


def test_the_pause_is_capped() -> None:
    t = started(pause_ratio=1.0, max_pause=1.0)
    t.changed("ns/a", now=1.0)
    assert t.take(1.0) is not None
    t.synced(1.0, 6.0, full=False)  # a 5 s partial sync
    t.changed("ns/b", now=6.1)
    assert t.due_at() == 7.0  # 6.0 + max_pause, not 6.0 + 5
    assert t.take(6.9) is None
    assert t.take(7.0) is not None


def test_a_lone_change_after_idle_goes_at_once() -> None:
    t = started(pause_ratio=1.0)
    t.changed("ns/a", now=1.0)
    assert t.take(1.0) is not None
    t.synced(1.0, 1.3, full=False)  # costly: the next partial sync waits 0.3 s after it
    t.changed("ns/b", now=1.4)
    assert t.due_at() == 1.6  # within the pause: it waits
    assert t.take(1.6) is not None
    t.synced(1.6, 1.9, full=False)
    t.changed("ns/c", now=5.0)  # idle for longer than the pause
    assert t.due_at() <= 5.0
    batch = t.take(5.0)
    assert batch is not None and batch.owners == {"ns/c"}


def test_pause_ratio_zero_is_the_fixed_window() -> None:
    t = started(min_interval=0.05, pause_ratio=0.0)
    t.changed("ns/a", now=1.0)
    assert t.take(1.0) is not None
    t.synced(1.0, 1.3, full=False)
    t.changed("ns/b", now=1.3)
    # min_interval counts from the start of the last sync: due as soon as that one ended.
    assert t.due_at() == 1.3
    assert t.take(1.3) is not None


def test_full_syncs_are_not_held_by_the_pause_and_do_not_set_it() -> None:
    t = ChangeTracker(min_interval=0.05, pause_ratio=1.0, full_interval=60, now=0.0)
    assert t.take(0.0) is not None
    t.synced(0.0, 20.0, full=True)  # a long first full sync (10k Services)
    t.changed("ns/a", now=20.0)
    assert t.due_at() == 20.0  # its duration is no partial sync's cost
    assert t.take(20.0) is not None
    t.synced(20.0, 20.8, full=False)  # an 0.8 s partial sync: partial ones pause 0.8 s
    t.request_full()
    assert t.due_at() == 20.05  # a requested full sync only waits for min_interval
    batch = t.take(20.05)
    assert batch is not None and batch.full
    t.synced(20.05, 22.0, full=True)
    assert t.due_at() == 80.05  # the periodic one comes on time
    t.changed("ns/b", now=79.9)
    assert t.due_at() == 22.8  # 22.0 + the last partial sync's 0.8 s
    t.synced(79.0, 79.95, full=False)  # (a partial sync run inside a full one)
    assert t.due_at() == 80.05  # the periodic full sync is not pushed back by the pause
    batch = t.take(80.05)
    assert batch is not None and batch.full and t.pending == {"ns/b"}


def test_retries_come_back_on_their_interval_despite_the_pause() -> None:
    t = started(pause_ratio=1.0)
    t.changed("ns/a", now=1.0)
    batch = t.take(1.0)
    assert batch is not None
    t.synced(1.0, 1.4, full=False)
    t.retry(["ns/a"], now=1.4, seen=batch.seen)
    assert t.due_at() == 2.4  # retry_interval after the failure (the 0.4 s pause is shorter)
    assert t.take(2.3) is None
    again = t.take(2.4)
    assert again is not None and again.owners == {"ns/a"} and again.seen["ns/a"] == 1.0
    t.synced(2.4, 3.9, full=False)  # this attempt took 1.5 s (pause capped at 1 s) and failed
    t.retry(["ns/a"], now=3.9, seen=again.seen)
    assert t.due_at() == 4.9  # both end together here: retry 1 s after, pause 1 s after
    assert t.take(4.89) is None and t.take(4.9) is not None


class SlowProxier(FakeProxier):
    """The in-memory proxier whose every sync takes ``cost`` seconds of the fake clock."""

    def __init__(self, kernel: FakeKernel, clock: list[float], cost: float) -> None:
        super().__init__("iptables", kernel)
        self.clock, self.cost = clock, cost

    async def sync(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult:
        self.clock[0] += self.cost
        return await super().sync(desired, only)


def program(i: int, address: str) -> DesiredProgram:
    vs = VirtualServer.create("TCP", f"10.96.0.{i + 1}", 80, [RealServer(address, 8080)], owner=f"ns/s{i}")
    return DesiredProgram(vs.owner, address, {"iptables": (vs,)})


async def test_the_agent_paces_its_syncs_by_what_they_cost_and_the_kernel_gets_everything() -> None:
    kernel, clock = FakeKernel(), [100.0]
    agent = Agent({"iptables": SlowProxier(kernel, clock, 0.3)}, node_name="n", clock=lambda: clock[0],
                  wall=lambda: clock[0], tracker=ChangeTracker(min_interval=0.05, now=clock[0]))
    assert (await agent.run_due()) is not None  # the first full sync: 0.3 s
    assert agent.tracker.due_at() == 160.0  # nothing pending: the periodic full sync
    agent.upsert(program(0, "10.244.0.1"))
    assert agent.tracker.due_at() <= clock[0]  # a lone change after the full sync: at once
    outcome = await agent.run_due()
    assert outcome is not None and not outcome.batch.full
    end = clock[0]
    for i in range(1, 6):  # a burst right after that 0.3 s partial sync waits 0.3 s, then goes as one
        agent.upsert(program(i, "10.244.0.1"))
    assert agent.tracker.due_at() == end + 0.3
    assert await agent.run_due() is None
    clock[0] = end + 0.3
    outcome = await agent.run_due()
    assert outcome is not None and len(outcome.batch.owners) == 5
    assert {vs.owner for vs in kernel.table("iptables").values()} == {f"ns/s{i}" for i in range(6)}


def test_a_partial_sync_takes_at_most_max_batch_oldest_first_and_a_backlog_does_not_pause() -> None:
    t = started(pause_ratio=1.0, max_batch=3)
    for i in range(7):
        t.changed(f"ns/s{i}", now=1.0 + i * 0.001)
    t.changed("ns/s0", now=1.5)  # changed again: keeps its place and its first time
    first = t.take(1.5)
    assert first is not None and first.owners == {"ns/s0", "ns/s1", "ns/s2"}
    assert first.seen["ns/s0"] == 1.0
    t.synced(1.5, 2.0, full=False)  # 0.5 s; four still pending, a full batch: no pause
    assert t.due_at() <= 2.0
    second = t.take(2.0)
    assert second is not None and second.owners == {"ns/s3", "ns/s4", "ns/s5"}
    t.synced(2.0, 2.5, full=False)
    assert t.due_at() == 3.0  # one left: it waits out the pause (more may join it)
    t.changed("ns/s7", now=2.9)
    last = t.take(3.0)
    assert last is not None and last.owners == {"ns/s6", "ns/s7"}
    assert not t.pending


def test_a_full_sync_takes_every_pending_owner_whatever_max_batch() -> None:
    t = ChangeTracker(min_interval=0.05, max_batch=2, now=0.0)
    for i in range(5):
        t.changed(f"ns/s{i}", now=0.0)
    batch = t.take(0.0)
    assert batch is not None and batch.full and len(batch.owners) == 5


async def test_a_change_pending_when_the_periodic_full_sync_starts_goes_out_beside_its_read() -> None:
    from test_agent_sync import Clock, SteppedFake, key, pvs, settle, stepped_agent

    kernel, clock = FakeKernel(), Clock()
    agent, px = stepped_agent(kernel, clock)
    stepped = px["iptables"]
    assert isinstance(stepped, SteppedFake)
    agent.replace_all([pvs("a"), pvs("b", vip="10.96.0.11")])
    await settle(agent, clock)
    clock.t += 59.99
    agent.upsert(pvs("a", reals=[{"address": "10.244.3.3", "port": 9000}], h="h2"))
    clock.t += 0.01  # the periodic full sync is due, with the change still pending

    def during_read(reading: asyncio.Future[None]) -> None:
        clock.t += 0.05  # the full sync's read takes a while; the end comes later
        asyncio.get_running_loop().call_later(0.01, reading.set_result, None)

    stepped.during_read = during_read
    synced: list[tuple[bool, frozenset[str], tuple[RealServer, ...]]] = []
    agent.on_synced = lambda o: synced.append(
        (o.batch.full, o.batch.owners, kernel.table("iptables")[key()].real_servers))
    outcome = await agent.run_due()
    assert outcome is not None and outcome.batch.full
    new = (RealServer("10.244.3.3", 9000),)
    # A partial sync inside the full one (while it read) put the change in the kernel ...
    assert synced[0] == (False, frozenset({"default/a"}), new)
    assert stepped.touched == [frozenset({"default/a"})]
    # ... and the full sync's write left it as it was.
    assert synced[1][0] and synced[1][2] == new
    assert agent.applied["default/a"] == "h2" and not agent.tracker.pending
