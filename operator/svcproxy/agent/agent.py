"""The agent's core: desired state, routing to proxiers, syncs and their outcome.

The watch feeds :meth:`Agent.upsert` / :meth:`Agent.delete` /
:meth:`Agent.replace_all` (cheap: remember the program, mark its owner in
the change tracker). :meth:`Agent.sync` runs one :class:`Batch`: it places
each changed owner's virtual servers in a mode (:mod:`routing`), hands every
proxier only the owners that changed (a partial sync), or everything (a full
sync: observe -> diff -> apply in the proxier, which never flushes), and
folds the results into ``applied`` hashes, errors and retries.

Make-before-break: when a live virtual server changes mode, phase 1
programs the new mode while the old mode keeps it; phase 2 withdraws it
from the old mode, only for owners whose phase 1 succeeded. The cost of a
partial sync follows the changed owners, not the number of services.
:meth:`Agent.run_forever` is the sync loop, paced by the change tracker.
Called by :mod:`svcproxy.agent.main` (real proxiers), the unit tests
(in-memory proxiers, fake time) and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from svcproxy.agent.convert import Program
from svcproxy.agent.metrics import Metrics
from svcproxy.agent.report import AgentSnapshot, OwnerError
from svcproxy.agent.routing import FALLBACK_MODE, Placement, Route, Router
from svcproxy.agent.tracker import Batch, ChangeTracker
from svcproxy.dataplane.proxier import (
    Action,
    Capabilities,
    ModeUnavailableError,
    Proxier,
    SteppedFullSync,
    SyncResult,
)
from svcproxy.dataplane.table import VirtualServer, VSKey

log = logging.getLogger("svcproxy.agent")

MODE_ORDER = ("iptables", "userspace", "ipvs")


@dataclass
class _FullInFlight:
    """The placement a running full sync works from, and the owners partial syncs took
    over from it meanwhile (see :meth:`Agent._between`)."""

    owners: set[str]
    new: dict[str, Placement]
    old: dict[str, Placement]
    moving: dict[str, dict[str, dict[VSKey, VirtualServer]]]
    failed_in: dict[str, set[str]]  # mode -> owners whose sync failed there (this full sync)
    overtaken: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)  # modes this full sync has written already

    def held(self, owner: str) -> Placement:
        """What the kernel holds of ``owner`` now, mid-way through this full sync:
        the new placement in the modes already written (plus keys still moving out of
        them), the old one elsewhere (as the end of :meth:`Agent.sync` reckons)."""
        new, old = self.new[owner], self.old[owner]
        placement: Placement = {}
        for mode in set(new) | set(old):
            if mode in self.done and owner not in self.failed_in.get(mode, ()):
                held = dict(new.get(mode, {}))
                held.update(self.moving.get(mode, {}).get(owner, {}))
            else:
                held = dict(old.get(mode, {}))
            if held:
                placement[mode] = held
        return placement


@dataclass
class SyncOutcome:
    """What one :meth:`Agent.sync` did (also what tests look at)."""

    batch: Batch
    results: list[SyncResult] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)
    duration: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.ok for r in self.results)


def _node_trouble(mode: str, action: Action) -> bool:
    """Kernel failures and a fallback mode that cannot run are the node's problem."""
    return action is Action.RETRY or (action is Action.FALLBACK and mode == FALLBACK_MODE)


class Agent:
    def __init__(
        self,
        proxiers: Mapping[str, Proxier],
        *,
        node_name: str,
        tracker: ChangeTracker | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        agent_version: str = "",
        kernel_release: str = "",
        unavailable: Mapping[str, Capabilities] | None = None,
    ) -> None:
        self.proxiers = dict(proxiers)
        self.node_name = node_name
        self.clock = clock
        self.wall = wall
        self.tracker = tracker or ChangeTracker(now=clock())
        self.metrics = metrics or Metrics()
        self.agent_version = agent_version
        self.kernel_release = kernel_release
        caps: dict[str, Capabilities] = {m: p.capabilities() for m, p in self.proxiers.items()}
        # Modes that could not be built or are not usable here: routed around, reported.
        for mode, mode_caps in (unavailable or {}).items():
            caps.setdefault(mode, mode_caps)
        self.router = Router(caps)
        self.programs: dict[str, Program] = {}
        self.placement: dict[str, Placement] = {}  # owner -> what the proxiers were told
        self.routes: dict[str, list[Route]] = {}
        self.key_owner: dict[str, dict[VSKey, str]] = {}  # mode -> key -> owner holding it
        self.applied: dict[str, str] = {}
        self.errors: dict[str, OwnerError] = {}
        self.node_errors: list[str] = []
        self.conflicted: set[str] = set()  # owners refused a key another owner holds
        self.last_sync_time: float | None = None
        self.last_sync_duration: float | None = None
        self.last_sync_ok = False
        self.synced_once = False
        self._full: _FullInFlight | None = None
        # Called after every sync, also the partial ones a full sync runs inside itself
        # (the caller's loop sees only the full one): e.g. to wake the ProxyNode writer.
        self.on_synced: Callable[[SyncOutcome], None] | None = None
        self._wake = asyncio.Event()  # set on every change: wakes _between

    # ---- desired state (called by the watch) -------------------------------------------
    def upsert(self, program: Program) -> None:
        old = self.programs.get(program.owner)
        self.programs[program.owner] = program
        if old != program:
            self.tracker.changed(program.owner, self.clock())
            self._wake.set()

    def delete(self, owner: str) -> None:
        if self.programs.pop(owner, None) is not None or owner in self.placement:
            self.tracker.changed(owner, self.clock())
            self._wake.set()

    def replace_all(self, programs: Iterable[Program]) -> None:
        """After a (re-)list: the complete set; owners missing from it are deleted."""
        fresh = {p.owner: p for p in programs}
        for owner in list(self.programs):
            if owner not in fresh:
                self.delete(owner)
        for program in fresh.values():
            self.upsert(program)

    # ---- placement ---------------------------------------------------------------------
    def _place(self, owner: str) -> Placement:
        """Where ``owner``'s virtual servers go now; records routes and key conflicts."""
        program = self.programs.get(owner)
        self.routes.pop(owner, None)
        if program is None:
            return {}
        if program.error:
            self._error(owner, program.error)
            return {}
        placement, routes = self.router.place(program)
        self.routes[owner] = routes
        for mode, servers in placement.items():
            index = self.key_owner.setdefault(mode, {})
            for key in list(servers):
                holder = index.get(key)
                if holder is not None and holder != owner and holder in self.programs:
                    del servers[key]
                    self.conflicted.add(owner)
                    self._error(
                        owner,
                        f"{key} is already programmed by {holder}: one VIP:port/protocol can belong"
                        " to one ProxyVirtualServer only; remove it from one of them",
                    )
        return {m: s for m, s in placement.items() if s}

    def _index(self, owner: str, old: Placement, new: Placement) -> None:
        for mode, servers in old.items():
            index = self.key_owner.get(mode, {})
            for key in servers:
                if index.get(key) == owner:
                    del index[key]
        for mode, servers in new.items():
            index = self.key_owner.setdefault(mode, {})
            for key in servers:
                index[key] = owner

    def _error(self, owner: str, message: str) -> None:
        self.errors[owner] = OwnerError(owner, message, self.wall())

    # ---- sync --------------------------------------------------------------------------
    async def run_forever(self, after_full: Callable[[], None] | None = None) -> None:
        """The sync loop (``svcproxy agent`` runs it once the first list is in; benchmarks
        run it too): sleep until the tracker says a batch is due or a change wakes it,
        then sync. A sync that raises is logged and a full sync follows a second later.
        ``after_full`` runs after every full sync (the agent trims its heap there)."""
        while True:
            delay = self.tracker.due_at() - self.clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(delay, 3600))
                continue
            try:
                outcome = await self.run_due()
            except Exception:
                log.exception("sync crashed; full sync next")
                self.tracker.request_full()
                await asyncio.sleep(1)
                continue
            if outcome is not None and outcome.batch.full and after_full is not None:
                after_full()

    async def run_due(self) -> SyncOutcome | None:
        """Sync if the tracker says a batch is due now."""
        batch = self.tracker.take(self.clock())
        if batch is None:
            return None
        return await self.sync(batch)

    async def sync(self, batch: Batch) -> SyncOutcome:
        started = self.clock()
        outcome = SyncOutcome(batch)
        owners = set(self.programs) | set(self.placement) if batch.full else set(batch.owners)
        # What this sync programs: a change that lands while it awaits the kernel is the
        # next sync's, so `applied` must not show its hash yet.
        synced_programs = {o: self.programs.get(o) for o in owners}
        for owner in owners:
            self.errors.pop(owner, None)
        old = {o: self.placement.get(o, {}) for o in owners}
        for owner in owners:
            self._index(owner, old[owner], {})
        self.conflicted -= owners
        new: dict[str, Placement] = {}
        for owner in sorted(owners):
            new[owner] = self._place(owner)
            self._index(owner, {}, new[owner])
        # Keys released now may unblock programs refused earlier for holding the same VIP.
        released = any(
            k not in new[o].get(m, {}) for o in owners for m, s in old[o].items() for k in s
        )
        if released and self.conflicted:
            self.tracker.changed_many(self.conflicted - owners, self.clock())
        # Keys moving to another mode stay in their old mode until the new one holds them.
        moving: dict[str, dict[str, dict[VSKey, VirtualServer]]] = {}  # mode -> owner -> keys
        for owner in owners:
            new_keys = {k: m for m, s in new[owner].items() for k in s}
            for mode, servers in old[owner].items():
                moved = {k: v for k, v in servers.items() if k in new_keys and new_keys[k] != mode}
                if moved:
                    moving.setdefault(mode, {})[owner] = moved
        modes = [m for m in MODE_ORDER if m in self.proxiers or any(m in p for p in new.values())]
        failed: set[str] = set()
        failed_in: dict[str, set[str]] = {}
        # A periodic full sync lets partial syncs run while a proxier that can (see
        # SteppedFullSync) reads the kernel; a partial sync then starts from what the
        # kernel holds at that point (_FullInFlight.held). Not the first sync after
        # start, and never nested.
        inflight = None
        if batch.full and self.synced_once and self._full is None:
            inflight = _FullInFlight(owners, new, old, moving, failed_in)
        for mode in modes:  # phase 1: make
            desired: dict[VSKey, VirtualServer] = {}
            only: set[str] = set()
            for owner in owners:
                desired.update(new[owner].get(mode, {}))
                if new[owner].get(mode) or old[owner].get(mode):
                    only.add(owner)
            for moved in moving.get(mode, {}).values():
                for key, vs in moved.items():
                    desired.setdefault(key, vs)
            if not batch.full and not only:
                continue
            if batch.full and mode not in self.proxiers and not desired:
                continue
            stepped = self.proxiers.get(mode)
            if inflight is not None and isinstance(stepped, SteppedFullSync):
                self._full = inflight
                try:
                    result = await stepped.sync_full(desired, self._between)
                finally:
                    self._full = None
                self._take_over(inflight)
                only -= inflight.overtaken
            else:
                result = await self._sync_mode(mode, desired, None if batch.full else frozenset(only))
            outcome.results.append(result)
            failed_in[mode] = self._absorb(result, only, batch)
            failed |= failed_in[mode]
            if inflight is not None:
                inflight.done.add(mode)
        overtaken = inflight.overtaken if inflight is not None else set()
        failed -= overtaken
        for mode, by_owner in moving.items():  # phase 2: break, only after a successful make
            ready = {o for o in by_owner if o not in failed}
            if not ready:
                continue
            desired = {k: v for o in ready for k, v in new[o].get(mode, {}).items()}
            result = await self._sync_mode(mode, desired, frozenset(ready))
            outcome.results.append(result)
            failed_in[mode] = failed_in.get(mode, set()) | self._absorb(result, ready, batch)
            failed |= failed_in[mode]
        for owner in owners - overtaken:  # the overtaken ones: as their partial sync left them
            # What each mode now holds of this owner, as far as the agent knows.
            placement: Placement = {}
            for mode in set(new[owner]) | set(old[owner]):
                if owner in failed_in.get(mode, ()):
                    held = dict(old[owner].get(mode, {}))  # unknown: the next full sync re-reads
                else:
                    held = dict(new[owner].get(mode, {}))
                    if owner in failed and owner in moving.get(mode, {}):
                        held.update(moving[mode][owner])  # not withdrawn: the new mode failed
                if held:
                    placement[mode] = held
            if placement:
                self.placement[owner] = placement
            else:
                self.placement.pop(owner, None)
            program = synced_programs[owner]
            if program is None or owner in failed or owner in self.errors:
                self.applied.pop(owner, None)
            else:
                self.applied[owner] = program.content_hash
        done = self.clock()
        self.tracker.synced(started, done, full=batch.full)  # sets the pause before the next one
        outcome.failed = failed
        outcome.duration = done - started
        for owner, seen in batch.seen.items():
            if owner not in failed:
                self.metrics.programming_latency.observe(max(0.0, done - seen))
        self.metrics.sync_duration.labels("full" if batch.full else "partial").observe(outcome.duration)
        self._update_gauges()
        self.last_sync_time = self.wall()
        self.last_sync_duration = outcome.duration
        # Errors that one ProxyVirtualServer's spec or a conflict causes are reported per
        # owner; they do not make the node unhealthy (restarting would not fix them).
        self.last_sync_ok = not self.node_errors and not any(
            _node_trouble(r.mode, e.action) for r in outcome.results for e in r.errors
        )
        self.synced_once = self.synced_once or batch.full
        if self.on_synced is not None:
            self.on_synced(outcome)
        log.info(
            "sync done",
            extra={
                "full": batch.full,
                "owners": len(owners),
                "operations": sum(r.total_operations for r in outcome.results),
                "failed": sorted(failed)[:20],
                "seconds": round(outcome.duration, 6),
            },
        )
        return outcome

    async def _sync_mode(
        self, mode: str, desired: dict[VSKey, VirtualServer], only: frozenset[str] | None
    ) -> SyncResult:
        proxier = self.proxiers.get(mode)
        if proxier is None:
            caps = self.router.capabilities.get(mode)
            reason = caps.reason if caps and caps.reason else f"{mode} mode is not available on this node"
            owners = frozenset(vs.owner for vs in desired.values()) | (only or frozenset())
            return SyncResult(
                mode=mode,
                full=only is None,
                operations={},
                errors=(ModeUnavailableError(reason),),
                failed_owners=owners,
            )
        return await proxier.sync(desired, only)

    async def _between(self, until: asyncio.Future[Any]) -> frozenset[str]:
        """While a full sync reads the kernel (``until``), run the partial syncs that come
        due, as the sync loop would; returns their owners, which the full sync leaves
        alone (kube-proxy's full and partial syncs share one loop too, but its full sync
        writes little; ours would stall every change for its read-back otherwise)."""
        inflight = self._full
        synced: set[str] = set()
        self._wake = asyncio.Event()  # of this event loop (an Event binds to its first loop)
        while inflight is not None and not until.done():
            now = self.clock()
            batch = self.tracker.take(now) if self.tracker.due_at() <= now else None
            if batch is not None:
                if batch.full:
                    self.tracker.request_full()  # asked for meanwhile: runs after this one
                if batch.owners:
                    for owner in batch.owners & inflight.owners - inflight.overtaken:
                        # The partial sync starts from what the kernel holds now: the modes
                        # this full sync wrote already hold the new placement.
                        held = inflight.held(owner)
                        self._index(owner, inflight.new[owner], {})
                        if held:
                            self.placement[owner] = held
                        else:
                            self.placement.pop(owner, None)
                        self._index(owner, {}, held)
                    inflight.overtaken |= batch.owners
                    synced |= batch.owners
                    self._full = None  # the partial sync below must not nest another full
                    try:
                        await self.sync(Batch(False, batch.owners, batch.seen))
                    finally:
                        self._full = inflight
                continue
            self._wake.clear()
            woken = asyncio.ensure_future(self._wake.wait())
            delay = min(max(self.tracker.due_at() - now, 0.0), 1.0)
            await asyncio.wait({until, woken}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            woken.cancel()
        return frozenset(synced)

    def _take_over(self, inflight: _FullInFlight) -> None:
        """After the first proxier of a full sync: owners that partial syncs synced
        meanwhile continue from what those left (later modes get their placement now)."""
        for owner in inflight.overtaken:
            now = dict(self.placement.get(owner, {}))
            inflight.new[owner] = now
            inflight.old[owner] = now
            for by_owner in inflight.moving.values():
                by_owner.pop(owner, None)
        for mode in [m for m, by_owner in inflight.moving.items() if not by_owner]:
            del inflight.moving[mode]

    def _absorb(self, result: SyncResult, owners: set[str], batch: Batch) -> set[str]:
        """Record a result's operations and errors; returns the owners that failed."""
        for kind, count in result.operations.items():
            self.metrics.operations.labels(result.mode, kind).inc(count)
        failed = set(result.failed_owners)
        retry: set[str] = set()
        for err in result.errors:
            self.metrics.errors.labels(result.mode, err.action.value).inc()
            concerned = {err.owner} if err.owner else (set(result.failed_owners) or set())
            if not concerned:
                self.node_errors.append(f"{result.mode}: {err}")
                del self.node_errors[:-10]
                continue
            failed |= concerned
            for owner in concerned:
                self._error(owner, f"{result.mode}: {err}")
                log.warning(
                    "sync failed", extra={"owner": owner, "mode": result.mode, "action": err.action.value,
                                          "error": str(err)},
                )
            if err.action is Action.FALLBACK and result.mode != FALLBACK_MODE:
                for owner in concerned:
                    self.router.forced[owner] = f"{result.mode} mode failed on this node: {err}"
                self.tracker.changed_many(concerned, self.clock())
            # A fallback error in iptables mode itself has nowhere to go: reported, and the
            # next full sync tries again.
            elif err.action is Action.RETRY:
                retry |= concerned
        if retry:
            self.tracker.retry(retry, self.clock(), batch.seen)
        if result.full and result.ok:
            self.node_errors = [e for e in self.node_errors if not e.startswith(f"{result.mode}:")]
        return failed & (owners | set(result.failed_owners))

    def _update_gauges(self) -> None:
        for mode, proxier in self.proxiers.items():
            counts = proxier.counts()
            self.metrics.virtual_servers.labels(mode).set(counts.virtual_servers)
            self.metrics.real_servers.labels(mode).set(counts.real_servers)
            self.metrics.rules.labels(mode).set(counts.rules)
        self.metrics.services.set(len(self.applied))

    # ---- cleanup and report ------------------------------------------------------------
    async def cleanup(self) -> list[SyncResult]:
        """Every mode's cleanup (``svcproxy agent --cleanup``)."""
        return [await p.cleanup() for p in self.proxiers.values()]

    def snapshot(self, *, watch_live: bool) -> AgentSnapshot:
        vs = rs = 0
        for proxier in self.proxiers.values():
            counts = proxier.counts()
            vs += counts.virtual_servers
            rs += counts.real_servers
        routes = [r for rs_ in self.routes.values() for r in rs_]
        ready = watch_live and self.synced_once and self.last_sync_ok
        if ready:
            reason, message = "Synced", "the kernel matches every ProxyVirtualServer it could apply"
        elif not self.synced_once:
            reason, message = "Starting", "waiting for the first full sync"
        elif not watch_live:
            reason, message = "WatchDown", "the ProxyVirtualServer watch is reconnecting"
        else:
            reason, message = "SyncFailed", "the last sync had errors: see errors"
        return AgentSnapshot(
            node_name=self.node_name,
            agent_version=self.agent_version,
            capabilities=self.router.capabilities,
            kernel_release=self.kernel_release,
            routes=routes,
            applied=dict(self.applied),
            services=len(self.applied),
            virtual_servers=vs,
            real_servers=rs,
            errors=list(self.errors.values()),
            last_sync_time=self.last_sync_time,
            last_sync_duration=self.last_sync_duration,
            ready=ready,
            ready_reason=reason,
            ready_message=message,
            extra_errors=tuple(self.node_errors),
        )
