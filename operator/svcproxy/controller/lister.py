"""Full lists of every watched kind: the cache's starting point and its periodic resync.

Watch events alone are not enough to act on: right after a start (or after
kopf's watches resume on a standby replica) a reconcile could see programs
but not yet their Services, and a Service missing from the picture means
"delete its program". So the reconciler does nothing until :meth:`Lister.load`
has listed every kind, and calls it again periodically, dropping what a
missed DELETED event left behind (only objects not newer than the list).
Lists are read a page at a time as plain JSON and merged as they come
(:class:`ListMerge`), so a resync holds one page of full bodies, not every
object of every kind at once. Called by :mod:`svcproxy.controller.handlers`
(startup) and the reconciler.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from svcproxy.api.common import GROUP, VERSION
from svcproxy.controller.cache import Cache

JSON = dict[str, Any]
log = logging.getLogger("svcproxy.operator")


# Objects per list request: only one page of full bodies is alive at a time (at 10k Services
# a whole list of every kind at once was several hundred MB of transient objects).
PAGE = 500
# The order kinds are merged in; "k8snode" last, as it may be refused (403).
KINDS = ("policy", "cpolicy", "namespace", "service", "slice", "program", "node", "pod", "k8snode")
# Kinds the operator works without, and the refusal that means so: without Nodes the
# ProxyNode reports alone count; without Namespaces every namespace has no labels; without
# the cluster policy CRD (an older install) there are no cluster policies.
_OPTIONAL = {"k8snode": 403, "namespace": 403, "cpolicy": 404}
_WITHOUT = {
    "k8snode": "a node whose agent never reported is not counted; grant get/list/watch on nodes",
    "namespace": "cluster policies see no namespace labels; grant get/list/watch on namespaces",
    "cpolicy": "ClusterServiceProxyPolicies are ignored; install the chart's CRDs (crds/)",
}


class Lister:
    """Lists every kind the operator watches, in one namespace or all, a page at a time."""

    def __init__(self, api: client.ApiClient, namespace: str | None) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._warned: set[str] = set()

    def _call(self, kind: str) -> Callable[..., Awaitable[Any]]:
        ns = self.namespace
        core, custom = self.core, self.custom
        calls: dict[str, Callable[..., Awaitable[Any]]] = {
            "service": partial(core.list_namespaced_service, ns)
            if ns
            else core.list_service_for_all_namespaces,
            "pod": partial(core.list_namespaced_pod, ns) if ns else core.list_pod_for_all_namespaces,
            "slice": partial(self.discovery.list_namespaced_endpoint_slice, ns)
            if ns
            else self.discovery.list_endpoint_slice_for_all_namespaces,
            "k8snode": core.list_node,
            "namespace": core.list_namespace,
            "cpolicy": partial(
                custom.list_cluster_custom_object, GROUP, VERSION, "clusterserviceproxypolicies"
            ),
            "node": partial(custom.list_cluster_custom_object, GROUP, VERSION, "proxynodes"),
        }
        for kind_, plural in (("policy", "serviceproxypolicies"), ("program", "proxyvirtualservers")):
            calls[kind_] = (
                partial(custom.list_namespaced_custom_object, GROUP, VERSION, ns, plural)
                if ns
                else partial(custom.list_cluster_custom_object, GROUP, VERSION, plural)
            )
        return calls[kind]

    async def _get(self, kind: str, token: str | None) -> JSON:
        """One page of ``kind`` as plain JSON (the raw body: no client models in between)."""
        kwargs: dict[str, Any] = {"limit": PAGE, "_preload_content": False}
        if token:
            kwargs["_continue"] = token
        resp = await self._call(kind)(**kwargs)
        try:
            data = await resp.read()
            if not 200 <= resp.status <= 299:
                err = ApiException(status=resp.status, reason=resp.reason)
                err.body = data.decode(errors="replace")
                raise err
        finally:
            resp.release()
        page: JSON = json.loads(data)
        return page

    async def pages(self, kind: str) -> AsyncIterator[JSON]:
        """Every page of one kind's list (one consistent snapshot, by the continue token)."""
        token: str | None = None
        while True:
            page = await self._get(kind, token)
            token = str((page.get("metadata") or {}).get("continue") or "") or None
            yield page
            if token is None:
                return

    async def load(self, cache: Cache) -> None:
        """Merge a full list of every kind into ``cache``, one page at a time."""
        for kind in KINDS:
            merge = ListMerge(cache, kind)
            try:
                async for page in self.pages(kind):
                    merge.add(page)
            except ApiException as err:
                if _OPTIONAL.get(kind) != err.status:
                    raise
                if kind not in self._warned:
                    self._warned.add(kind)
                    log.warning("cannot list %s (HTTP %s): %s", kind, err.status, _WITHOUT[kind])
                continue
            merge.finish()


def _rv(obj: JSON) -> int | None:
    try:
        return int(str((obj.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return None


class ListMerge:
    """One kind's full list merged into the cache page by page: listed objects in (newer
    versions win), then, at :meth:`finish`, the unlisted ones not newer than the list out."""

    def __init__(self, cache: Cache, kind: str) -> None:
        self.cache = cache
        self.kind = kind
        self.seen: set[tuple[str, str]] = set()
        self.list_rv: int | None = None
        self.first = True

    def add(self, listing: JSON) -> None:
        if self.first:  # every page is of the first page's snapshot
            self.list_rv, self.first = _rv(listing), False
        cache = self.cache
        for obj in listing.get("items") or []:
            meta = obj.get("metadata") or {}
            ns, name = meta.get("namespace") or "", meta.get("name") or ""
            self.seen.add((ns, name))
            if self.kind == "pod":
                cache.set_pod_labels(ns, name, meta.get("labels") or {})
            else:
                cache.put(self.kind, obj)

    def finish(self) -> None:
        cache, seen = self.cache, self.seen
        if self.kind == "k8snode":
            cache.nodes_listed = True
        if self.kind == "pod":
            for ns, pods in list(cache.pod_labels.items()):
                for name in [n for n in pods if (ns, n) not in seen]:
                    cache.set_pod_labels(ns, name, None)
            return
        list_rv = self.list_rv
        for ns, objs in list(cache.objects[self.kind].items()):
            for name, obj in list(objs.items()):
                if (ns, name) in seen:
                    continue
                rv = _rv(obj)
                if list_rv is None or rv is None or rv <= list_rv:
                    cache.remove(self.kind, ns, name)


def apply_lists(cache: Cache, lists: dict[str, JSON]) -> None:
    """Merge whole lists (kind -> list object) into ``cache``; see :class:`ListMerge`."""
    if "k8snode" in lists:
        cache.nodes_listed = True
    for kind, listing in lists.items():
        merge = ListMerge(cache, kind)
        merge.add(listing)
        merge.finish()
