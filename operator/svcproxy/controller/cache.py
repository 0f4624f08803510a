"""The operator's in-memory picture of the cluster, fed by kopf watch events.

Handlers put every ServiceProxyPolicy, ClusterServiceProxyPolicy, Namespace
(labels only), Service, EndpointSlice, Pod (labels only), ProxyVirtualServer
and ProxyNode they see here; the reconciler reads a
consistent :class:`~svcproxy.compile.planner.NamespaceView` of one namespace
from it. Writes the operator makes are put here too (newer resourceVersions
win), so a reconcile never acts on a picture older than its own last write.
Single-threaded: used only from the operator's event loop.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from svcproxy.api.node import ProxyNode
from svcproxy.compile.cluster import ParsedCluster, for_namespace, parse_cluster, selects_namespace
from svcproxy.compile.planner import NamespaceView, program_summary
from svcproxy.compile.program import Endpoint, endpoint_of

JSON = dict[str, Any]
# "node" is a ProxyNode (an agent's report); "k8snode" a core/v1 Node; "cpolicy" a
# ClusterServiceProxyPolicy and "namespace" a Namespace (both under namespace "").
KINDS = ("policy", "cpolicy", "namespace", "service", "slice", "program", "node", "k8snode")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def namespace_summary(namespace: JSON) -> JSON:
    """The part of a Namespace the operator needs: its labels, for namespaceSelector."""
    meta = namespace.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "resourceVersion", "labels") if k in meta}}


def node_summary(node: JSON) -> JSON:
    """The part of a Node the operator needs; a full Node (images, addresses) is many KiB."""
    meta = node.get("metadata") or {}
    conditions = ((node.get("status") or {}).get("conditions")) or []
    ready = [c for c in conditions if isinstance(c, dict) and c.get("type") == "Ready"]
    return {
        "metadata": {
            key: meta[key]
            for key in ("name", "resourceVersion", "labels", "deletionTimestamp")
            if key in meta
        },
        "status": {"conditions": ready},
    }


# Metadata the planner reads of a Service (selection, handover label, memo keys, owner refs).
_SERVICE_META = ("name", "namespace", "uid", "resourceVersion", "labels", "deletionTimestamp")
_REPEATED = ("namespace", "labels")
# Values repeated across thousands of objects (a slice's port list), kept once: a JSON
# parser makes a new object for every occurrence. Never edited (the cache
# replaces objects, it never edits one), so sharing them is safe.
_SHARED: dict[Any, Any] = {}
_SHARED_LIMIT = 4096  # distinct values kept; past it values are stored unshared


def _shared(key: Any, value: Any) -> Any:
    hit = _SHARED.get(key)
    if hit is not None:
        return hit
    if len(_SHARED) < _SHARED_LIMIT:
        _SHARED[key] = value
    return value


def _shared_str(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


def _interned(value: Any) -> Any:
    """``value`` (JSON) with dict keys and short strings interned: Services repeat the same
    keys and values ("ClusterIP", "TCP", "IPv4", label keys) thousands of times."""
    if type(value) is str:
        return sys.intern(value) if len(value) <= 32 else value
    if type(value) is dict:
        return {_shared_str(k): _interned(v) for k, v in value.items()}
    if type(value) is list:
        return [_interned(v) for v in value]
    return value


def service_summary(service: JSON) -> JSON:
    """The part of a Service the planner reads: its spec, a few metadata fields and its
    load-balancer ingress; not managedFields, annotations (kubectl's last-applied copy)
    or the rest of its status. Repeated strings
    are interned, and port lists equal to another Service's are shared."""
    meta = service.get("metadata") or {}
    # Labels and the namespace repeat across Services; names, uids and versions do not (and
    # interning a unique string only grows the interpreter's table of interned strings).
    out: JSON = {
        "metadata": {k: _interned(meta[k]) if k in _REPEATED else meta[k] for k in _SERVICE_META if k in meta}
    }
    spec = service.get("spec")
    if isinstance(spec, dict):
        spec = _interned(spec)
        for key in ("ports", "ipFamilies"):
            if isinstance(spec.get(key), list):
                spec[key] = _shared((key, json.dumps(spec[key], sort_keys=True)), spec[key])
    if "spec" in service:
        out["spec"] = spec
    # Of the status only the load-balancer ingress IPs: compile serves them as VIPs.
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress")
    if isinstance(ingress, list) and ingress:
        out["status"] = {"loadBalancer": {"ingress": _interned(ingress)}}
    return out


def _endpoint(ep: Any) -> Endpoint | None:
    """One endpoint as compile reads it (see :class:`Endpoint`), its node name shared."""
    out = endpoint_of(ep)
    if out is not None and out.node is not None:
        out = out._replace(node=sys.intern(out.node))
    return out


def slice_summary(slice_: JSON) -> JSON:
    """The part of an EndpointSlice compile reads, endpoints as :class:`Endpoint` tuples; the
    zone, hints, the Pod's uid and namespace, managedFields and ownerReferences are left out."""
    meta = slice_.get("metadata") or {}
    labels = meta.get("labels") or {}
    out_meta: JSON = {k: meta[k] for k in ("name", "resourceVersion") if k in meta}
    if "namespace" in meta:
        out_meta["namespace"] = _shared_str(meta["namespace"])
    if SERVICE_NAME_LABEL in labels:
        out_meta["labels"] = {SERVICE_NAME_LABEL: labels[SERVICE_NAME_LABEL]}
    out: JSON = {"metadata": out_meta}
    if "addressType" in slice_:
        out["addressType"] = _shared_str(slice_["addressType"])
    ports = slice_.get("ports")
    if isinstance(ports, list):
        try:
            out["ports"] = _shared(("ports", json.dumps(ports, sort_keys=True)), ports)
        except (TypeError, ValueError):
            out["ports"] = ports
    elif "ports" in slice_:
        out["ports"] = ports
    endpoints = slice_.get("endpoints")
    if isinstance(endpoints, list):
        # Endpoints without an address are left out: compile skips them.
        out["endpoints"] = [e for e in map(_endpoint, endpoints) if e is not None]
    elif "endpoints" in slice_:
        out["endpoints"] = endpoints
    return out


def parse_selector(text: str) -> dict[str, str]:
    """``key=value,key2=value2`` (the agents' nodeSelector) -> dict; ValueError says what is wrong."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"node selector term {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _rv(obj: JSON) -> int | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


class Cache:
    """Objects by kind -> namespace -> name (ProxyNodes under namespace "")."""

    def __init__(self, agent_node_selector: dict[str, str] | None = None) -> None:
        self.objects: dict[str, dict[str, dict[str, JSON]]] = {k: defaultdict(dict) for k in KINDS}
        self.pod_labels: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
        self.agent_node_selector = dict(agent_node_selector or {})
        # Set once Nodes were listed; until then (or without RBAC for Nodes) only
        # ProxyNode reports say which nodes exist.
        self.nodes_listed = False
        self._expected: frozenset[str] | None = None  # memo of expected_nodes()
        # EndpointSlices by namespace and Service. A Service's list is replaced, never
        # edited, when one of its slices changes: the planner memo tells unchanged
        # Services by the identity of their objects and of this list.
        self._slices: dict[str, dict[str, list[JSON]]] = defaultdict(dict)
        # Cluster policies parsed once per stored version (name -> (object, parse)).
        self._clusters: dict[str, tuple[JSON, ParsedCluster]] = {}

    def put(self, kind: str, obj: JSON) -> bool:
        """Store ``obj`` unless the cache holds a newer version; True when stored.

        At an equal resourceVersion the stored object stays (same content, by the API's
        contract): the planner memo tells unchanged objects by identity."""
        summary = _SUMMARIES.get(kind)
        if summary is not None:
            obj = summary(obj)
        meta = obj.get("metadata") or {}
        ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        current = self.objects[kind][ns].get(name)
        if current is not None:
            old, new = _rv(current), _rv(obj)
            if old is not None and new is not None and new < old:
                return False
            if old is not None and old == new:
                return True  # the same version (a resync, an echo of our write): keep the object
            if kind == "slice":
                self._unlink_slice(ns, current)
        self.objects[kind][ns][name] = obj
        if kind == "slice":
            self._link_slice(ns, obj)
        if kind == "k8snode":
            self._expected = None
        return True

    def remove(self, kind: str, namespace: str, name: str) -> None:
        gone = self.objects[kind][namespace].pop(name, None)
        if kind == "slice" and gone is not None:
            self._unlink_slice(namespace, gone)
        if kind == "k8snode":
            self._expected = None

    def _link_slice(self, namespace: str, obj: JSON) -> None:
        owner = _slice_owner(obj)
        if owner:
            by_service = self._slices[namespace]
            by_service[owner] = [*by_service.get(owner, ()), obj]

    def _unlink_slice(self, namespace: str, obj: JSON) -> None:
        owner = _slice_owner(obj)
        by_service = self._slices[namespace]
        if owner and owner in by_service:
            rest = [s for s in by_service[owner] if s is not obj]
            if rest:
                by_service[owner] = rest
            else:
                del by_service[owner]

    def get(self, kind: str, namespace: str, name: str) -> JSON | None:
        return self.objects[kind][namespace].get(name)

    def set_pod_labels(self, namespace: str, name: str, labels: dict[str, str] | None) -> bool:
        """Remember a Pod's labels (None: the Pod is gone); True when they changed."""
        before = self.pod_labels[namespace].get(name)
        if labels is None:
            self.pod_labels[namespace].pop(name, None)
        else:
            self.pod_labels[namespace][name] = labels
        return before != labels

    def namespaces_with_policies(self) -> list[str]:
        """Namespaces holding a ServiceProxyPolicy or selected by a cluster policy."""
        found = {ns for ns, items in self.objects["policy"].items() if items}
        if any(p.policy is not None for p in self.cluster_policies()):
            found.update(ns for ns in self.known_namespaces() if self.cluster_selects(ns))
        return sorted(found)

    def has_policies(self, namespace: str) -> bool:
        """True when a ServiceProxyPolicy lives in ``namespace`` or a cluster policy selects it
        (asked on every watch event: no list of every namespace is built)."""
        return bool(self.objects["policy"].get(namespace)) or self.cluster_selects(namespace)

    def cluster_selects(self, namespace: str) -> bool:
        """True when a valid cluster policy, not being deleted, selects ``namespace``."""
        parsed = [p.policy for p in self.cluster_policies() if p.policy is not None and not p.deleting]
        if not parsed:
            return False
        labels = self.namespace_labels(namespace)
        return any(selects_namespace(policy, labels) for policy in parsed)

    def namespace_needs_pod_labels(self, namespace: str) -> bool:
        if any((p.get("spec") or {}).get("weights") for p in self.objects["policy"][namespace].values()):
            return True
        return any((p.get("spec") or {}).get("weights") for p in self.cluster_stand_ins(namespace))

    # -- cluster policies and namespaces -------------------------------------------------
    def cluster_policies(self) -> list[ParsedCluster]:
        """Every stored cluster policy, parsed (or why not), by name."""
        out = []
        stored = self.objects["cpolicy"][""]
        for name in sorted(stored):
            raw = stored[name]
            kept = self._clusters.get(name)
            if kept is None or kept[0] is not raw:
                kept = (raw, parse_cluster(raw))
                self._clusters[name] = kept
            out.append(kept[1])
        for name in [n for n in self._clusters if n not in stored]:
            del self._clusters[name]
        return out

    def namespace_labels(self, namespace: str) -> dict[str, str]:
        """A namespace's labels ({} when Namespaces are not known, e.g. not listable)."""
        obj = self.objects["namespace"][""].get(namespace) or {}
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return {str(k): str(v) for k, v in labels.items()}

    def known_namespaces(self) -> set[str]:
        """Namespaces listed, or holding a Service or a program."""
        found = set(self.objects["namespace"][""])
        for kind in ("service", "program"):
            found.update(ns for ns, items in self.objects[kind].items() if items)
        return found

    def cluster_stand_ins(self, namespace: str) -> list[JSON]:
        """The stand-ins the planner gets for the cluster policies selecting ``namespace``."""
        return for_namespace(self.cluster_policies(), self.namespace_labels(namespace))

    def selected_by(self, cluster: JSON | None) -> set[str]:
        """Namespaces a cluster policy object selects (none when it does not parse)."""
        if cluster is None:
            return set()
        parsed = parse_cluster(cluster)
        if parsed.policy is None:
            return set()
        policy = parsed.policy
        return {ns for ns in self.known_namespaces() if selects_namespace(policy, self.namespace_labels(ns))}

    def nodes(self) -> list[ProxyNode]:
        """The ProxyNode reports that parse, by node name."""
        out = [raw[_REPORT] for raw in self.objects["node"][""].values() if raw.get(_REPORT) is not None]
        return sorted(out, key=lambda n: n.metadata.name)

    def report(self, name: str) -> ProxyNode | None:
        """One node's parsed report (None: none, or one that does not parse)."""
        raw = self.objects["node"][""].get(name)
        return raw.get(_REPORT) if raw is not None else None

    def expected_nodes(self) -> frozenset[str] | None:
        """Nodes that should run an agent: Ready, not being deleted, matching the selector."""
        if not self.nodes_listed:
            return None
        if self._expected is not None:
            return self._expected
        out = set()
        for name, node in self.objects["k8snode"][""].items():
            meta = node.get("metadata") or {}
            labels = meta.get("labels") or {}
            if meta.get("deletionTimestamp"):
                continue
            if any(labels.get(k) != v for k, v in self.agent_node_selector.items()):
                continue
            conditions = (node.get("status") or {}).get("conditions") or []
            if any(c.get("status") == "True" for c in conditions):
                out.add(name)
        self._expected = frozenset(out)
        return self._expected

    def view(
        self,
        namespace: str,
        *,
        now: float,
        now_iso: str,
        unlabelled_at: dict[str, float],
        handover_delay: float,
    ) -> NamespaceView:
        return NamespaceView(
            namespace=namespace,
            policies=list(self.objects["policy"][namespace].values()),
            services=dict(self.objects["service"][namespace]),
            slices=dict(self._slices[namespace]),  # the lists are replaced, never edited
            pod_labels=dict(self.pod_labels[namespace]),
            programs=dict(self.objects["program"][namespace]),
            nodes=self.nodes(),
            now=now,
            now_iso=now_iso,
            unlabelled_at=dict(unlabelled_at),
            handover_delay=handover_delay,
            expected_nodes=self.expected_nodes(),
            cluster_policies=self.cluster_stand_ins(namespace),
        )


# Where a ProxyNode's summary holds its parsed report.
_REPORT = "svcproxy.io/report"


def report_summary(report: JSON) -> JSON:
    """A ProxyNode report parsed once, when it arrives (parsing every report on every pass
    would cost more than the plan), kept parsed only: a report lists every
    applied program, so raw and parsed were two maps of every Service per node. Its keys
    and content hashes are interned: every node reports the same ones."""
    status = report.get("status")
    if isinstance(status, dict) and isinstance(status.get("applied"), dict):
        applied = {_shared_str(k): _shared_str(v) for k, v in status["applied"].items()}
        report = {**report, "status": {**status, "applied": applied}}
    try:
        parsed: ProxyNode | None = ProxyNode.parse(report)
    except ValidationError:
        parsed = None  # a report we cannot read counts as no report
    meta = report.get("metadata") or {}
    return {"metadata": {k: meta[k] for k in ("name", "resourceVersion") if k in meta}, _REPORT: parsed}


# What the cache keeps of each kind (policies are kept whole).
_SUMMARIES: dict[str, Callable[[JSON], JSON]] = {
    "service": service_summary,
    "slice": slice_summary,
    "program": program_summary,
    "node": report_summary,
    "k8snode": node_summary,
    "namespace": namespace_summary,
}


def _slice_owner(obj: JSON) -> str:
    """The Service an EndpointSlice belongs to ('' when it names none)."""
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(SERVICE_NAME_LABEL) or "")
