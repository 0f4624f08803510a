"""Builders of plain API objects (policies, Services, EndpointSlices, ProxyNodes)
for the compile and conflict tests."""

from __future__ import annotations

from typing import Any

from svcproxy.api import ProxyNode, ServiceProxyPolicy

JSON = dict[str, Any]


def policy_obj(
    name: str = "p",
    spec: JSON | None = None,
    *,
    created: str = "2026-01-01T00:00:00Z",
    generation: int = 1,
    namespace: str = "ns",
    status: JSON | None = None,
    deleting: bool = False,
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": namespace,
        "uid": f"uid-{name}",
        "generation": generation,
        "creationTimestamp": created,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T00:00:00Z"
    obj: JSON = {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ServiceProxyPolicy",
        "metadata": meta,
        "spec": spec if spec is not None else {"services": ["web"]},
    }
    if status is not None:
        obj["status"] = status
    return obj


def policy(name: str = "p", spec: JSON | None = None, **kw: Any) -> ServiceProxyPolicy:
    return ServiceProxyPolicy.parse(policy_obj(name, spec, **kw))


def service(
    name: str = "web",
    *,
    ports: list[JSON] | None = None,
    cluster_ip: str | None = "10.96.0.10",
    cluster_ips: list[str] | None = None,
    labels: dict[str, str] | None = None,
    type_: str = "ClusterIP",
    affinity: str | None = None,
    affinity_timeout: int | None = None,
) -> JSON:
    spec: JSON = {
        "type": type_,
        "ports": ports
        if ports is not None
        else [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}],
    }
    if cluster_ip is not None:
        spec["clusterIP"] = cluster_ip
        spec["clusterIPs"] = cluster_ips or [cluster_ip]
    if affinity:
        spec["sessionAffinity"] = affinity
        if affinity_timeout is not None:
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "uid": f"svc-{name}", "labels": labels or {}},
        "spec": spec,
    }


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    pod: str | None = None,
    node: str = "node-1",
) -> JSON:
    cond: JSON = {}
    if ready is not None:
        cond["ready"] = ready
    if serving is not None:
        cond["serving"] = serving
    if terminating is not None:
        cond["terminating"] = terminating
    ep: JSON = {"addresses": [address], "conditions": cond, "nodeName": node}
    if pod:
        ep["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "ns"}
    return ep


def endpoint_slice(
    endpoints: list[JSON],
    *,
    ports: list[JSON] | None = None,
    name: str = "web-abc",
    address_type: str = "IPv4",
) -> JSON:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def proxy_node(
    name: str,
    applied: dict[str, str] | None = None,
    *,
    modes: list[JSON] | None = None,
    errors: list[JSON] | None = None,
) -> ProxyNode:
    return ProxyNode.parse(
        {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ProxyNode",
            "metadata": {"name": name},
            "status": {
                "nodeName": name,
                "applied": applied or {},
                "modes": modes or [],
                "errors": errors or [],
            },
        }
    )
