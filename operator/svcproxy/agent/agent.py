"""The agent's core: desired state, routing to proxiers, syncs and their outcome.

The watch feeds :meth:`Agent.upsert` / :meth:`Agent.delete` /
:meth:`Agent.replace_all` (cheap: remember the program, mark its owner in
the change tracker). :meth:`Agent.sync` runs one :class:`Batch`: it routes
each changed owner's virtual servers to a mode (:mod:`routing`), plans the
sync from them and the mirror of what each mode holds (:mod:`plan`, pure),
then executes the plan: every proxier gets only the owners that changed (a
partial sync), or everything (a full sync: observe -> diff -> apply in the
proxier, which never flushes); the results fold into ``applied`` hashes,
errors, retries and the mirror. Partial syncs that run while a full sync
reads the kernel live in :mod:`fullsync`.

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
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.fullsync import Beside, InFlight, between
from svcproxy.agent.metrics import Metrics
from svcproxy.agent.plan import MODE_ORDER, Holdings, Placement, SyncPlan, SyncStep, plan_sync
from svcproxy.agent.report import AgentSnapshot, OwnerError
from svcproxy.agent.routing import FALLBACK_MODE, Route, Router
from svcproxy.agent.tracker import Batch, ChangeTracker
from svcproxy.agent.trust import UNKNOWN_SERVICE, AddressBook, Network, Refusal
from svcproxy.base import Mode
from svcproxy.dataplane.capabilities import ModeCapabilities
from svcproxy.dataplane.proxier import (
    Action,
    ModeUnavailableError,
    Proxier,
    SteppedFullSync,
    SyncResult,
)
from svcproxy.dataplane.table import VSKey

log = logging.getLogger("svcproxy.agent")

__all__ = ["MODE_ORDER", "Agent", "SyncOutcome"]


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


@dataclass
class _Run:
    """One sync in progress: its plan (a full sync's is replaced on take-over), the
    owners that failed, per mode and in all, and the full sync in flight, if any."""

    plan: SyncPlan
    outcome: SyncOutcome
    failed_in: dict[Mode, set[str]] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)
    inflight: InFlight | None = None

    def record(self, mode: Mode, failed: set[str], result: SyncResult) -> None:
        self.outcome.results.append(result)
        self.failed_in[mode] = self.failed_in.get(mode, set()) | failed
        self.failed |= failed


def _node_trouble(mode: Mode, action: Action) -> bool:
    """Kernel failures and a fallback mode that cannot run are the node's problem."""
    return action is Action.RETRY or (action is Action.FALLBACK and mode == FALLBACK_MODE)


class Agent:
    def __init__(
        self,
        proxiers: Mapping[Mode, Proxier],
        *,
        node_name: str,
        tracker: ChangeTracker | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        agent_version: str = "",
        kernel_release: str = "",
        unavailable: Mapping[Mode, ModeCapabilities] | None = None,
        guard: AddressBook | None = None,
        unknown_grace: float = 5.0,
    ) -> None:
        self.proxiers = dict(proxiers)
        self.node_name = node_name
        self.clock = clock
        self.wall = wall
        self.tracker = tracker or ChangeTracker(now=clock())
        self.metrics = metrics or Metrics()
        self.agent_version = agent_version
        self.kernel_release = kernel_release
        caps: dict[Mode, ModeCapabilities] = {m: p.capabilities() for m, p in self.proxiers.items()}
        # Modes that could not be built or are not usable here: routed around, reported.
        for mode, mode_caps in (unavailable or {}).items():
            caps.setdefault(mode, mode_caps)
        self.router = Router(caps)
        self.programs: dict[str, DesiredProgram] = {}
        self.holdings = Holdings()  # what each mode holds, per owner and per key
        self.routes: dict[str, list[Route]] = {}
        self.applied: dict[str, str] = {}
        self.errors: dict[str, OwnerError] = {}
        self.node_errors: list[str] = []
        self.conflicted: set[str] = set()  # owners refused a key another owner holds
        # What programs are checked against (svcproxy.agent.trust); None: trust every
        # program (unit tests and benchmarks that have no Services and Nodes).
        self.guard = guard
        self.refused: dict[str, tuple[Refusal, float]] = {}  # owner -> refusal, since (wall)
        # A program may arrive just before its Service: not reported for this long.
        self.unknown_grace = unknown_grace
        self.last_sync_time: float | None = None
        self.last_sync_duration: float | None = None
        self.last_sync_ok = False
        self.synced_once = False
        self._inflight: InFlight | None = None
        # Called after every sync, also the partial ones a full sync runs inside itself
        # (the caller's loop sees only the full one): e.g. to wake the ProxyNode writer.
        self.on_synced: Callable[[SyncOutcome], None] | None = None
        self._wake = asyncio.Event()  # set on every change: wakes _between

    # ---- desired state (called by the watch) -------------------------------------------
    def upsert(self, program: DesiredProgram) -> None:
        old = self.programs.get(program.owner)
        self.programs[program.owner] = program
        if old != program:
            self.tracker.changed(program.owner, self.clock())
            self._wake.set()

    def delete(self, owner: str) -> None:
        if self.guard is not None:
            self.guard.forget(owner)
        if self.programs.pop(owner, None) is not None or owner in self.placement:
            self.tracker.changed(owner, self.clock())
            self._wake.set()

    def replace_all(self, programs: Iterable[DesiredProgram]) -> None:
        """After a (re-)list: the complete set; owners missing from it are deleted."""
        fresh = {p.owner: p for p in programs}
        for owner in list(self.programs):
            if owner not in fresh:
                self.delete(owner)
        for program in fresh.values():
            self.upsert(program)

    # ---- what programs are checked against (called by the Service and Node watches) -----
    def _recheck(self, owners: Iterable[str]) -> None:
        marked = [o for o in owners if o in self.programs or o in self.placement]
        if marked:
            self.tracker.changed_many(marked, self.clock())
            self._wake.set()

    def _guard(self) -> AddressBook:
        if self.guard is None:
            raise RuntimeError("this agent checks no programs (no AddressBook): nothing to update")
        return self.guard

    def services_listed(self, services: Iterable[tuple[str, frozenset[str]]]) -> None:
        self._recheck(self._guard().replace_services(dict(services)))

    def service_changed(self, service: tuple[str, frozenset[str]]) -> None:
        owner, addresses = service
        if self._guard().set_service(owner, addresses):
            self._recheck([owner])

    def service_deleted(self, owner: str) -> None:
        if self._guard().drop_service(owner):
            self._recheck([owner])

    def nodes_listed(self, nodes: Iterable[tuple[str, tuple[Network, ...]]]) -> None:
        if self._guard().replace_nodes(dict(nodes), self.clock()):
            self._space_moved()

    def node_changed(self, node: tuple[str, tuple[Network, ...]]) -> None:
        if self._guard().set_node(*node):
            self._space_moved()

    def _space_moved(self) -> None:
        if self._guard().take_narrowed():
            # A Node lost a range: programs accepted before may now reach outside the space.
            self._recheck(list(self.programs))
        else:
            self._recheck(list(self.refused))  # a wider space may let refused programs in

    def node_deleted(self, name: str) -> None:
        # Its networks stay trusted for the book's grace; the full sync after it re-checks.
        self._guard().drop_node(name, self.clock())

    def _refusal(self, owner: str, program: DesiredProgram) -> Refusal | None:
        """The program's refusal (recorded, logged when it starts or changes), or None."""
        refusal = self.guard.check(program) if self.guard is not None else None
        before = self.refused.get(owner)
        if refusal is None:
            if before is not None:
                del self.refused[owner]
                log.info("program no longer refused", extra={"owner": owner, "node": self.node_name})
            return None
        if before is None or before[0] != refusal:
            before = self.refused[owner] = (refusal, self.wall())
            log.log(logging.INFO if refusal.reason == UNKNOWN_SERVICE else logging.WARNING,
                    "program refused: nothing of it is programmed",
                    extra={"owner": owner, "node": self.node_name, "reason": refusal.reason,
                           "why": refusal.message})
        self.errors[owner] = OwnerError(owner, refusal.message, before[1], refusal.reason)
        return refusal

    # ---- placement ---------------------------------------------------------------------
    @property
    def placement(self) -> dict[str, Placement]:
        """owner -> what the modes hold of it (the shared mirror's view)."""
        return self.holdings.placement

    @property
    def key_owner(self) -> dict[Mode, dict[VSKey, str]]:
        """mode -> key -> the owner that claims it."""
        return self.holdings.key_owner

    def _route(self, owners: Iterable[str]) -> dict[str, Placement]:
        """Each owner's desired placement by effective mode; records routes and spec errors."""
        routed: dict[str, Placement] = {}
        for owner in owners:
            program = self.programs.get(owner)
            self.routes.pop(owner, None)
            if program is None:
                self.refused.pop(owner, None)
                continue
            if program.error:
                self._error(owner, program.error)
                continue
            if self._refusal(owner, program) is not None:
                continue  # untrusted: withdrawn wherever it was programmed
            routed[owner], self.routes[owner] = self.router.place(program)
        return routed

    def _plan(self, batch: Batch) -> SyncPlan:
        """The batch's plan (:mod:`svcproxy.agent.plan`), with its claims, conflicts and
        unblocked owners recorded."""
        owners = set(self.programs) | set(self.placement) if batch.full else set(batch.owners)
        if self.guard is not None and self.guard.expire(self.clock()) and not batch.full:
            self.tracker.request_full()  # the space narrowed: re-check every program soon
        for owner in owners:
            self.errors.pop(owner, None)
        plan = plan_sync(
            full=batch.full,
            owners=owners,
            routed=self._route(sorted(owners)),
            holdings=self.holdings,
            live=self.programs,
            conflicted=frozenset(self.conflicted),
            proxier_modes=self.proxiers.keys(),
        )
        self.holdings.apply(plan.claims)
        self.conflicted = set(plan.conflicted)
        for owner, message in plan.conflicts.items():
            self._error(owner, message)
        # Keys released now may unblock programs refused earlier for holding the same VIP.
        if plan.unblock:
            self.tracker.changed_many(plan.unblock, self.clock())
        return plan

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
        """One batch: plan, make (phase 1, every mode in order), break (phase 2: withdraw
        moved keys from their old mode, only for owners whose make succeeded), settle."""
        started = self.clock()
        plan = self._plan(batch)
        # What this sync programs: a change that lands while it awaits the kernel is the
        # next sync's, so `applied` must not show its hash yet.
        synced = {o: self.programs.get(o) for o in plan.owners}
        run = _Run(plan, SyncOutcome(batch))
        # A periodic full sync lets partial syncs run while a proxier that can reads the
        # kernel (svcproxy.agent.fullsync). Not the first sync after start, never nested.
        if batch.full and self.synced_once and self._inflight is None:
            run.inflight = InFlight(plan, run.failed_in)
        for mode in plan.modes:
            await self._make(run, mode)
        overtaken = run.inflight.overtaken if run.inflight is not None else set()
        run.failed -= overtaken
        for step in run.plan.withdrawals(run.failed):
            result = await self._sync_mode(step)
            run.record(step.mode, self._absorb(result, step.owners, batch), result)
        self._settle(run, synced, overtaken)
        return self._finish(run, started)

    async def _make(self, run: _Run, mode: Mode) -> None:
        step = run.plan.make(mode)
        if step is None:
            return
        stepped, inflight, owners = self.proxiers.get(mode), run.inflight, step.owners
        if inflight is not None and isinstance(stepped, SteppedFullSync):
            self._inflight = inflight
            try:
                result = await stepped.sync_full(step.desired, self._between)
            finally:
                self._inflight = None
            inflight.take_over(self.holdings)
            run.plan = inflight.plan
            owners -= inflight.overtaken
        else:
            result = await self._sync_mode(step)
        run.record(mode, self._absorb(result, owners, run.outcome.batch), result)
        if inflight is not None:
            inflight.done.add(mode)

    def _settle(
        self, run: _Run, synced: Mapping[str, DesiredProgram | None], overtaken: Collection[str]
    ) -> None:
        """What each mode now holds of each owner and which hashes are applied; the
        overtaken owners stay as their partial sync left them."""
        plan = run.plan
        for owner in plan.owners - set(overtaken):
            modes = plan.new[owner].keys() | plan.old[owner].keys()
            ok = {m for m in modes if owner not in run.failed_in.get(m, ())}
            self.holdings.hold(owner, plan.held(owner, ok, withdrawn=owner not in run.failed))
            program = synced[owner]
            if program is None or owner in run.failed or owner in self.errors:
                self.applied.pop(owner, None)
            else:
                self.applied[owner] = program.content_hash

    def _finish(self, run: _Run, started: float) -> SyncOutcome:
        """Pace, metrics, health and the log line of a finished sync."""
        outcome = run.outcome
        batch = outcome.batch
        done = self.clock()
        self.tracker.synced(started, done, full=batch.full)  # sets the pause before the next one
        outcome.failed = run.failed
        outcome.duration = done - started
        for owner, seen in batch.seen.items():
            if owner not in run.failed:
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
                "owners": len(run.plan.owners),
                "operations": sum(r.total_operations for r in outcome.results),
                "failed": sorted(run.failed)[:20],
                "seconds": round(outcome.duration, 6),
            },
        )
        return outcome

    async def _sync_mode(self, step: SyncStep) -> SyncResult:
        proxier = self.proxiers.get(step.mode)
        if proxier is None:
            caps = self.router.capabilities.get(step.mode)
            missing = f"{step.mode} mode is not available on this node"
            reason = caps.reason if caps and caps.reason else missing
            owners = frozenset(vs.owner for vs in step.desired.values()) | (step.only or frozenset())
            return SyncResult(
                mode=step.mode,
                full=step.only is None,
                operations={},
                errors=(ModeUnavailableError(reason),),
                failed_owners=owners,
            )
        return await proxier.sync(step.desired, step.only)

    async def _between(self, until: asyncio.Future[Any]) -> frozenset[str]:
        """The hook a stepped full sync awaits while it reads (:func:`fullsync.between`)."""
        inflight = self._inflight
        self._wake = asyncio.Event()  # of this event loop (an Event binds to its first loop)
        if inflight is None:
            return frozenset()
        return await between(inflight, until, Beside(self.tracker, self.clock, self._wake, self.holdings,
                                                     self.sync))

    def _absorb(self, result: SyncResult, owners: Collection[str], batch: Batch) -> set[str]:
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
        return failed & (set(owners) | set(result.failed_owners))

    def _update_gauges(self) -> None:
        for mode, proxier in self.proxiers.items():
            counts = proxier.counts()
            self.metrics.virtual_servers.labels(mode).set(counts.virtual_servers)
            self.metrics.real_servers.labels(mode).set(counts.real_servers)
            self.metrics.rules.labels(mode).set(counts.rules)
        self.metrics.services.set(len(self.applied))

    # ---- cleanup and report ------------------------------------------------------------
    def _fresh_unknown(self, error: OwnerError) -> bool:
        """A program waiting for its Service for less than ``unknown_grace``: not reported
        yet (the operator writes programs right after it sees the Service)."""
        return error.reason == UNKNOWN_SERVICE and self.wall() - error.time < self.unknown_grace

    async def cleanup(self) -> list[SyncResult]:
        """Every mode's cleanup (``svcproxy agent --cleanup``)."""
        return [await p.cleanup() for p in self.proxiers.values()]

    def health_checks(self) -> dict[str, tuple[int, int]]:
        """owner -> (healthCheckNodePort, ready local endpoints) of the programs this node
        serves (not refused, no error): what :mod:`svcproxy.agent.healthcheck` answers."""
        return {
            owner: (p.health_check_port, p.local_endpoints)
            for owner, p in self.programs.items()
            if p.health_check_port and not p.error and owner not in self.refused
        }

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
            errors=[e for e in self.errors.values() if not self._fresh_unknown(e)],
            last_sync_time=self.last_sync_time,
            last_sync_duration=self.last_sync_duration,
            ready=ready,
            ready_reason=reason,
            ready_message=message,
            extra_errors=tuple(self.node_errors),
        )
