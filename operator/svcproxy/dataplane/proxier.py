"""The one interface every proxy mode implements, and what it returns.

The agent (``svcproxy.agent``) holds one :class:`Proxier` per mode in use
(``ipvs``, ``iptables``, ``userspace``; built by
:func:`svcproxy.dataplane.modes.build_proxier`), hands each the part of the
desired table that runs in that mode and reads back a :class:`SyncResult`.
No mode imports another; they share only this module, ``capabilities``, ``table``, ``mirror``,
``conntrack`` and the netfilter adapter (the ipvs mode also ``diff``).

Contract of :meth:`Proxier.sync`:

* ``only=None`` is a full sync: the proxier re-reads the kernel, diffs it
  against ``desired`` (the complete table for this mode), applies the
  operations and sweeps leftovers it owns. The first sync after start must
  be full (that is how a restarted agent adopts what it programmed before
  without interrupting traffic) and ``desired`` must then be complete, or
  the sweep removes live services.
* ``only={owners}`` is a partial sync: only those ProxyVirtualServers
  ("namespace/name") are brought in line, against an in-memory mirror of
  what was applied, so its cost does not grow with the number of
  services. ``desired`` needs to hold just those owners' virtual servers
  (the agent passes ``owned_by(table, only)``); an owner with nothing in
  ``desired`` is withdrawn.

Errors never escape as exceptions from ``sync``: each lands in
``SyncResult.errors`` as a typed :class:`DataplaneError` whose ``action``
tells the agent what to do; the owners it concerns are in
``SyncResult.failed_owners`` (everything else was applied).
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from svcproxy.base import Mode
from svcproxy.dataplane.capabilities import ModeCapabilities, ModeCounts
from svcproxy.dataplane.table import Table


class Action(enum.Enum):
    """What the agent should do about an error."""

    RETRY = "retry"  # transient: the next sync (full or partial) tries again
    FALLBACK = "fallback"  # this mode cannot run here: serve the owner in iptables mode
    FIX_SPEC = "fix-spec"  # the spec cannot be programmed as asked: report, do not retry
    CONFLICT = "conflict"  # someone else owns that kernel object: report, leave it alone


class DataplaneError(Exception):
    """Base of every data-plane error: carries the owner and what to do."""

    action: Action = Action.RETRY

    def __init__(self, message: str, *, owner: str | None = None) -> None:
        super().__init__(message)
        self.owner = owner


class KernelError(DataplaneError):
    """A kernel request failed (netlink errno, iptables-restore exit status)."""

    action = Action.RETRY

    def __init__(self, message: str, *, owner: str | None = None, errno: int = 0) -> None:
        super().__init__(message, owner=owner)
        self.errno = errno


class ModeUnavailableError(DataplaneError):
    """The mode cannot run on this node (no IPVS, no iptables)."""

    action = Action.FALLBACK


class SchedulerUnavailableError(DataplaneError):
    """The IPVS scheduler module does not load on this node."""

    action = Action.FALLBACK


class ForeignObjectError(DataplaneError):
    """The virtual server exists in the kernel but the agent did not create it."""

    action = Action.CONFLICT


class UnsupportedError(DataplaneError):
    """The spec asks for something this mode cannot do (e.g. SCTP in userspace)."""

    action = Action.FIX_SPEC


@dataclass(frozen=True)
class SyncResult:
    """Outcome of one sync or cleanup."""

    mode: Mode
    full: bool
    operations: Mapping[str, int]  # OpKind.value -> count applied
    errors: tuple[DataplaneError, ...] = ()
    failed_owners: frozenset[str] = frozenset()
    duration: float = 0.0  # seconds, wall clock
    counts: ModeCounts = field(default_factory=ModeCounts)

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def total_operations(self) -> int:
        return sum(self.operations.values())


@runtime_checkable
class Proxier(Protocol):
    """One proxy mode. All methods run in the agent's event loop."""

    @property
    def mode(self) -> Mode: ...

    def capabilities(self) -> ModeCapabilities:
        """Detected once at construction; cheap to call."""
        ...

    async def sync(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult:
        """Bring the kernel in line with ``desired`` (see module docstring)."""
        ...

    async def cleanup(self) -> SyncResult:
        """Remove everything this mode owns on the node (``svcproxy agent --cleanup``)."""
        ...

    def counts(self) -> ModeCounts:
        """Owned objects now, from the in-memory mirror (no kernel access)."""
        ...

    async def close(self) -> None:
        """Release sockets, listeners and tasks; leaves the kernel state as it is."""
        ...


# The agent's hook for :meth:`SteppedFullSync.sync_full`: apply the partial syncs that come
# due until the future is done; returns the owners it synced.
Between = Callable[["asyncio.Future[Any]"], Awaitable[frozenset[str]]]


@runtime_checkable
class SteppedFullSync(Protocol):
    """A proxier whose full sync can let partial syncs run while it reads the kernel
    (every proxier here): it awaits ``between(future)`` while its read-back
    runs and leaves the owners ``between`` returns as the partial syncs left them."""

    async def sync_full(self, desired: Table, between: Between) -> SyncResult: ...


T = TypeVar("T")


async def read_beside(
    read: Callable[[], T], between: Between, beside_for: float | None = None
) -> tuple[T, frozenset[str]]:
    """Run ``read`` (a full sync's kernel read-back: no writes) in a worker thread while
    ``between`` applies the partial syncs that come due; returns what it read and the
    owners ``between`` synced. The caller then writes under its lock, leaving those alone.

    ``beside_for``: partial syncs run beside the read for at most this many seconds;
    after that changes wait for the read to end. For a read that starts over whenever
    the kernel state changes under it (iptables-nft's dump retries when the ruleset's
    generation moved), which a stream of partial syncs would otherwise keep from ever
    ending."""
    reading = asyncio.ensure_future(asyncio.to_thread(read))
    window: asyncio.Future[Any] = reading
    if beside_for is not None:
        window = asyncio.ensure_future(asyncio.wait({reading}, timeout=beside_for))
    try:
        touched = await between(window)
    finally:
        result = await reading
    return result, touched


class BlockingProxier(abc.ABC):
    """The shared shell of the modes whose kernel work blocks (netlink, iptables-restore).

    The async methods run the blocking halves in a worker thread, one at a time,
    so the agent's event loop (and userspace proxying in it) never stalls;
    benchmarks call the blocking halves directly. Subclasses set ``MODE`` and
    ``_caps`` and implement ``sync_blocking`` and ``cleanup_blocking``.
    """

    MODE: ClassVar[Mode]
    _caps: ModeCapabilities

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    @property
    def mode(self) -> Mode:
        return self.MODE

    def capabilities(self) -> ModeCapabilities:
        return self._caps

    async def close(self) -> None:
        return None

    async def sync(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult:
        async with self._lock:
            return await asyncio.to_thread(self.sync_blocking, desired, only)

    async def cleanup(self) -> SyncResult:
        async with self._lock:
            return await asyncio.to_thread(self.cleanup_blocking)

    @abc.abstractmethod
    def sync_blocking(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult: ...

    @abc.abstractmethod
    def cleanup_blocking(self) -> SyncResult: ...

    def _unavailable(self, desired: Table, full: bool, start: float, what: str) -> SyncResult:
        """Every owner in ``desired`` fails with a fallback error: the mode cannot run here."""
        owners = frozenset(v.owner for v in desired.values())
        err = ModeUnavailableError(f"{what} is not usable here: {self._caps.reason}")
        return SyncResult(self.MODE, full, {}, (err,), owners, time.monotonic() - start)
