"""The planner memo: a memoised plan equals a fresh one, and one change recompiles one Service.

Random sequences of namespace changes (Services, EndpointSlices, policies, Pod
labels, ProxyNode reports, Nodes, hand edits of programs, the reconciler's own
writes) go through the operator's real :class:`Cache`; after every step the
plan made with the long-lived memo must equal a plan made with an empty memo.
"""

from __future__ import annotations

import copy
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_compile_helpers import endpoint, endpoint_slice, policy_obj, service

from svcproxy.api import HANDOVER_LABEL, ServiceProxyPolicy
from svcproxy.compile.planner import NamespacePlan, PlanMemo, plan_namespace
from svcproxy.compile.planner.memo import PackedProgram, ParsedPolicy
from svcproxy.compile.program import NotProxied, address_key, compile_program
from svcproxy.controller.cache import Cache

JSON = dict[str, Any]
SERVICES = ("a", "b", "c")
NODES = ("node-1", "node-2", "node-3")
PODS = ("pod-1", "pod-2")


@dataclass
class World:
    """A namespace as the API server would hold it: every write gets a new resourceVersion."""

    cache: Cache = field(default_factory=Cache)
    rv: int = 1
    now: float = 100.0
    unlabelled: dict[str, float] = field(default_factory=dict)
    last: NamespacePlan | None = None
    written: dict[str, JSON] = field(default_factory=dict)  # program specs as last written

    def put(self, kind: str, obj: JSON) -> None:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        assert self.cache.put(kind, obj)

    def plan(self, memo: PlanMemo | None) -> NamespacePlan:
        view = self.cache.view(
            "ns",
            now=self.now,
            now_iso="2026-11-27T00:00:00Z",
            unlabelled_at=self.unlabelled,
            handover_delay=3.0,
        )
        return plan_namespace(view, memo)

    def apply(self, plan: NamespacePlan) -> None:
        """The reconciler's writes, as they come back from the API server."""
        for name, spec in plan.writes.items():
            self.written[name] = spec.wire()
            self.put("program", {"metadata": {"name": name, "namespace": "ns"}, "spec": self.written[name]})
        for name, on in [(n, True) for n in plan.label] + [(n, False) for n in plan.unlabel]:
            svc = copy.deepcopy(self.cache.get("service", "ns", name))
            assert svc is not None
            labels = svc["metadata"].setdefault("labels", {})
            labels.pop(HANDOVER_LABEL, None)
            if on:
                labels[HANDOVER_LABEL] = "svcproxy"
            self.put("service", svc)
        for name in plan.delete:
            self.cache.remove("program", "ns", name)
        for name, status in plan.statuses.items():
            pol = copy.deepcopy(self.cache.get("policy", "ns", name))
            if pol is not None:
                pol["status"] = status
                self.put("policy", pol)
        self.unlabelled = dict(plan.unlabelled_at)


def _service(name: str, variant: int, selected: bool) -> JSON:
    labels = {"app": "x"} if selected else {}
    if variant == 1:
        return service(name, cluster_ip="None", labels=labels)
    if variant == 2:
        return service(name, labels={**labels, HANDOVER_LABEL: "other"})
    if variant == 3:
        return service(name, affinity="ClientIP", affinity_timeout=60, labels=labels)
    if variant == 4:
        ports = [
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ]
        return service(name, ports=ports, labels=labels, cluster_ip="fd00::a", cluster_ips=["fd00::a"])
    return service(name, labels=labels, cluster_ip=f"10.96.0.{10 + SERVICES.index(name)}")


def _slice(svc: str, part: int, eps: list[tuple[int, int, str | None]]) -> JSON:
    items = []
    for host, cond, pod in eps:
        ready, serving, terminating = [(True, None, None), (False, True, True), (False, None, None)][cond]
        items.append(
            endpoint(f"10.244.1.{host}", ready=ready, serving=serving, terminating=terminating, pod=pod)
        )
        if host % 5 == 0:
            items.append(endpoint(f"fd00::{host:x}", pod=pod))
    out = endpoint_slice(
        items,
        ports=[
            {"name": "http", "port": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 5353, "protocol": "UDP"},
        ],
        name=f"{svc}-{part}",
    )
    out["metadata"]["labels"]["kubernetes.io/service-name"] = svc
    return out


GOLD = [{"podSelector": {"matchLabels": {"tier": "gold"}}, "weight": 5}]
POLICY_SPECS: list[JSON] = [
    {"serviceSelector": {"matchLabels": {"app": "x"}}, "ipvs": {"scheduler": "wrr"}, "weights": GOLD},
    {"serviceSelector": {"matchLabels": {"app": "x"}}},
    {"services": ["a", "b"], "mode": "iptables"},
    {"services": ["b", "c"], "ipvs": {"scheduler": "lc"}, "priority": 3},
    {"services": ["a", "c"], "ipvs": {"scheduler": "wlc"}, "weights": GOLD, "priority": 1},
    {"services": ["a"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 30}},
    {"services": ["a"], "mode": "warp"},  # invalid
]

SETUP: list[tuple[Any, ...]] = [
    ("policy", "p", 0, 1, False),
    ("policy", "q", 4, 1, False),
    *[("service", name, 0, True) for name in SERVICES],
    *[("slice", name, 0, [(2, 0, "pod-1"), (3, 1, "pod-2"), (10, 0, None)]) for name in SERVICES],
    ("pod", "pod-1", "lead"),
    ("apply",),
]
endpoints_ = st.lists(
    st.tuples(st.integers(2, 12), st.integers(0, 2), st.sampled_from((*PODS, None))), max_size=4
)
ops = st.one_of(
    st.tuples(st.just("service"), st.sampled_from(SERVICES), st.integers(0, 4), st.booleans()),
    st.tuples(st.just("service-gone"), st.sampled_from(SERVICES)),
    st.tuples(st.just("slice"), st.sampled_from(SERVICES), st.integers(0, 1), endpoints_),
    st.tuples(st.just("slice-gone"), st.sampled_from(SERVICES), st.integers(0, 1)),
    st.tuples(
        st.just("policy"),
        st.sampled_from(("p", "q")),
        st.integers(0, len(POLICY_SPECS) - 1),
        st.integers(1, 3),
        st.booleans(),
    ),
    st.tuples(st.just("policy-gone"), st.sampled_from(("p", "q")), st.booleans()),
    st.tuples(st.just("pod"), st.sampled_from(PODS), st.sampled_from(("gold", "lead", None))),
    st.tuples(st.just("report"), st.sampled_from(NODES), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("report-gone"), st.sampled_from(NODES)),
    st.tuples(st.just("k8snode"), st.sampled_from(NODES), st.booleans()),
    st.tuples(st.just("edit-program"), st.sampled_from(SERVICES)),
    st.tuples(st.just("apply")),
    st.tuples(st.just("tick"), st.sampled_from((0.5, 4.0))),
)


def _step(world: World, op: tuple[Any, ...]) -> None:
    kind = op[0]
    cache = world.cache
    if kind == "service":
        world.put("service", _service(op[1], op[2], op[3]))
    elif kind == "service-gone":
        cache.remove("service", "ns", op[1])
    elif kind == "slice":
        world.put("slice", _slice(op[1], op[2], op[3]))
    elif kind == "slice-gone":
        cache.remove("slice", "ns", f"{op[1]}-{op[2]}")
    elif kind == "policy":
        world.put(
            "policy", policy_obj(op[1], copy.deepcopy(POLICY_SPECS[op[2]]), generation=op[3], deleting=op[4])
        )
    elif kind == "policy-gone":
        cache.remove("policy", "ns", op[1])
    elif kind == "pod":
        cache.set_pod_labels("ns", op[1], {"tier": op[2]} if op[2] else None)
    elif kind == "report":
        compiled = world.last.compiled if world.last else {}
        # 0: nothing, 1: every current program, 2: all but one, 3: stale hashes.
        applied = {f"ns/{n}": s.content_hash for n, s in compiled.items()}
        if op[2] == 0:
            applied = {}
        elif op[2] == 2 and applied:
            applied.pop(sorted(applied)[0])
        elif op[2] == 3:
            applied = {k: "0000stale" for k in applied}
        status: JSON = {"nodeName": op[1], "applied": applied}
        if op[3]:
            status["modes"] = [{"requested": "ipvs", "effective": "iptables", "reason": "no IPVS"}]
            status["errors"] = [{"service": "ns/a", "message": "scheduler lc not loaded"}]
        world.put("node", {"metadata": {"name": op[1]}, "status": status})
    elif kind == "report-gone":
        cache.remove("node", "", op[1])
    elif kind == "k8snode":
        cache.nodes_listed = True
        ready = "True" if op[2] else "False"
        world.put(
            "k8snode",
            {"metadata": {"name": op[1]}, "status": {"conditions": [{"type": "Ready", "status": ready}]}},
        )
    elif kind == "edit-program":
        # The cache keeps a summary of a program: the edit is made to what was written.
        if cache.get("program", "ns", op[1]) is not None:
            spec = {**world.written[op[1]], "summary": {"vips": "edited by hand", "endpoints": "0/0"}}
            world.put("program", {"metadata": {"name": op[1], "namespace": "ns"}, "spec": spec})
    elif kind == "apply":
        if world.last is not None:
            world.apply(world.last)
    elif kind == "tick":
        world.now += op[1]


def _assert_same(memoised: NamespacePlan, fresh: NamespacePlan) -> None:
    for name in (
        "writes",
        "label",
        "unlabel",
        "delete",
        "statuses",
        "events",
        "unlabelled_at",
        "recheck_at",
        "owned_after",
        "compiled",
    ):
        assert getattr(memoised, name) == getattr(fresh, name), name


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(ops, min_size=3, max_size=40))
def test_memoised_plan_equals_fresh_plan_after_every_change(steps: list[tuple[Any, ...]]) -> None:
    world = World()
    memo = PlanMemo()
    # Random changes start from a namespace where something is programmed (two policies
    # in conflict, one with weights, Pods behind the endpoints), not from an empty one.
    for op in [*SETUP, *steps]:
        _step(world, op)
        memoised = world.plan(memo)
        _assert_same(memoised, world.plan(None))
        world.last = memoised


def _steady(size: int) -> tuple[World, PlanMemo]:
    world = World()
    world.put("policy", policy_obj("p", {"serviceSelector": {"matchLabels": {"app": "x"}}}))
    for i in range(size):
        name = f"s{i}"
        world.put("service", service(name, labels={"app": "x"}, cluster_ip=f"10.96.1.{i + 1}"))
        eps = [endpoint(f"10.244.{i}.{k}", pod=f"{name}-{k}") for k in range(1, 4)]
        sl = endpoint_slice(eps, name=f"{name}-x")
        sl["metadata"]["labels"]["kubernetes.io/service-name"] = name
        world.put("slice", sl)
    memo = PlanMemo()
    for _ in range(3):
        plan = world.plan(memo)
        world.apply(plan)
        for node in NODES:
            applied = {f"ns/{n}": s.content_hash for n, s in plan.compiled.items()}
            world.put("node", {"metadata": {"name": node}, "status": {"nodeName": node, "applied": applied}})
    plan = world.plan(memo)
    assert not plan.writes and not plan.label and not plan.statuses, "no steady state"
    return world, memo


def test_one_slice_change_recompiles_only_its_service() -> None:
    world, memo = _steady(20)
    before = memo.stats.compiles
    sl = copy.deepcopy(world.cache.get("slice", "ns", "s7-x"))
    assert sl is not None
    sl["endpoints"][0] = endpoint("10.244.99.1", pod="s7-1")  # the cache keeps Endpoint tuples
    world.put("slice", sl)
    plan = world.plan(memo)
    assert memo.stats.last_compiled == ["s7"]
    assert memo.stats.compiles == before + 1
    assert list(plan.writes) == ["s7"]
    assert "10.244.99.1" in [r.address for r in plan.writes["s7"].virtual_servers[0].real_servers]
    world.apply(plan)
    status = world.cache.get("policy", "ns", "p")
    assert status is not None
    row = next(r for r in status["status"]["services"] if r["name"] == "s7")
    assert (row["state"], row["nodesProgrammed"]) == ("Pending", 0)


def test_node_reports_fold_into_status_without_recompiling() -> None:
    world, memo = _steady(20)
    sl = copy.deepcopy(world.cache.get("slice", "ns", "s3-x"))
    assert sl is not None
    sl["endpoints"][0] = endpoint("10.244.98.1", pod="s3-1")
    world.put("slice", sl)
    plan = world.plan(memo)
    world.apply(plan)
    digest = plan.compiled["s3"].content_hash
    compiles = memo.stats.compiles
    states = []
    for node in NODES:
        report = world.cache.report(node)
        assert report is not None
        applied = {**report.status.applied, "ns/s3": digest}
        world.put("node", {"metadata": {"name": node}, "status": {"nodeName": node, "applied": applied}})
        plan = world.plan(memo)
        assert memo.stats.last_compiled == []
        world.apply(plan)
        status = world.cache.get("policy", "ns", "p")
        assert status is not None
        row = next(r for r in status["status"]["services"] if r["name"] == "s3")
        states.append((row["state"], row["nodesProgrammed"], status["status"]["programmed"]))
    assert memo.stats.compiles == compiles
    assert states == [("Pending", 1, "1/3"), ("Pending", 2, "2/3"), ("Programmed", 3, "3/3")]


def test_pod_label_change_recompiles_services_of_a_weighted_policy() -> None:
    world, memo = _steady(3)
    weighted = {
        "serviceSelector": {"matchLabels": {"app": "x"}},
        "ipvs": {"scheduler": "wrr"},
        "weights": [{"podSelector": {"matchLabels": {"tier": "gold"}}, "weight": 7}],
    }
    world.put("policy", policy_obj("p", weighted, generation=2))
    world.apply(world.plan(memo))
    world.cache.set_pod_labels("ns", "s1-2", {"tier": "gold"})
    plan = world.plan(memo)
    assert memo.stats.last_compiled == ["s1"]
    weights = {r.pod_name: r.weight for r in plan.writes["s1"].virtual_servers[0].real_servers}
    assert weights == {"s1-1": 1, "s1-2": 7, "s1-3": 1}
    world.apply(plan)
    world.cache.set_pod_labels("ns", "s1-2", None)  # the Pod is gone: weight 1 again
    plan = world.plan(memo)
    assert memo.stats.last_compiled == ["s1"]
    assert {r.weight for r in plan.writes["s1"].virtual_servers[0].real_servers} == {1}


def test_policy_edit_recompiles_what_it_selects() -> None:
    world, memo = _steady(5)
    world.put(
        "policy",
        policy_obj("p", {"serviceSelector": {"matchLabels": {"app": "x"}}, "mode": "iptables"}, generation=2),
    )
    plan = world.plan(memo)
    assert sorted(memo.stats.last_compiled) == [f"s{i}" for i in range(5)]
    assert {s.mode for s in plan.writes.values()} == {"iptables"}


@settings(max_examples=500)
@given(
    text=st.one_of(
        st.tuples(*[st.integers(0, 300)] * 4).map(lambda t: ".".join(map(str, t))),
        st.from_regex(r"\A[0-9a-f.:]{0,20}\Z"),
        st.text(max_size=12),
        st.ip_addresses().map(str),
    )
)
def test_address_key_agrees_with_ipaddress(text: str) -> None:
    try:
        ip = ipaddress.ip_address(text)
        expected = (ip.version, ip.packed, "")
    except ValueError:
        expected = (9, b"", text)
    assert address_key(text) == expected


@settings(max_examples=100, deadline=None)
@given(
    variant=st.integers(0, 4),
    eps=st.lists(
        st.tuples(st.integers(2, 12), st.integers(0, 2), st.sampled_from((*PODS, None))), max_size=6
    ),
    spec_index=st.sampled_from([0, 1, 2, 3, 4, 5]),
)
def test_the_memos_program_text_gives_back_the_compiled_spec(
    variant: int, eps: list[tuple[int, int, str | None]], spec_index: int
) -> None:
    """The memo keeps a program as JSON text; what it writes is built from that text."""
    pol = ParsedPolicy(
        "fp", ServiceProxyPolicy.parse(policy_obj("p", copy.deepcopy(POLICY_SPECS[spec_index]))), ""
    )
    svc, slices = _service("a", variant, True), [_slice("a", 0, eps)]
    svc["metadata"]["resourceVersion"] = "7"
    labels = {"pod-1": {"tier": "gold"}}
    entry = PlanMemo().compile("a", pol, svc, slices, labels, old=None)
    assert pol.policy is not None
    direct = compile_program(pol.policy, svc, slices, labels)
    if isinstance(direct, NotProxied):
        assert entry.result == direct
        return
    assert isinstance(entry.result, PackedProgram)
    assert entry.result.spec() == direct
    assert entry.result.spec().wire() == direct.wire()
    assert (entry.result.content_hash, entry.result.mode) == (direct.content_hash, direct.mode)
