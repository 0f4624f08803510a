"""Coalescing reconciler: one namespace at a time, plan purely, then write.

kopf handlers record what they see in the :class:`~svcproxy.controller.cache.Cache`
and call :meth:`Reconciler.touch` for the namespaces it affects. A single
worker task drains the set of touched namespaces, so a burst of ten
EndpointSlice events costs one plan and at most one write per object. Each
pass asks :func:`svcproxy.compile.planner.plan_namespace` what to do and
performs it in handover order: write programs, label Services, unlabel
Services, delete programs (the plan only deletes once the handover delay has
passed, and asks for a recheck then), write policy status, post Events.
Each pass also keeps what every cluster policy does in the namespace (its
:class:`~svcproxy.compile.cluster.ClusterPart`); after a batch of namespaces the
worker folds those parts into each cluster policy's status and writes the
ones that changed. Failures are logged, counted and retried with a backoff; they never stop the
worker. Used by :mod:`svcproxy.controller.handlers`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from svcproxy.compile.cluster import CLUSTER_PREFIX, ClusterPart, cluster_status
from svcproxy.compile.events import transitions
from svcproxy.compile.planner import NamespacePlan, PlanMemo, plan_namespace
from svcproxy.controller import metrics
from svcproxy.controller.cache import Cache
from svcproxy.controller.client import Writer, describe

JSON = dict[str, Any]
log = logging.getLogger("svcproxy.operator")
RETRY_SECONDS = (0.5, 1, 2, 5, 10, 30)
# Writes of one kind in one pass are independent of each other, so they go out together,
# this many at a time: one at a time, a policy over many Services waits on one round
# trip per write. The handover order between kinds is kept (each kind waits for the last).
WRITES_IN_FLIGHT = 16


def _iso_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ref(namespace: str, name: str = "") -> dict[str, Any]:
    return {"k8s_ref": {"namespace": namespace, "name": name}}


async def _together(calls: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``calls`` with at most WRITES_IN_FLIGHT at once, every one to its end; then
    raise the first failure, if any (what succeeded is in the cache, the pass is retried)."""
    if len(calls) == 1:
        await calls[0]
        return
    gate = asyncio.Semaphore(WRITES_IN_FLIGHT)

    async def gated(call: Coroutine[Any, Any, None]) -> None:
        async with gate:
            await call

    results = await asyncio.gather(*(gated(c) for c in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


class Reconciler:
    """Plans and applies one namespace at a time; see the module docstring."""

    def __init__(
        self,
        cache: Cache,
        writer: Writer,
        *,
        handover_delay: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.writer = writer
        self.handover_delay = handover_delay
        self.clock = clock
        self.unlabelled_at: dict[str, dict[str, float]] = {}
        self.owned_after: dict[str, dict[str, str]] = {}
        self.failures: dict[str, int] = {}
        # One planner memo per namespace: a pass recompiles only the Services whose
        # inputs changed (svcproxy.compile.planner.memo says what keys them).
        self.memos: dict[str, PlanMemo] = {}
        # Cluster policy -> namespace -> what it does there, from each namespace's last pass.
        self.cluster_parts: dict[str, dict[str, ClusterPart]] = {}
        self._cluster_dirty = False
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._locks: dict[str, asyncio.Lock] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # Nothing is planned before every kind was listed once: a partial picture
        # (programs without their Services) would withdraw Services that are fine.
        self.ready = asyncio.Event()

    def stop(self) -> None:
        """Stop planning (operator shutdown): cancel the worker and pending rechecks."""
        self._stopped = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._task is not None:
            self._task.cancel()

    def touch(self, namespace: str) -> None:
        """Ask for a reconcile of ``namespace`` soon (bursts coalesce)."""
        if self._stopped:
            return
        self._dirty.add(namespace)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="svcproxy-reconciler")

    def touch_cluster(self) -> None:
        """Ask for the cluster policies' statuses to be folded and written soon."""
        if self._stopped:
            return
        self._cluster_dirty = True
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="svcproxy-reconciler")

    def touch_all(self) -> None:
        for namespace in self.cache.namespaces_with_policies() + sorted(self.owned_after):
            self.touch(namespace)

    def _later(self, namespace: str, delay: float) -> None:
        old = self._timers.pop(namespace, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._timers[namespace] = loop.call_later(max(delay, 0.05), self.touch, namespace)

    async def resync_forever(self, load: Callable[[Cache], Awaitable[None]], interval: float) -> None:
        """List every kind into the cache (``load``, e.g. :meth:`Lister.load`) now and every
        ``interval`` seconds; the first complete list opens the gate."""
        failures = 0
        while True:
            try:
                await load(self.cache)
            except Exception as err:
                # Right after CRDs are created the API server answers 429 "storage is
                # (re)initializing" for a moment: retry soon, then back off.
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                metrics.ERRORS.labels("list").inc()
                log.warning("listing the cluster failed (retry in %s s): %s", delay, describe(err))
                await asyncio.sleep(delay)
                continue
            failures = 0
            if not self.ready.is_set():
                log.info("cache primed from full lists; reconciling")
                self.ready.set()
            self.touch_all()
            await asyncio.sleep(interval)

    async def _worker(self) -> None:
        await self.ready.wait()
        while True:
            await self._wake.wait()
            self._wake.clear()
            # A short pause lets a burst of watch events land before planning.
            await asyncio.sleep(0.05)
            batch, self._dirty = sorted(self._dirty), set()
            for namespace in batch:
                await self.reconcile(namespace)
            if self._cluster_dirty:
                await self.write_cluster_statuses()

    async def reconcile(self, namespace: str) -> NamespacePlan | None:
        """Plan and apply ``namespace`` now; None when the pass failed (it is retried)."""
        if not self.ready.is_set():
            return None  # the worker picks touched namespaces up once primed
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            try:
                plan = await self._reconcile(namespace)
            except Exception as err:
                count = self.failures.get(namespace, 0)
                self.failures[namespace] = count + 1
                delay = RETRY_SECONDS[min(count, len(RETRY_SECONDS) - 1)]
                metrics.RECONCILES.labels("error").inc()
                log.warning(
                    "reconcile of %s failed (retry in %s s): %s",
                    namespace,
                    delay,
                    describe(err),
                    extra=_ref(namespace),
                )
                self._later(namespace, delay)
                return None
            self.failures.pop(namespace, None)
            metrics.RECONCILES.labels("ok").inc()
            if plan.recheck_at is not None:
                self._later(namespace, plan.recheck_at - self.clock())
            return plan

    async def _reconcile(self, namespace: str) -> NamespacePlan:
        view = self.cache.view(
            namespace,
            now=self.clock(),
            now_iso=_iso_now(),
            unlabelled_at=self.unlabelled_at.get(namespace, {}),
            handover_delay=self.handover_delay,
        )
        started = time.perf_counter()
        plan = plan_namespace(view, self.memos.setdefault(namespace, PlanMemo()))
        self._keep_parts(namespace, plan)
        if not view.policies and not view.programs and not view.cluster_policies:
            self.memos.pop(namespace, None)  # nothing of ours here any more
        metrics.COMPILE_SECONDS.observe(time.perf_counter() - started)
        w = self.writer

        async def write(name: str) -> None:
            spec = plan.writes[name]
            op = "replace" if name in view.programs else "create"
            stored = await self._step("write", w.write_program(namespace, view.services[name], spec))
            self.cache.put("program", stored)
            metrics.PROGRAM_WRITES.labels(op).inc()
            log.info("%s ProxyVirtualServer (content %s)", op, spec.content_hash, extra=_ref(namespace, name))

        async def label(name: str, on: bool) -> None:
            out = await self._step("label", w.set_handover_label(namespace, name, on))
            if out is not None:
                self.cache.put("service", out)
            metrics.LABEL_WRITES.labels("add" if on else "remove").inc()
            log.info("%s handover label", "added" if on else "removed", extra=_ref(namespace, name))

        async def delete(name: str) -> None:
            await self._step("delete", w.delete_program(namespace, name))
            self.cache.remove("program", namespace, name)
            metrics.PROGRAM_WRITES.labels("delete").inc()
            log.info("deleted ProxyVirtualServer", extra=_ref(namespace, name))

        # Programs before labels (an agent must have the program before kube-proxy lets
        # go), unlabels before deletes (the plan lists only programs whose delay is over).
        await _together([write(n) for n in plan.writes])
        await _together([label(n, True) for n in plan.label] + [label(n, False) for n in plan.unlabel])
        await _together([delete(n) for n in plan.delete])
        self.unlabelled_at[namespace] = plan.unlabelled_at
        self.owned_after[namespace] = plan.owned_after
        for name, status in plan.statuses.items():
            out = await self._step("status", w.patch_policy_status(namespace, name, status))
            if out is not None:
                self.cache.put("policy", out)
        await self._post_events(namespace, plan)
        return plan

    def _keep_parts(self, namespace: str, plan: NamespacePlan) -> None:
        for name, part in plan.cluster.items():
            parts = self.cluster_parts.setdefault(name, {})
            if parts.get(namespace) != part:
                parts[namespace] = part
                self._cluster_dirty = True
        for name, parts in self.cluster_parts.items():
            if name not in plan.cluster and parts.pop(namespace, None) is not None:
                self._cluster_dirty = True

    async def write_cluster_statuses(self) -> None:
        """Fold every cluster policy's parts into its status; write those that changed."""
        self._cluster_dirty = False
        cache = self.cache
        expected = cache.expected_nodes()
        reports = [n for n in cache.nodes() if expected is None or n.metadata.name in expected]
        total = len(reports) if expected is None else len(expected)
        now_iso = _iso_now()
        for parsed in cache.cluster_policies():
            name = parsed.name
            if parsed.deleting:
                continue
            parts = self.cluster_parts.get(name, {})
            status = cluster_status(
                parsed, parts, nodes_reporting=len(reports), nodes_total=total, now_iso=now_iso
            )
            if status == parsed.raw.get("status"):
                continue
            try:
                out = await self._step("status", self.writer.patch_cluster_policy_status(name, status))
            except Exception as err:
                log.warning(
                    "status of ClusterServiceProxyPolicy %s not written (retrying): %s",
                    name,
                    describe(err),
                    extra=_ref("", name),
                )
                self._cluster_dirty = True
                self._later_cluster(2.0)
                continue
            if out is not None:
                cache.put("cpolicy", out)
            await self._post_cluster_events(parsed.raw, status)
        for name in [n for n in self.cluster_parts if cache.get("cpolicy", "", n) is None]:
            del self.cluster_parts[name]

    def _later_cluster(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.touch_cluster)

    async def _post_cluster_events(self, raw: JSON, status: JSON) -> None:
        """Events for a cluster policy's condition changes, best effort as for namespaced ones."""
        name = str((raw.get("metadata") or {}).get("name"))
        body = {"kind": "ClusterServiceProxyPolicy", **raw}
        for event in transitions(raw.get("status"), status.get("conditions") or []):
            try:
                posting = self.writer.post_event(body, event.type, event.reason, event.message)
                await self._step("event", posting)
            except Exception as err:
                log.info("event %s not posted: %s", event.reason, describe(err), extra=_ref("", name))

    async def _post_events(self, namespace: str, plan: NamespacePlan) -> None:
        for event in plan.events:
            policy = self.cache.get("policy", namespace, event.policy)
            if policy is None:
                continue
            try:
                await self._step(
                    "event", self.writer.post_event(policy, event.type, event.reason, event.message)
                )
            except Exception as err:
                # Events are best effort: a terminating namespace refuses new ones (403),
                # and the status already says the same thing.
                log.info(
                    "event %s not posted: %s",
                    event.reason,
                    describe(err),
                    extra=_ref(namespace, event.policy),
                )

    async def _step(self, stage: str, call: Any) -> Any:
        try:
            return await call
        except Exception:
            metrics.ERRORS.labels(stage).inc()
            raise

    def owned_by_cluster(self, name: str) -> list[str]:
        """``namespace/Service`` of the programs that still come from cluster policy ``name``."""
        stand_in = CLUSTER_PREFIX + name
        return sorted(
            f"{ns}/{svc}"
            for ns, owned in self.owned_after.items()
            for svc, p in owned.items()
            if p == stand_in
        )

    def still_owned(self, namespace: str, policy: str) -> list[str]:
        """ProxyVirtualServers that still come from ``policy`` after the last pass."""
        return sorted(n for n, p in self.owned_after.get(namespace, {}).items() if p == policy)
