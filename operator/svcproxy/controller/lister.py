"""Full lists of every watched kind: the cache's starting point and its periodic resync.

Watch events alone are not enough to act on: right after a start (or after
kopf's watches resume on a standby replica) a reconcile could see programs
but not yet their Services, and a Service missing from the picture means
"delete its program". So the reconciler does nothing until :func:`prime` has
listed every kind, and :func:`resync` re-lists periodically, dropping what a
missed DELETED event left behind (only objects not newer than the list).
Called by :mod:`svcproxy.controller.handlers` (startup) and the reconciler.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from svcproxy.api.common import GROUP, VERSION
from svcproxy.controller.cache import Cache

JSON = dict[str, Any]
log = logging.getLogger("svcproxy.operator")


class Lister:
    """Lists every kind the operator watches, in one namespace or all."""

    def __init__(self, api: client.ApiClient, namespace: str | None) -> None:
        self.api = api
        self.namespace = namespace
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._warned_nodes = False

    def _plain(self, obj: Any) -> JSON:
        out: JSON = obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)
        return out

    async def _core(self, what: str) -> JSON:
        ns = self.namespace
        resp: Any
        if what == "service":
            resp = await (
                self.core.list_namespaced_service(ns) if ns else self.core.list_service_for_all_namespaces()
            )
        elif what == "pod":
            resp = await (
                self.core.list_namespaced_pod(ns) if ns else self.core.list_pod_for_all_namespaces()
            )
        else:
            resp = await (
                self.discovery.list_namespaced_endpoint_slice(ns)
                if ns
                else self.discovery.list_endpoint_slice_for_all_namespaces()
            )
        return self._plain(resp)

    async def _custom(self, plural: str, cluster_scoped: bool = False) -> JSON:
        if self.namespace and not cluster_scoped:
            resp = await self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)
        else:
            resp = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        return self._plain(resp)

    async def _nodes(self) -> JSON | None:
        """Every Node, or None when the operator may not list them (it then counts ProxyNodes)."""
        try:
            return self._plain(await self.core.list_node())
        except ApiException as err:
            if err.status != 403:
                raise
            if not self._warned_nodes:
                self._warned_nodes = True
                log.warning(
                    "may not list Nodes (403): a node whose agent never reported is not counted; "
                    "grant get/list/watch on nodes to the operator's service account"
                )
            return None

    async def lists(self) -> dict[str, JSON]:
        """kind -> list object (items plus metadata.resourceVersion)."""
        out = {
            "policy": await self._custom("serviceproxypolicies"),
            "service": await self._core("service"),
            "slice": await self._core("slice"),
            "program": await self._custom("proxyvirtualservers"),
            "node": await self._custom("proxynodes", cluster_scoped=True),
            "pod": await self._core("pod"),
        }
        nodes = await self._nodes()
        if nodes is not None:
            out["k8snode"] = nodes
        return out


def _rv(obj: JSON) -> int | None:
    try:
        return int(str((obj.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return None


def apply_lists(cache: Cache, lists: dict[str, JSON]) -> None:
    """Merge full lists into ``cache``: listed objects in, unlisted ones not newer than the list out."""
    if "k8snode" in lists:
        cache.nodes_listed = True
    for kind, listing in lists.items():
        items = listing.get("items") or []
        list_rv = _rv(listing)
        if kind == "pod":
            seen_pods = set()
            for pod in items:
                meta = pod.get("metadata") or {}
                seen_pods.add((meta.get("namespace") or "", meta.get("name") or ""))
                cache.set_pod_labels(
                    meta.get("namespace") or "", meta.get("name") or "", meta.get("labels") or {}
                )
            for ns, pods in list(cache.pod_labels.items()):
                for name in list(pods):
                    if (ns, name) not in seen_pods:
                        cache.set_pod_labels(ns, name, None)
            continue
        seen = set()
        for obj in items:
            meta = obj.get("metadata") or {}
            seen.add((meta.get("namespace") or "", meta.get("name") or ""))
            cache.put(kind, obj)
        for ns, objs in list(cache.objects[kind].items()):
            for name, obj in list(objs.items()):
                if (ns, name) in seen:
                    continue
                rv = _rv(obj)
                if list_rv is None or rv is None or rv <= list_rv:
                    cache.remove(kind, ns, name)
