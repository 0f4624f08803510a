"""operator_plan: the operator's planning cost per pass, with and without the planner memo; prints JSON.

No lab: it builds one namespace in the operator's own
:class:`~svcproxy.controller.cache.Cache` (N selectorless Services x 10
endpoints, one EndpointSlice each, one policy ``mode: iptables`` selecting
them all, 3 Nodes with 3 ProxyNode reports), brings it to the steady state the
operator reaches in a cluster (every program stored, every node reporting it,
every Service handed over, the policy status written), then times what the
reconciler does per pass before any API write: ``Cache.view`` +
``plan_namespace``.

* ``cold``: a pass with an empty memo (what every pass cost before the memo);
* ``one_slice_change``: a pass after one EndpointSlice replaced one endpoint;
* ``one_node_report``: a pass after one ProxyNode report changed (each changed
  Service is then reported by the 3 nodes in turn, as the agents do).

Each change is planned twice on the same cache state, with the warm memo and
with an empty one (alternating which goes first so noise hits both alike);
both plans must be equal or the run stops. Medians over ``--repeat`` changes,
min and max (the machine is shared: the minimum is the least disturbed pass), and
the ratios memo/none and size/smallest size in the same run. Usage:

    .venv/bin/python -m benchmarks.operator_plan [--sizes 100,1000,5000] [--repeat 15]
        [--output benchmarks/results/operator_plan.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import ipaddress
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from svcproxy.api.common import HANDOVER_LABEL, HANDOVER_VALUE
from svcproxy.compile.planner import NamespacePlan, PlanMemo, plan_namespace
from svcproxy.controller.cache import Cache

ROOT = Path(__file__).resolve().parents[1]

JSON = dict[str, Any]
NS = "bench"
NODES = ("node-1", "node-2", "node-3")
ENDPOINTS = 10


class Namespace:
    """One namespace in a Cache, changed the way the API server would (new resourceVersions)."""

    def __init__(self, size: int) -> None:
        self.cache = Cache()
        self.rv = 1000
        self.next_ip = int(ipaddress.IPv4Address("10.128.0.1"))
        self.now = 1000.0
        self.unlabelled: dict[str, float] = {}
        for node in NODES:
            self.cache.put(
                "k8snode",
                {
                    "metadata": {"name": node, "resourceVersion": self._rv(), "labels": {}},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                },
            )
            self.put("node", self._report(node, {}))
        self.cache.nodes_listed = True
        self.put(
            "policy",
            {
                "apiVersion": "svcproxy.io/v1alpha1",
                "kind": "ServiceProxyPolicy",
                "metadata": {
                    "name": "bench",
                    "namespace": NS,
                    "uid": "uid-bench",
                    "generation": 1,
                    "creationTimestamp": "2026-11-27T00:00:00Z",
                },
                "spec": {"mode": "iptables", "serviceSelector": {"matchLabels": {"bench": "yes"}}},
            },
        )
        for i in range(size):
            name = f"svc-{i:05d}"
            vip = str(ipaddress.IPv4Address("10.96.16.1") + i)
            self.put(
                "service",
                {
                    "metadata": {
                        "name": name,
                        "namespace": NS,
                        "uid": f"uid-{name}",
                        "labels": {"bench": "yes"},
                    },
                    "spec": {
                        "type": "ClusterIP",
                        "clusterIP": vip,
                        "clusterIPs": [vip],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
                    },
                },
            )
            self.put(
                "slice",
                {
                    "metadata": {
                        "name": f"{name}-x",
                        "namespace": NS,
                        "labels": {"kubernetes.io/service-name": name},
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [self._endpoint(i, k) for k in range(ENDPOINTS)],
                },
            )

    def _rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _endpoint(self, i: int, k: int) -> JSON:
        address = str(ipaddress.IPv4Address(self.next_ip))
        self.next_ip += 1
        return {
            "addresses": [address],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": NODES[k % len(NODES)],
            "targetRef": {"kind": "Pod", "name": f"pod-{i}-{k}-{address}", "namespace": NS},
        }

    def _report(self, node: str, applied: dict[str, str]) -> JSON:
        return {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ProxyNode",
            "metadata": {"name": node},
            "status": {"nodeName": node, "applied": applied, "modes": [], "errors": []},
        }

    def put(self, kind: str, obj: JSON) -> None:
        obj["metadata"]["resourceVersion"] = self._rv()
        self.cache.put(kind, obj)

    def plan(self, memo: PlanMemo | None) -> NamespacePlan:
        view = self.cache.view(
            NS,
            now=self.now,
            now_iso="2026-11-27T00:00:00Z",
            unlabelled_at=self.unlabelled,
            handover_delay=3.0,
        )
        return plan_namespace(view, memo)

    def apply(self, plan: NamespacePlan) -> None:
        """What the reconciler writes, as the API server would store it."""
        for name, spec in plan.writes.items():
            self.put("program", {"metadata": {"name": name, "namespace": NS}, "spec": spec.wire()})
        for name in plan.label:
            svc = copy.deepcopy(self.cache.get("service", NS, name))
            assert svc is not None
            svc["metadata"]["labels"][HANDOVER_LABEL] = HANDOVER_VALUE
            self.put("service", svc)
        for name, status in plan.statuses.items():
            policy = copy.deepcopy(self.cache.get("policy", NS, name))
            assert policy is not None
            policy["status"] = status
            self.put("policy", policy)
        self.unlabelled = plan.unlabelled_at

    def report(self, node: str, hashes: dict[str, str]) -> None:
        """``node``'s agent reports these programs applied (key: Service name)."""
        report = self.cache.report(node)
        assert report is not None
        applied = dict(report.status.applied)
        applied.update({f"{NS}/{name}": digest for name, digest in hashes.items()})
        self.put("node", self._report(node, applied))

    def change_slice(self, i: int) -> str:
        """Replace one endpoint of Service ``i``; returns the Service's name."""
        name = f"svc-{i:05d}"
        slice_ = copy.deepcopy(self.cache.get("slice", NS, f"{name}-x"))
        assert slice_ is not None
        slice_["endpoints"][0] = self._endpoint(i, 0)
        self.put("slice", slice_)
        return name


def _timed(ns: Namespace, memo: PlanMemo | None) -> tuple[float, NamespacePlan]:
    gc.collect()
    started = time.perf_counter()
    plan = ns.plan(memo)
    return time.perf_counter() - started, plan


def _same(a: NamespacePlan, b: NamespacePlan) -> bool:
    return (a.writes, a.label, a.unlabel, a.delete, a.statuses, a.events, a.compiled) == (
        b.writes,
        b.label,
        b.unlabel,
        b.delete,
        b.statuses,
        b.events,
        b.compiled,
    )


def _both(ns: Namespace, memo: PlanMemo, turn: int, out: dict[str, list[float]]) -> NamespacePlan:
    """Plan the current state with the memo and without; both must agree."""
    if turn % 2:
        t_none, p_none = _timed(ns, None)
        t_memo, p_memo = _timed(ns, memo)
    else:
        t_memo, p_memo = _timed(ns, memo)
        t_none, p_none = _timed(ns, None)
    if not _same(p_memo, p_none):
        raise SystemExit("operator_plan: the memoised plan differs from a fresh plan: a memo bug")
    out["memo"].append(t_memo)
    out["none"].append(t_none)
    return p_memo


def run_size(size: int, repeat: int) -> JSON:
    print(f"building {size} Services x {ENDPOINTS} endpoints", file=sys.stderr)
    ns = Namespace(size)
    memo = PlanMemo()
    # Steady state: programs stored, every node reporting them, Services handed over.
    for _ in range(6):
        plan = ns.plan(memo)
        ns.apply(plan)
        for node in NODES:
            ns.report(node, {n: s.content_hash for n, s in plan.compiled.items()})
    plan = ns.plan(memo)
    ns.apply(plan)
    if plan.writes or plan.label or plan.statuses:
        raise SystemExit(f"operator_plan: no steady state at {size} Services (a planner bug)")
    cold: dict[str, list[float]] = {"memo": [], "none": []}
    for turn in range(max(3, repeat // 3)):
        fresh = PlanMemo()
        t, _ = _timed(ns, fresh)
        cold["memo"].append(t)
        t, _ = _timed(ns, None)
        cold["none"].append(t)
        print(f"  cold {turn}: {cold['none'][-1] * 1000:.1f} ms", file=sys.stderr)
    change: dict[str, list[float]] = {"memo": [], "none": []}
    report: dict[str, list[float]] = {"memo": [], "none": []}
    compiled_per_change: list[int] = []
    compiled_per_report: list[int] = []
    step = max(1, size // repeat)
    for turn in range(repeat):
        name = ns.change_slice((turn * step + 7) % size)
        plan = _both(ns, memo, turn, change)
        compiled_per_change.append(len(memo.stats.last_compiled))
        ns.apply(plan)
        digest = plan.compiled[name].content_hash
        for node in NODES:
            ns.report(node, {name: digest})
            plan = _both(ns, memo, turn, report)
            compiled_per_report.append(len(memo.stats.last_compiled))
            ns.apply(plan)
        memo_ms, none_ms = change["memo"][-1] * 1000, change["none"][-1] * 1000
        print(f"  change {turn}: memo {memo_ms:.2f} ms, none {none_ms:.1f} ms", file=sys.stderr)
    return {
        "services": size,
        "endpoints_per_service": ENDPOINTS,
        "nodes": len(NODES),
        "repeat": repeat,
        "cold_seconds": _summary(cold),
        "one_slice_change_seconds": _summary(change),
        "one_node_report_seconds": _summary(report),
        "programs_compiled_per_slice_change": max(compiled_per_change),
        "programs_compiled_per_node_report": max(compiled_per_report),
    }


def _summary(samples: dict[str, list[float]]) -> JSON:
    memo, none = statistics.median(samples["memo"]), statistics.median(samples["none"])
    return {
        "memo_median": round(memo, 6),
        "none_median": round(none, 6),
        "memo_min": round(min(samples["memo"]), 6),
        "memo_max": round(max(samples["memo"]), 6),
        "none_min": round(min(samples["none"]), 6),
        "none_max": round(max(samples["none"]), 6),
        "speedup": round(none / memo, 1) if memo else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [run_size(size, args.repeat if size <= 1000 else max(5, args.repeat // 3)) for size in sizes]
    base = results[0]
    scaling = {}
    for res in results[1:]:
        key = f"{res['services']}_vs_{base['services']}"
        scaling[key] = {
            what: round(res[what]["memo_median"] / base[what]["memo_median"], 2)
            for what in ("one_slice_change_seconds", "one_node_report_seconds")
        }
    out = {
        "benchmark": "operator_plan",
        "what": "Cache.view + plan_namespace per pass (no API writes), memo vs empty memo, same run",
        "python": sys.version.split()[0],
        "sizes": results,
        "memo_scaling_vs_smallest": scaling,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
