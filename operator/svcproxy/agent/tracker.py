"""The change tracker: coalesces ProxyVirtualServer changes into bounded-rate syncs.

Like kube-proxy's change trackers plus its ``BoundedFrequencyRunner``: the
watch calls :meth:`ChangeTracker.changed` for each event (cheap, no kernel
work); the agent's sync loop (:meth:`svcproxy.agent.agent.Agent.run_forever`)
asks :meth:`ChangeTracker.due_at` when to wake, :meth:`ChangeTracker.take`
for the next :class:`Batch`, and tells :meth:`ChangeTracker.synced` when and
how long each sync ran. Many events between two syncs become one batch; two
syncs start at least ``min_interval`` apart; after a partial sync the next
one waits ``pause_ratio`` times as long as that sync took (at most
``max_pause``), so when each sync costs a lot (iptables-nft revalidates the
whole nat table on every commit) a stream of changes
goes out in fewer, larger syncs and the agent leaves the CPU to others at
least half the time (ratio 1), while a change after an idle spell longer
than that pause goes out at once. A partial sync takes at most ``max_batch``
owners, the oldest first (one iptables-nft-restore input costs more than
linearly in the chains it holds), and while that many or more are pending the next one does not
pause (a full batch gains nothing by waiting). A full reconcile comes every
``full_interval`` (only ``min_interval`` holds it back; the changes pending
when it starts stay pending, for the partial syncs that run beside its
read-back; a requested full sync, the first one or one after a crash, takes
them all); owners whose sync failed come back after ``retry_interval``.
Time is passed in, never read, so tests drive it with a fake clock. Pure:
no I/O, no asyncio.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Batch:
    """One sync's worth of work."""

    full: bool
    owners: frozenset[str]
    # owner -> when its oldest unsynced change was seen (for programming latency).
    seen: Mapping[str, float] = field(default_factory=dict)


class ChangeTracker:
    def __init__(
        self,
        *,
        min_interval: float = 0.05,
        pause_ratio: float = 1.0,
        max_pause: float = 1.0,
        max_batch: int = 200,
        full_interval: float = 60.0,
        retry_interval: float = 1.0,
        now: float = 0.0,
    ) -> None:
        self.min_interval = min_interval
        self.pause_ratio = pause_ratio
        self.max_pause = max_pause
        self.max_batch = max_batch  # owners per partial sync; 0: no limit
        self.full_interval = full_interval
        self.retry_interval = retry_interval
        self._dirty: dict[str, float] = {}
        self._retry: dict[str, float] = {}  # owner -> not before
        self._retry_seen: dict[str, float] = {}
        self._full_requested = True  # the first sync after start is full (restart safety)
        self._last_run: float | None = None  # when the last sync was taken (started)
        self._last_end: float | None = None  # when the last sync of any kind ended
        self._last_cost = 0.0  # how long the last partial sync took
        self._last_full = now

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._dirty) | frozenset(self._retry)

    def changed(self, owner: str, now: float) -> None:
        """An owner's program changed (or was deleted) at ``now``."""
        if self._retry.pop(owner, None) is not None:
            now = min(now, self._retry_seen.pop(owner, now))
        self._dirty.setdefault(owner, now)

    def changed_many(self, owners: Iterable[str], now: float) -> None:
        for owner in owners:
            self.changed(owner, now)

    def request_full(self) -> None:
        self._full_requested = True

    def retry(self, owners: Iterable[str], now: float, seen: Mapping[str, float] | None = None) -> None:
        """Owners whose sync failed transiently: try again after ``retry_interval``."""
        for owner in owners:
            if owner in self._dirty:
                continue  # a newer change is already pending
            self._retry[owner] = now + self.retry_interval
            if seen and owner in seen:
                # Keep the original change time so latency counts the failed attempt too.
                self._retry_seen[owner] = seen[owner]

    @property
    def pause(self) -> float:
        """How long a partial sync waits after the previous sync ended: ``pause_ratio``
        times what the last partial sync took, at most ``max_pause``."""
        return max(0.0, min(self.max_pause, self.pause_ratio * self._last_cost))

    def synced(self, started: float, ended: float, *, full: bool) -> None:
        """A sync taken at ``started`` ended at ``ended``. A partial sync's duration sets
        the pause before the next partial one; a full sync's does not (it is mostly
        reading the kernel back, with partial syncs running beside it)."""
        self._last_end = ended if self._last_end is None else max(self._last_end, ended)
        if not full:
            self._last_cost = max(0.0, ended - started)

    def due_at(self) -> float:
        """The earliest time the next sync should run (may be in the past)."""
        start_gap = float("-inf") if self._last_run is None else self._last_run + self.min_interval
        full = self._last_full + self.full_interval
        if self._full_requested:
            full = float("-inf")
        partial = float("-inf") if self._dirty else float("inf")
        if self._retry:
            partial = min(partial, *self._retry.values())
        if self._last_end is not None and not self._backlog():
            partial = max(partial, self._last_end + self.pause)
        return max(min(full, partial), start_gap)

    def _backlog(self) -> bool:
        """A full batch is pending: waiting would not make the next sync any larger."""
        return 0 < self.max_batch <= len(self._dirty)

    def take(self, now: float) -> Batch | None:
        """The batch to sync now, or None when nothing is due yet."""
        if now < self.due_at():
            return None
        for owner, not_before in list(self._retry.items()):
            if not_before <= now:
                del self._retry[owner]
                self._dirty.setdefault(owner, self._retry_seen.pop(owner, now))
        requested = self._full_requested  # the first sync, or after a crash: trusts nothing
        full = requested or now >= self._last_full + self.full_interval
        if not full and not self._dirty:
            return None
        if full and not requested:
            # The periodic full sync is drift repair and takes seconds at 10k Services (its
            # read-back). The changes pending now stay pending: partial syncs take them as
            # they come due, beside its read (the full sync leaves alone what they wrote),
            # instead of waiting for its end inside its batch.
            seen: dict[str, float] = {}
        elif full or not 0 < self.max_batch < len(self._dirty):
            seen = dict(self._dirty)
            self._dirty.clear()
        else:  # the oldest changes first (dicts keep insertion order; changed() keeps the first)
            seen = {o: self._dirty[o] for o in itertools.islice(self._dirty, self.max_batch)}
            for owner in seen:
                del self._dirty[owner]
        self._last_run = now
        if full:
            self._full_requested = False
            self._last_full = now
        return Batch(full=full, owners=frozenset(seen), seen=seen)
