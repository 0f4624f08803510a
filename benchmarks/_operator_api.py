"""The in-memory API server of ``operator_memory.py``: bodies as kube-apiserver serves them.

:class:`ApiServer` rebuilds every object from a few numbers (it stores no bodies: what it
held would count in the measured process's RSS): full Nodes, policies, Services,
EndpointSlices, ProxyVirtualServers and ProxyNode reports with managedFields, and list
pages with ``continue``. :class:`Writer` is the reconciler's Writer against it: each write
returns the stored object, as the real client does, and queues its watch echo. Used only
by ``benchmarks/operator_memory.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from typing import Any

NS = "bench"
NODES = ("node-1", "node-2", "node-3")
ZONES = ("zone-a", "zone-b", "zone-c")
GROUP_LABEL = "bench.svcproxy.io/group"
JSON = dict[str, Any]


def _uid(kind: int, i: int) -> str:
    return str(uuid.UUID(int=kind << 64 | i))


def _managed(manager: str, fields: JSON, operation: str = "Update", sub: str | None = None) -> JSON:
    entry: JSON = {
        "manager": manager,
        "operation": operation,
        "apiVersion": "v1",
        "time": "2026-11-27T07:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    if sub:
        entry["subresource"] = sub
    return entry


def wire(obj: JSON) -> JSON:
    """A fresh copy as a watch or a client would parse it (no string shared with the sender)."""
    out: JSON = json.loads(json.dumps(obj))
    return out


class ApiServer:
    """Bodies as kube-apiserver would serve them, rebuilt from a few numbers (it stores no bodies:
    what it held would count in the operator's RSS), and the resourceVersion counter."""

    def __init__(self, size: int, endpoints: int, policies: int) -> None:
        self.size, self.endpoints, self.policies = size, endpoints, policies
        self.rv = 10_000
        self.service_rv: dict[int, int] = {}
        self.slice_rv: dict[int, int] = {}
        self.labelled: set[int] = set()
        self.program_rv: dict[str, int] = {}
        # Programs as written, for the resync's list: on disk, so they do not count in the RSS.
        self.program_file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the run
        self.program_at: dict[str, int] = {}  # name -> where its last write starts in the file
        self.policy_rv: dict[int, int] = {}
        self.statuses: dict[int, JSON] = {}  # the operator's last status (the API stores it too)
        self.echoes: list[tuple[str, JSON]] = []  # watch events of the writes, delivered later

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    # -- bodies ---------------------------------------------------------------------------
    def node(self, k: int) -> JSON:
        name = NODES[k]
        cond = [
            {
                "type": t,
                "status": "False",
                "reason": f"Kubelet{t}",
                "message": f"kubelet says {t}",
                "lastHeartbeatTime": "2026-11-27T07:00:00Z",
                "lastTransitionTime": "2026-11-27T06:00:00Z",
            }
            for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        cond.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2026-11-27T07:00:00Z",
                "lastTransitionTime": "2026-11-27T06:00:00Z",
            }
        )
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "uid": _uid(1, k),
                "resourceVersion": str(self.next_rv()),
                "creationTimestamp": "2026-11-27T06:00:00Z",
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "topology.kubernetes.io/zone": ZONES[k],
                },
                "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                "managedFields": [_managed("kubelet", {"f:status": {"f:conditions": {}}}, sub="status")],
            },
            "spec": {"podCIDR": f"10.244.{k + 1}.0/24", "podCIDRs": [f"10.244.{k + 1}.0/24"]},
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": f"172.29.0.{11 + k}"},
                    {"type": "Hostname", "address": name},
                ],
                "capacity": {"cpu": "2", "memory": "24000000Ki", "pods": "110"},
                "allocatable": {"cpu": "2", "memory": "23000000Ki", "pods": "110"},
                "conditions": cond,
                "nodeInfo": {
                    "kubeletVersion": "v1.36.3",
                    "kernelVersion": "6.1.0",
                    "osImage": "lab",
                    "containerRuntimeVersion": "lab://1",
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "machineID": _uid(9, k),
                    "systemUUID": _uid(8, k),
                    "bootID": _uid(7, k),
                    "kubeProxyVersion": "",
                },
                "images": [
                    {"names": [f"registry.example/image-{j}:v1"], "sizeBytes": 10_000_000 + j}
                    for j in range(20)
                ],
            },
        }

    def policy(self, k: int, with_status: bool = True) -> JSON:
        spec: JSON = {"serviceSelector": {"matchLabels": {GROUP_LABEL: f"g{k}"}}, "priority": 0}
        shape = k % 4
        if shape == 0:
            spec["mode"] = "iptables"
        elif shape == 1:
            spec.update(mode="ipvs", ipvs={"scheduler": "rr"})
        elif shape == 2:
            spec.update(
                mode="ipvs",
                ipvs={"scheduler": "sh"},
                sessionAffinity={"type": "ClientIP", "timeoutSeconds": 600},
            )
        else:
            spec.update(mode="iptables", sessionAffinity={"type": "None"})
        rv = self.policy_rv.setdefault(k, self.next_rv())
        body: JSON = {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ServiceProxyPolicy",
            "metadata": {
                "name": f"policy-{k}",
                "namespace": NS,
                "uid": _uid(2, k),
                "generation": 1,
                "resourceVersion": str(rv),
                "creationTimestamp": f"2026-11-27T06:0{k % 10}:00Z",
                "finalizers": ["svcproxy.io/handover"],
                "managedFields": [
                    _managed("kubectl", {"f:spec": {"f:mode": {}}}),
                    _managed("svcproxy-operator", {"f:status": {}}, sub="status"),
                ],
            },
            "spec": spec,
        }
        if with_status and k in self.statuses:
            body["status"] = self.statuses[k]
        return body

    def service(self, i: int) -> JSON:
        name = f"svc-{i:05d}"
        vip = f"10.96.{16 + i // 250}.{i % 250 + 1}"
        labels = {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/part-of": "bench",
            GROUP_LABEL: f"g{i % self.policies}",
        }
        managed = [
            _managed(
                "kubectl-create",
                {
                    "f:metadata": {"f:labels": {f"f:{k}": {} for k in labels}},
                    "f:spec": {"f:ports": {}, "f:sessionAffinity": {}},
                },
            )
        ]
        if i in self.labelled:
            labels["service.kubernetes.io/service-proxy-name"] = "svcproxy"
            managed.append(
                _managed(
                    "svcproxy-operator",
                    {"f:metadata": {"f:labels": {"f:service.kubernetes.io/service-proxy-name": {}}}},
                    operation="Apply",
                )
            )
        rv = self.service_rv.setdefault(i, self.next_rv())
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": _uid(3, i),
                "resourceVersion": str(rv),
                "creationTimestamp": "2026-11-27T06:10:00Z",
                "labels": labels,
                "managedFields": managed,
            },
            "spec": {
                "clusterIP": vip,
                "clusterIPs": [vip],
                "internalTrafficPolicy": "Cluster",
                "ipFamilies": ["IPv4"],
                "ipFamilyPolicy": "SingleStack",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                "sessionAffinity": "None",
                "type": "ClusterIP",
            },
            "status": {"loadBalancer": {}},
        }

    def endpoint_slice(self, i: int) -> JSON:
        name = f"svc-{i:05d}"
        base = i * self.endpoints
        eps = []
        for k in range(self.endpoints):
            n = base + k
            pod = f"{name}-7d9f8c6b5-{n:05x}"
            eps.append(
                {
                    "addresses": [f"10.{244 + n // 65000}.{n // 250 % 260}.{n % 250 + 1}"],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": NODES[k % len(NODES)],
                    "zone": ZONES[k % len(ZONES)],
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": NS, "uid": _uid(4, n)},
                }
            )
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-abcde",
                "generateName": f"{name}-",
                "namespace": NS,
                "uid": _uid(5, i),
                "resourceVersion": str(self.slice_rv.setdefault(i, self.next_rv())),
                "generation": 1,
                "creationTimestamp": "2026-11-27T06:10:01Z",
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-27T06:10:01Z"},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": name,
                        "uid": _uid(3, i),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "managedFields": [
                    _managed(
                        "kube-controller-manager",
                        {
                            "f:addressType": {},
                            "f:endpoints": {},
                            "f:ports": {},
                            "f:metadata": {
                                "f:annotations": {".": {}},
                                "f:generateName": {},
                                "f:labels": {".": {}},
                                "f:ownerReferences": {},
                            },
                        },
                    )
                ],
            },
            "addressType": "IPv4",
            "endpoints": eps,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }

    def program(self, name: str, spec: JSON) -> JSON:
        i = int(name.rsplit("-", 1)[1])
        rv = self.program_rv[name]
        return {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ProxyVirtualServer",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": _uid(6, i),
                "resourceVersion": str(rv),
                "generation": 1,
                "creationTimestamp": "2026-11-27T06:20:00Z",
                "labels": {"app.kubernetes.io/managed-by": "svcproxy"},
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "Service",
                        "name": name,
                        "uid": _uid(3, i),
                        "controller": True,
                        "blockOwnerDeletion": False,
                    }
                ],
                "managedFields": [
                    _managed(
                        "svcproxy-operator",
                        {
                            "f:metadata": {
                                "f:labels": {".": {}, "f:app.kubernetes.io/managed-by": {}},
                                "f:ownerReferences": {".": {}},
                            },
                            "f:spec": {
                                ".": {},
                                "f:contentHash": {},
                                "f:mode": {},
                                "f:policy": {".": {}},
                                "f:service": {".": {}},
                                "f:summary": {".": {}},
                                "f:virtualServers": {},
                            },
                        },
                    )
                ],
            },
            "spec": spec,
        }

    def proxy_node(self, k: int, applied: dict[str, str]) -> JSON:
        name = NODES[k]
        return {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ProxyNode",
            "metadata": {
                "name": name,
                "uid": _uid(10, k),
                "resourceVersion": str(self.next_rv()),
                "generation": 1,
                "creationTimestamp": "2026-11-27T06:00:00Z",
                "managedFields": [_managed("svcproxy-agent", {"f:status": {}}, sub="status")],
            },
            "status": {
                "nodeName": name,
                "agentVersion": "0.1.0",
                "capabilities": {"ipvs": True, "iptables": True, "nftables": False},
                "modes": [{"requested": m, "effective": m} for m in ("ipvs", "iptables", "userspace")],
                "modesSummary": "ipvs,iptables,userspace",
                "applied": applied,
                "errors": [],
            },
        }

    # -- lists (the periodic resync) -------------------------------------------------------
    def count(self, kind: str) -> int:
        counts = {
            "policy": self.policies,
            "service": self.size,
            "slice": self.size,
            "program": len(self.program_at),
            "node": len(NODES),
            "k8snode": len(NODES),
        }
        return counts.get(kind, 0)

    def item(self, kind: str, i: int, applied: dict[str, str]) -> JSON:
        if kind == "policy":
            return self.policy(i)
        if kind == "service":
            return self.service(i)
        if kind == "slice":
            return self.endpoint_slice(i)
        if kind == "program":
            self.program_file.seek(self.program_at[f"svc-{i:05d}"])
            name, spec = json.loads(self.program_file.readline())
            return self.program(name, spec)
        if kind == "node":
            return self.proxy_node(i, applied)
        return self.node(i)

    def page(self, kind: str, start: int, applied: dict[str, str], limit: int) -> JSON:
        """One page of a list, as the API server serves it (``continue``: where the next starts)."""
        end = min(self.count(kind), start + limit)
        meta: JSON = {"resourceVersion": str(self.rv)}
        if end < self.count(kind):
            meta["continue"] = str(end)
        return {"metadata": meta, "items": [self.item(kind, i, applied) for i in range(start, end)]}


class Writer:
    """The reconciler's :class:`~svcproxy.controller.client.Writer` against :class:`ApiServer`:
    returns the stored object (as the real client does) and queues its watch echo."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.writes = 0

    async def write_program(self, namespace: str, service: JSON, spec: Any) -> JSON:
        name = str(service["metadata"]["name"])
        self.api.program_rv[name] = self.api.next_rv()
        written = spec.wire()
        self.api.program_at[name] = self.api.program_file.seek(0, os.SEEK_END)
        self.api.program_file.write(json.dumps([name, written]) + "\n")
        body = self.api.program(name, written)
        self.api.echoes.append(("program", body))
        self.writes += 1
        return wire(body)

    async def delete_program(self, namespace: str, name: str) -> None:
        self.writes += 1

    async def set_handover_label(self, namespace: str, name: str, on: bool) -> JSON | None:
        i = int(name.rsplit("-", 1)[1])
        (self.api.labelled.add if on else self.api.labelled.discard)(i)
        self.api.service_rv[i] = self.api.next_rv()
        body = self.api.service(i)
        self.api.echoes.append(("service", body))
        self.writes += 1
        return wire(body)

    async def patch_policy_status(self, namespace: str, name: str, status: JSON) -> JSON | None:
        k = int(name.rsplit("-", 1)[1])
        self.api.statuses[k] = wire(status)
        self.api.policy_rv[k] = self.api.next_rv()
        body = self.api.policy(k)
        self.api.echoes.append(("policy", body))
        self.writes += 1
        return wire(body)

    async def post_event(self, policy: JSON, type_: str, reason: str, message: str) -> None:
        return None
