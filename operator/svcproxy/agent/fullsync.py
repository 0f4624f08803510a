"""Partial syncs beside a periodic full sync: the interleaving, in one place.

A proxier that can (:class:`~svcproxy.dataplane.proxier.SteppedFullSync`) reads
the kernel for a full sync without its write lock and awaits :func:`between`
meanwhile; :func:`between` runs the partial syncs that come due, as the sync
loop would, and returns their owners, which the full sync's write then leaves
alone. A partial sync starts from what the kernel holds at that point
(:meth:`InFlight.held`: the new placement in the modes this full sync wrote
already); after the proxier's call the rest of the full sync continues those
owners from what the partial syncs left (:meth:`InFlight.take_over`).
Called by :class:`svcproxy.agent.agent.Agent`; unit-tested with fake time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from svcproxy.agent.plan import Holdings, Placement, SyncPlan
from svcproxy.agent.tracker import Batch, ChangeTracker
from svcproxy.base import Mode


@dataclass
class InFlight:
    """A running full sync: the plan it works from (replaced on take-over), the owners
    whose sync failed per mode so far, the modes it has written and the owners partial
    syncs took over from it."""

    plan: SyncPlan
    failed_in: dict[Mode, set[str]]  # mode -> owners (shared with the executor)
    done: set[Mode] = field(default_factory=set)
    overtaken: set[str] = field(default_factory=set)

    def held(self, owner: str) -> Placement:
        """What the kernel holds of ``owner`` now, mid-way through this full sync."""
        ok = {m for m in self.done if owner not in self.failed_in.get(m, ())}
        return self.plan.held(owner, ok, withdrawn=False)

    def take_over(self, holdings: Holdings) -> None:
        """After one proxier's full sync: the overtaken owners go on from the mirror."""
        self.plan = self.plan.taken_over(self.overtaken, holdings.placement)


@dataclass(frozen=True)
class Beside:
    """What :func:`between` needs from the agent."""

    tracker: ChangeTracker
    clock: Callable[[], float]
    wake: asyncio.Event  # set on every change
    holdings: Holdings
    partial: Callable[[Batch], Awaitable[object]]  # one partial sync


def hand_over(inflight: InFlight, owner: str, holdings: Holdings) -> None:
    """Before a partial sync of ``owner`` mid-way through the full sync: the mirror says
    what the kernel holds now, and the owner claims just that."""
    held = inflight.held(owner)
    holdings.release(owner, inflight.plan.new[owner])
    holdings.hold(owner, held)
    holdings.claim(owner, held)


async def between(inflight: InFlight, until: asyncio.Future[Any], beside: Beside) -> frozenset[str]:
    """While a full sync reads the kernel (``until``), run the partial syncs that come
    due; returns their owners (kube-proxy's full and partial syncs share one loop too,
    but its full sync writes little; ours would stall every change for its read-back)."""
    tracker, synced = beside.tracker, set[str]()
    while not until.done():
        now = beside.clock()
        batch = tracker.take(now) if tracker.due_at() <= now else None
        if batch is None:
            await _wait(until, beside, min(max(tracker.due_at() - now, 0.0), 1.0))
            continue
        if batch.full:
            tracker.request_full()  # asked for meanwhile: runs after this one
        if batch.owners:
            for owner in batch.owners & inflight.plan.owners - inflight.overtaken:
                hand_over(inflight, owner, beside.holdings)
            inflight.overtaken |= batch.owners
            synced |= batch.owners
            await beside.partial(Batch(False, batch.owners, batch.seen))
    return frozenset(synced)


async def _wait(until: asyncio.Future[Any], beside: Beside, delay: float) -> None:
    """Until the read ends, a change comes in or ``delay`` passes."""
    beside.wake.clear()
    woken = asyncio.ensure_future(beside.wake.wait())
    await asyncio.wait({until, woken}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    woken.cancel()
