"""operator_memory: what the operator keeps in memory holding N Services, without a lab; prints JSON.

Each size runs in a fresh child process (one size's garbage does not count in
the next) that feeds the operator's own handler path exactly the objects the
API server would deliver, parsed from JSON text as a watch parses them:

* 3 Nodes (full bodies: addresses, images, conditions, nodeInfo);
* ``--policies`` ServiceProxyPolicies, each selecting 1/P of the Services by
  label (iptables; ipvs rr; ipvs sh with ClientIP affinity; ...);
* N Services (full bodies: managedFields, clusterIPs, ipFamilies, status);
* N EndpointSlices with ``--endpoints`` endpoints each (conditions, nodeName,
  zone, targetRef with uid; ownerReferences, managedFields, annotations).

Then it runs the reconciler's passes as in a cluster, with an in-memory API
server that stores each write the way kube-apiserver does (new
resourceVersion, uid, managedFields) and whose watch echoes it back: every
ProxyVirtualServer written, 3 agents' ProxyNode reports applying all of
them, the handover labels, the policy statuses, until a pass writes nothing;
then one periodic resync (full lists of every kind, merged as the operator does).
Reported per size: RSS (``VmRSS`` after ``gc.collect()``) after import, after
the objects are fed, after the passes, after the resync, and the peak
(``VmHWM``).

Two variants per size: ``cache`` calls :func:`svcproxy.controller.handlers.observe`
directly (the operator's own cache and planner); ``kopf`` delivers every
event through kopf's own ``process_resource_event`` with the operator's
registered handlers and settings, so kopf's per-object bookkeeping (its
``ResourceMemory`` per object uid, kept until the object is deleted) is
counted too. With ``--trace`` the largest size runs once more under
:mod:`tracemalloc` (kopf variant) and lists what stays alive grouped by
file:line of the allocating frame, and by the first svcproxy/kopf frame on
the allocation's stack (tracing costs memory itself, so its RSS is not
reported). ``--src`` measures other sources (an older commit's
``operator/``: a before figure in the same run). No traffic, no root needed.

    .venv/bin/python benchmarks/operator_memory.py [--sizes 1000,10000] [--endpoints 10]
        [--policies 4] [--variants cache,kopf] [--trace] [--src OLD/operator] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NS = "bench"
PAGE = 500
NODES = ("node-1", "node-2", "node-3")
ZONES = ("zone-a", "zone-b", "zone-c")
GROUP_LABEL = "bench.svcproxy.io/group"
JSON = dict[str, Any]


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def status_mb(field: str) -> float:
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(field + ":"):
            return round(int(text.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


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


def _wire(obj: JSON) -> JSON:
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
        wire = spec.wire()
        self.api.program_at[name] = self.api.program_file.seek(0, os.SEEK_END)
        self.api.program_file.write(json.dumps([name, wire]) + "\n")
        body = self.api.program(name, wire)
        self.api.echoes.append(("program", body))
        self.writes += 1
        return _wire(body)

    async def delete_program(self, namespace: str, name: str) -> None:
        self.writes += 1

    async def set_handover_label(self, namespace: str, name: str, on: bool) -> JSON | None:
        i = int(name.rsplit("-", 1)[1])
        (self.api.labelled.add if on else self.api.labelled.discard)(i)
        self.api.service_rv[i] = self.api.next_rv()
        body = self.api.service(i)
        self.api.echoes.append(("service", body))
        self.writes += 1
        return _wire(body)

    async def patch_policy_status(self, namespace: str, name: str, status: JSON) -> JSON | None:
        k = int(name.rsplit("-", 1)[1])
        self.api.statuses[k] = _wire(status)
        self.api.policy_rv[k] = self.api.next_rv()
        body = self.api.policy(k)
        self.api.echoes.append(("policy", body))
        self.writes += 1
        return _wire(body)

    async def post_event(self, policy: JSON, type_: str, reason: str, message: str) -> None:
        return None


class Feed:
    """Delivers watch events: to ``observe`` directly, or through kopf's processing."""

    def __init__(self, variant: str, cache: Any, reconciler: Any) -> None:
        from svcproxy.controller import handlers

        self.variant = variant
        self.cache, self.reconciler = cache, reconciler
        self.observe = handlers.observe
        if variant != "kopf":
            return
        import kopf
        from kopf._cogs.structs import references
        from kopf._core.actions import lifecycles
        from kopf._core.engines import indexing
        from kopf._core.intents import registries
        from kopf._core.reactor import inventory

        self.settings = kopf.OperatorSettings()
        handlers.configure_settings(self.settings, argparse.Namespace(workers=0, watch_server_timeout=60))
        self.memories = inventory.ResourceMemories()
        from svcproxy.controller import main

        memo_type = getattr(main, "OperatorMemo", kopf.Memo)  # the operator's own memo class
        self.memobase = memo_type(options=argparse.Namespace(), cache=cache, reconciler=reconciler)
        self.registry = registries.get_default_registry()
        self.indexers = indexing.OperatorIndexers()
        self.lifecycle = lifecycles.get_default_lifecycle()
        self.event_queue: asyncio.Queue[Any] = asyncio.Queue()

        def res(group: str, version: str, plural: str, kind: str, namespaced: bool = True) -> Any:
            return references.Resource(
                group=group,
                version=version,
                plural=plural,
                kind=kind,
                namespaced=namespaced,
                preferred=True,
                verbs=frozenset({"list", "watch", "patch"}),
            )

        self.resources = {
            "policy": res("svcproxy.io", "v1alpha1", "serviceproxypolicies", "ServiceProxyPolicy"),
            "service": res("", "v1", "services", "Service"),
            "slice": res("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
            "program": res("svcproxy.io", "v1alpha1", "proxyvirtualservers", "ProxyVirtualServer"),
            "node": res("svcproxy.io", "v1alpha1", "proxynodes", "ProxyNode", namespaced=False),
            "k8snode": res("", "v1", "nodes", "Node", namespaced=False),
        }

    def prepare_policy(self, body: JSON) -> JSON:
        """A policy as the API server serves it once the operator has seen it: kopf's finalizer and
        its last-handled-configuration annotation (the on.delete handler makes kopf keep both)."""
        if self.variant != "kopf":
            return body
        from kopf._cogs.structs import bodies

        essence = self.settings.persistence.diffbase_storage.build(body=bodies.Body(body))
        annotations = body["metadata"].setdefault("annotations", {})
        annotations["svcproxy.io/last-handled-configuration"] = json.dumps(essence, separators=(",", ":"))
        return body

    async def __call__(self, kind: str, body: JSON, type_: str = "ADDED") -> None:
        body = _wire(self.prepare_policy(body) if kind == "policy" else body)
        if self.variant != "kopf":
            self.observe(self.cache, self.reconciler, kind, {"type": type_, "object": body})
            return
        from kopf._core.reactor import processing

        await processing.process_resource_event(
            lifecycle=self.lifecycle,
            indexers=self.indexers,
            registry=self.registry,
            settings=self.settings,
            memories=self.memories,
            memobase=self.memobase,
            resource=self.resources[kind],
            raw_event={"type": type_, "object": body},
            event_queue=self.event_queue,
            no_throttling=True,
        )

    def kopf_memories(self) -> int:
        return len(self.memories._items) if self.variant == "kopf" else 0


async def _scenario(size: int, endpoints: int, policies: int, variant: str, out: JSON) -> None:
    from svcproxy.controller.cache import Cache
    from svcproxy.controller.reconciler import Reconciler

    api = ApiServer(size, endpoints, policies)
    writer = Writer(api)
    cache = Cache()
    rec = Reconciler(cache, writer, handover_delay=3.0, clock=lambda: 1000.0)
    feed = Feed(variant, cache, rec)
    started = time.monotonic()
    cache.nodes_listed = True
    for k in range(len(NODES)):
        await feed("k8snode", api.node(k))
    for k in range(policies):
        await feed("policy", api.policy(k))
    for start in range(0, size, PAGE):  # a list page at a time, as the watch's first list delivers them
        for i in range(start, min(size, start + PAGE)):
            await feed("service", api.service(i))
        for i in range(start, min(size, start + PAGE)):
            await feed("slice", api.endpoint_slice(i))
    gc.collect()
    out["rss_after_feed_mb"] = status_mb("VmRSS")
    out["feed_seconds"] = round(time.monotonic() - started, 1)
    rec.ready.set()
    hashes: dict[str, str] = {}
    applied: dict[str, str] = {}
    passes = []
    for turn in range(8):
        before = writer.writes
        plan = await rec.reconcile(NS)
        assert plan is not None, "a reconcile pass failed"
        for name, spec in plan.writes.items():
            hashes[name] = spec.content_hash
        passes.append(writer.writes - before)
        echoes, api.echoes = api.echoes, []
        for kind, body in echoes:
            await feed(kind, body, "MODIFIED")
        del echoes
        if turn == 0:
            gc.collect()
            out["rss_after_first_pass_mb"] = status_mb("VmRSS")
        if not plan.writes and not plan.label and not plan.statuses and turn > 1:
            break
        # The agents apply every program and report it (one ProxyNode each).
        applied = {f"{NS}/{n}": h for n, h in hashes.items()}
        for k in range(len(NODES)):
            await feed("node", api.proxy_node(k, applied))
        del plan
    out["writes_per_pass"] = passes
    if passes[-1]:
        raise SystemExit(f"operator_memory: no steady state at {size} Services: writes {passes}")
    rec.stop()
    del hashes
    gc.collect()
    out["rss_after_passes_mb"] = status_mb("VmRSS")
    out["rss_peak_passes_mb"] = status_mb("VmHWM")
    out["passes_seconds"] = round(time.monotonic() - started, 1)
    # The periodic resync: a full list of every kind, merged in (same versions: nothing replaced).
    await _resync(api, cache, applied, out)
    gc.collect()
    out["rss_after_resync_mb"] = status_mb("VmRSS")
    out["rss_peak_mb"] = status_mb("VmHWM")
    # How much of that is pages glibc keeps after the resync's garbage was freed.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["rss_after_resync_malloc_trim_mb"] = status_mb("VmRSS")
    out["held"] = {kind: sum(len(v) for v in cache.objects[kind].values()) for kind in cache.objects}
    out["kopf_memories"] = feed.kopf_memories()
    out["keep"] = (cache, rec, feed)  # alive until measured


async def _resync(api: ApiServer, cache: Any, applied: dict[str, str], out: JSON) -> None:
    """The periodic resync as the measured sources do it: page by page through the Lister's
    merge where it has one (its HTTP read replaced by the in-memory API server); else, as the
    older sources did, every kind's whole list at once (here as dicts: their client's models,
    which cost more, are not built)."""
    from svcproxy.controller import lister

    kinds = ("policy", "service", "slice", "program", "node", "pod", "k8snode")
    if hasattr(lister, "ListMerge"):
        out["resync"] = "paged"
        reader = lister.Lister.__new__(lister.Lister)  # no API client: _get is replaced
        reader.namespace, reader._warned_nodes = None, False

        async def get(kind: str, token: str | None) -> JSON:
            return _wire(api.page(kind, int(token or 0), applied, lister.PAGE))

        reader._get = get
        await reader.load(cache)
        return
    out["resync"] = "whole lists"
    lists = {k: _wire(api.page(k, 0, applied, api.count(k) or 1)) for k in kinds}
    lister.apply_lists(cache, lists)


def _site(frame: Any) -> str:
    name = frame.filename
    for base in (str(ROOT), str(Path(sys.prefix) / "lib")):
        if name.startswith(base):
            return f"{os.path.relpath(name, base)}:{frame.lineno}"
    return f"{name}:{frame.lineno}"


def child(size: int, endpoints: int, policies: int, variant: str, trace: bool) -> JSON:
    import svcproxy.controller.handlers  # noqa: F401  (registers the handlers with kopf, as main does)

    gc.collect()
    out: JSON = {
        "services": size,
        "endpoints_each": endpoints,
        "policies": policies,
        "variant": variant,
        "rss_after_import_mb": status_mb("VmRSS"),
    }
    if trace:  # after the imports: what they allocate is in rss_after_import_mb, and tracing
        import tracemalloc  # them costs a minute

        tracemalloc.start(8)
    asyncio.run(_scenario(size, endpoints, policies, variant, out))
    keep = out.pop("keep")
    gc.collect()
    out["rss_end_mb"] = status_mb("VmRSS")
    if trace:
        import tracemalloc

        snap = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
            ]
        )
        stats = snap.statistics("lineno")
        out["traced_total_mb"] = round(sum(s.size for s in stats) / 2**20, 1)
        out["top_sites"] = [
            {"site": _site(s.traceback[0]), "mb": round(s.size / 2**20, 2), "blocks": s.count}
            for s in stats[:25]
        ]
        # Who asked for it: the innermost frame in svcproxy or kopf (else the allocating frame).
        # The raw traces (tuples, most recent frame first): Traceback objects cost minutes here.
        owners: dict[tuple[str, int], list[int]] = {}
        for _, nbytes, frames, *_rest in snap.traces._traces:
            mine = next((f for f in frames if "svcproxy/" in f[0] or "/kopf/" in f[0]), frames[0])
            acc = owners.setdefault(mine, [0, 0])
            acc[0] += nbytes
            acc[1] += 1
        top = sorted(owners.items(), key=lambda kv: -kv[1][0])[:25]
        out["top_owners"] = [
            {"site": _site(tracemalloc.Frame(f)), "mb": round(b / 2**20, 2), "blocks": c} for f, (b, c) in top
        ]
    del keep
    return out


def run_child(size: int, args: argparse.Namespace, variant: str, trace: bool) -> JSON:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(size),
        "--endpoints",
        str(args.endpoints),
        "--policies",
        str(args.policies),
        "--variants",
        variant,
        *(["--trace"] if trace else []),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(args.src.resolve())),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {size} {variant} failed: {proc.stderr[-3000:]}")
    result: JSON = json.loads(proc.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--policies", type=int, default=4)
    parser.add_argument("--variants", default="cache,kopf")
    parser.add_argument("--trace", action="store_true", help="tracemalloc at the largest size (kopf variant)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--src",
        type=Path,
        default=ROOT / "operator",
        help="svcproxy sources to measure (an older commit's operator/: a before figure)",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.endpoints, args.policies, args.variants, args.trace)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    commit = subprocess.run(
        ["git", "-C", str(args.src), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    report: JSON = {
        "benchmark": "operator_memory",
        "src": str(args.src),
        "commit": commit,
        "python": sys.version.split()[0],
        "runs": [],
    }
    for size in sizes:
        for variant in args.variants.split(","):
            log(f"{size} Services x {args.endpoints} endpoints, {variant}")
            report["runs"].append(run_child(size, args, variant, False))
            log(json.dumps(report["runs"][-1]))
    if args.trace:
        variant = args.variants.split(",")[-1]
        log(f"{max(sizes)} Services under tracemalloc ({variant})")
        report["trace"] = run_child(max(sizes), args, variant, True)
    text = json.dumps(report, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
