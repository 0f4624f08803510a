"""kopf handlers of the operator: a few lines each, delegating to plain functions.

Every watched kind feeds :func:`observe`, which updates the cache and touches
the namespaces the change affects; the reconciler does the rest. A cluster
policy's change touches the namespaces it selects or selected, a Namespace's
label change that namespace. The delete handlers of both policy kinds (which
make kopf keep a finalizer on every policy) wait until the handover of their
Services back to kube-proxy is done. ``on_startup``
applies the production settings. Imported by :mod:`svcproxy.controller.main`,
which is what registers these handlers with kopf.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from svcproxy.api.common import GROUP, VERSION
from svcproxy.controller.cache import Cache
from svcproxy.controller.client import ApiWriter, connect
from svcproxy.controller.lister import Lister
from svcproxy.controller.reconciler import Reconciler

JSON = dict[str, Any]
FINALIZER = "svcproxy.io/handover"


def configure_settings(settings: kopf.OperatorSettings, options: Any) -> None:
    """Production settings; ``options`` is the parsed CLI (see main.configure)."""
    settings.persistence.finalizer = FINALIZER
    # Keep kopf's bookkeeping out of our status schema (it would be pruned anyway).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="svcproxy.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="svcproxy.io", key="last-handled-configuration"
    )
    # kopf keeps one worker per object alive for idle_timeout (5 s) after its last event; with
    # a limit, the events of a busy object queue behind thousands of idle ones. The handlers
    # only update a cache,
    # so a worker costs one small task: no limit unless one is asked for.
    settings.batching.worker_limit = options.workers or None
    # Watch streams can stall silently: the server ends each watch, the client gives up after.
    settings.watching.server_timeout = options.watch_server_timeout
    settings.watching.client_timeout = options.watch_server_timeout + 30
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    settings.posting.enabled = False  # the reconciler posts its own, meaningful Events
    settings.peering.stealth = True
    # A replica killed -9 leaves its peering record behind: the standby (and a restarted
    # replica, which gets a new identity) waits until that record expires, and changes wait
    # with it: kopf's default of 60 s is too long; 15 s, renewed every 5-10 s, bounds that.
    settings.peering.lifetime = 15


async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    configure_settings(settings, memo.options)
    api = await connect(memo.options.kubeconfig)
    memo.api = api
    memo.reconciler.writer = ApiWriter(api)
    lister = Lister(api, memo.options.namespace)
    memo.resync = asyncio.get_running_loop().create_task(
        memo.reconciler.resync_forever(lister.load, memo.options.resync_seconds), name="svcproxy-resync"
    )


async def cleanup(memo: kopf.Memo) -> None:
    memo.reconciler.stop()
    resync = getattr(memo, "resync", None)
    if resync is not None:
        resync.cancel()
    api = getattr(memo, "api", None)
    if api is not None:
        await api.close()


def observe(cache: Cache, reconciler: Reconciler, kind: str, event: JSON) -> None:
    """Record one watch event and touch the namespaces it affects."""
    obj = dict(event.get("object") or {})
    meta = obj.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    gone = event.get("type") == "DELETED"
    if kind in ("cpolicy", "namespace"):
        _observe_cluster(cache, reconciler, kind, name, None if gone else obj)
        return
    if kind == "pod":
        labels = None if gone else {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        if cache.set_pod_labels(namespace, name, labels) and cache.namespace_needs_pod_labels(namespace):
            reconciler.touch(namespace)
        return
    expected_before = cache.expected_nodes() if kind == "k8snode" else None
    if gone:
        cache.remove(kind, namespace, name)
    else:
        cache.put(kind, obj)
    if kind == "k8snode":
        # Nodes change often (conditions, labels); only a change of who should run an
        # agent moves any policy's counts.
        if cache.expected_nodes() != expected_before:
            reconciler.touch_all()
    elif kind == "node":
        reconciler.touch_all()  # every policy's Programmed count may move
    elif (
        kind == "policy"
        or cache.has_policies(namespace)
        or cache.objects["program"][namespace]
    ):
        reconciler.touch(namespace)


def _observe_cluster(cache: Cache, reconciler: Reconciler, kind: str, name: str, obj: JSON | None) -> None:
    """A cluster policy re-plans the namespaces it selected, selects, or holds programs in;
    a Namespace re-plans itself when its labels change."""
    if kind == "namespace":
        before = cache.namespace_labels(name)
        if obj is None:
            cache.remove(kind, "", name)
        else:
            cache.put(kind, obj)
        if cache.namespace_labels(name) != before and cache.cluster_policies():
            reconciler.touch(name)
        return
    touched = cache.selected_by(cache.get(kind, "", name))
    if obj is None:
        cache.remove(kind, "", name)
    else:
        cache.put(kind, obj)
    touched |= cache.selected_by(obj)
    touched.update(key.partition("/")[0] for key in reconciler.owned_by_cluster(name))
    for namespace in sorted(touched):
        reconciler.touch(namespace)
    reconciler.touch_cluster()


# How long a delete handler waits in itself for the hand-back (label off, kube-proxy's grace,
# program deleted: about 3 s) before it gives the object back to kopf to retry. kopf logs
# every retry at error level; a hand-back on schedule is not an error.
HANDBACK_WAIT_SECONDS = 15.0
HANDBACK_POLL_SECONDS = 0.5


async def _handed_back(step: Callable[[], Awaitable[list[str]]], wait: float) -> None:
    """Run ``step`` (reconcile, return the Services still owned) until it returns none, for
    at most ``wait`` seconds; then a TemporaryError naming the rest (kopf retries)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        owned = await step()
        if not owned:
            return
        if loop.time() >= deadline:
            shown = ", ".join(owned[:10]) + (f" and {len(owned) - 10} more" if len(owned) > 10 else "")
            message = f"handing {shown} back to kube-proxy before removing the program"
            raise kopf.TemporaryError(message, delay=1)
        await asyncio.sleep(HANDBACK_POLL_SECONDS)


async def withdraw_cluster(
    cache: Cache, reconciler: Reconciler, body: JSON, *, wait: float = HANDBACK_WAIT_SECONDS
) -> None:
    """Finalizer step of a deleted cluster policy: done once none of its programs remain."""
    cache.put("cpolicy", body)
    name = str((body.get("metadata") or {}).get("name"))

    async def step() -> list[str]:
        owned = reconciler.owned_by_cluster(name)
        namespaces = cache.selected_by(body) | {key.partition("/")[0] for key in owned}
        for namespace in sorted(namespaces):
            if await reconciler.reconcile(namespace) is None:
                raise kopf.TemporaryError(f"could not reconcile namespace {namespace}; retrying", delay=2)
        return list(reconciler.owned_by_cluster(name))

    await _handed_back(step, wait)
    logging.getLogger("svcproxy.operator").info(
        "every Service handed back; cluster policy can go", extra={"k8s_ref": {"namespace": "", "name": name}}
    )


async def withdraw(
    cache: Cache, reconciler: Reconciler, body: JSON, *, wait: float = HANDBACK_WAIT_SECONDS
) -> None:
    """Finalizer step of a deleted policy: done once none of its programs remain."""
    cache.put("policy", body)
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))

    async def step() -> list[str]:
        if await reconciler.reconcile(namespace) is None:
            raise kopf.TemporaryError("could not reconcile the namespace; retrying", delay=2)
        return list(reconciler.still_owned(namespace, name))

    await _handed_back(step, wait)
    logging.getLogger("svcproxy.operator").info(
        "every Service handed back; policy can go", extra={"k8s_ref": {"namespace": namespace, "name": name}}
    )


# --- registrations (one line each) -------------------------------------------------------------


@kopf.on.login()
def on_login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    # $KUBECONFIG (set from --kubeconfig by main), else the Pod's service account.
    return kopf.login_with_kubeconfig(settings=settings) or kopf.login_with_service_account(settings=settings)


@kopf.on.startup()
async def on_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    await startup(settings, memo)


@kopf.on.cleanup()
async def on_cleanup(memo: kopf.Memo, **_: Any) -> None:
    await cleanup(memo)


@kopf.on.event(GROUP, VERSION, "serviceproxypolicies")
async def on_policy(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "policy", dict(event))


@kopf.on.delete(GROUP, VERSION, "serviceproxypolicies")
async def on_policy_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await withdraw(memo.cache, memo.reconciler, dict(body))


@kopf.on.event(GROUP, VERSION, "clusterserviceproxypolicies")
async def on_cluster_policy(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "cpolicy", dict(event))


@kopf.on.delete(GROUP, VERSION, "clusterserviceproxypolicies")
async def on_cluster_policy_delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await withdraw_cluster(memo.cache, memo.reconciler, dict(body))


@kopf.on.event("", "v1", "namespaces")
async def on_namespace(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "namespace", dict(event))


@kopf.on.event("", "v1", "services")
async def on_service(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "service", dict(event))


@kopf.on.event("discovery.k8s.io", "v1", "endpointslices")
async def on_slice(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "slice", dict(event))


@kopf.on.event(GROUP, VERSION, "proxyvirtualservers")
async def on_program(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "program", dict(event))


@kopf.on.event(GROUP, VERSION, "proxynodes")
async def on_node(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "node", dict(event))


@kopf.on.event("", "v1", "nodes")
async def on_k8s_node(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "k8snode", dict(event))


@kopf.on.event("", "v1", "pods")
async def on_pod(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    observe(memo.cache, memo.reconciler, "pod", dict(event))
