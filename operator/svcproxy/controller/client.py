"""The operator's writes to the API server, and its peering set-up.

kopf watches; this module writes: ProxyVirtualServers (created or replaced,
owned by their Service), the handover label on Services, the status of
namespaced and cluster policies (status subresource) and Events. It wraps ``kubernetes_asyncio`` so the
reconciler sees a narrow async interface (:class:`Writer`) that unit tests can
replace. Each call returns the stored object, so the reconciler's cache is
current before the watch event arrives. Called by :mod:`reconciler`; the
peering check and object by :mod:`main`, before kopf starts.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Protocol

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from svcproxy.api.common import GROUP, HANDOVER_LABEL, HANDOVER_VALUE, VERSION
from svcproxy.api.program import ProxyVirtualServerSpec

JSON = dict[str, Any]
PVS_PLURAL = "proxyvirtualservers"
SPP_PLURAL = "serviceproxypolicies"
CSPP_PLURAL = "clusterserviceproxypolicies"
COMPONENT = "svcproxy-operator"


class Writer(Protocol):
    """What the reconciler writes; the real one talks to the API server."""

    async def write_program(self, namespace: str, service: JSON, spec: ProxyVirtualServerSpec) -> JSON: ...

    async def delete_program(self, namespace: str, name: str) -> None: ...

    async def set_handover_label(self, namespace: str, name: str, on: bool) -> JSON | None: ...

    async def patch_policy_status(self, namespace: str, name: str, status: JSON) -> JSON | None: ...

    async def patch_cluster_policy_status(self, name: str, status: JSON) -> JSON | None: ...

    async def post_event(self, policy: JSON, type_: str, reason: str, message: str) -> None: ...


async def connect(kubeconfig: str | None) -> client.ApiClient:
    """An API client from ``kubeconfig``, else $KUBECONFIG, else the in-cluster account."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if path:
        await config.load_kube_config(config_file=path)
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def describe(err: BaseException) -> str:
    """One line for a log: the API server's status and message, not its headers."""
    if isinstance(err, ApiException):
        try:
            message = json.loads(err.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = ""
        return f"HTTP {err.status} {err.reason}: {message}".rstrip(": ")
    text = str(err)
    return text.splitlines()[0] if text else repr(err)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiWriter:
    """:class:`Writer` over kubernetes_asyncio."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.api = api

    def _serialize(self, obj: Any) -> JSON:
        if isinstance(obj, dict):
            return obj
        out: JSON = self.api.sanitize_for_serialization(obj)
        return out

    async def write_program(self, namespace: str, service: JSON, spec: ProxyVirtualServerSpec) -> JSON:
        meta = service.get("metadata") or {}
        name = str(meta["name"])
        body: JSON = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ProxyVirtualServer",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "svcproxy"},
                # Owned by the Service: deleting the Service garbage-collects its program.
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": name,
                        "uid": meta.get("uid"),
                        "controller": True,
                        "blockOwnerDeletion": False,
                    }
                ],
            },
            "spec": spec.wire(),
        }
        try:
            current = await self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PVS_PLURAL, name
            )
        except ApiException as err:
            if err.status != 404:
                raise
            created = await self.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PVS_PLURAL, body, field_manager=COMPONENT
            )
            return self._serialize(created)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        replaced = await self.custom.replace_namespaced_custom_object(
            GROUP, VERSION, namespace, PVS_PLURAL, name, body, field_manager=COMPONENT
        )
        return self._serialize(replaced)

    async def delete_program(self, namespace: str, name: str) -> None:
        try:
            await self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PVS_PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise

    async def set_handover_label(self, namespace: str, name: str, on: bool) -> JSON | None:
        patch = {"metadata": {"labels": {HANDOVER_LABEL: HANDOVER_VALUE if on else None}}}
        try:
            out = await self.core.patch_namespaced_service(name, namespace, patch, field_manager=COMPONENT)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self._serialize(out)

    async def patch_policy_status(self, namespace: str, name: str, status: JSON) -> JSON | None:
        patch = [{"op": "add", "path": "/status", "value": status}]
        try:
            out = await self.custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                SPP_PLURAL,
                name,
                patch,  # a list: the client sends it as application/json-patch+json
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self._serialize(out)

    async def patch_cluster_policy_status(self, name: str, status: JSON) -> JSON | None:
        patch = [{"op": "add", "path": "/status", "value": status}]
        try:
            out = await self.custom.patch_cluster_custom_object_status(
                GROUP, VERSION, CSPP_PLURAL, name, patch
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self._serialize(out)

    async def post_event(self, policy: JSON, type_: str, reason: str, message: str) -> None:
        meta = policy.get("metadata") or {}
        now = _now()
        # A cluster-scoped object's Events live in "default", as kubectl describe looks there.
        namespace = meta.get("namespace") or "default"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{meta.get('name', 'policy')}.",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": policy.get("kind") or "ServiceProxyPolicy",
                "name": meta.get("name"),
                "namespace": meta.get("namespace") or "",
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.core.create_namespaced_event(namespace, body)  # type: ignore[arg-type]


PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


async def peering_available(api: client.ApiClient, namespace: str | None) -> bool:
    """True when kopf's peering CRD for this scope (namespaced or cluster) is installed."""
    plural = "kopfpeerings" if namespace else "clusterkopfpeerings"
    try:
        await client.ApiextensionsV1Api(api).read_custom_resource_definition(f"{plural}.{PEERING_GROUP}")
    except ApiException as err:
        if err.status == 404:
            return False
        raise
    return True


async def ensure_peering_object(api: client.ApiClient, name: str, namespace: str | None) -> None:
    """Create kopf's peering object ``name`` unless it exists."""
    custom = client.CustomObjectsApi(api)
    meta: JSON = {"name": name}
    try:
        if namespace:
            meta["namespace"] = namespace
            body = {
                "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
                "kind": "KopfPeering",
                "metadata": meta,
            }
            await custom.create_namespaced_custom_object(
                PEERING_GROUP, PEERING_VERSION, namespace, "kopfpeerings", body
            )
        else:
            body = {
                "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
                "kind": "ClusterKopfPeering",
                "metadata": meta,
            }
            await custom.create_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", body
            )
    except ApiException as err:
        if err.status != 409:
            raise
