"""The pure parts of the churn soak (benchmarks/soak_plan.py, benchmarks/soak_report.py):
the seeded fault schedule and churn steps, RSS slopes, the kernel-object leak check, the
settle check and the request summary with each failure's nearest fault."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from benchmarks import soak_plan as plan
from benchmarks import soak_report as report
from svcproxy.api.policy import ServiceProxyPolicySpec

NODES = ["node-1", "node-2", "node-3"]
ADDRESSES = ["172.29.0.11", "172.29.0.12", "172.29.0.13"]
MODES = ["iptables", "userspace", "ipvs"]

# --- fault schedule --------------------------------------------------------------------


def test_the_same_seed_gives_the_same_faults() -> None:
    assert plan.fault_schedule(7, 1800, NODES) == plan.fault_schedule(7, 1800, NODES)
    assert plan.fault_schedule(7, 1800, NODES) != plan.fault_schedule(8, 1800, NODES)


@pytest.mark.parametrize("seed", range(20))
def test_thirty_minutes_hold_every_kind_inside_the_window_spaced(seed: int) -> None:
    faults = plan.fault_schedule(seed, 1800, NODES, mean_gap=90)
    first, last = plan.fault_windows(1800)
    assert (first, last) == (60, 1680)
    assert len(faults) == round((last - first) / 90) == 18
    assert {f.kind for f in faults} == set(plan.FAULT_KINDS)
    assert all(first <= f.at < last for f in faults)
    gaps = [b.at - a.at for a, b in itertools.pairwise(faults)]
    assert min(gaps) >= (last - first) / 18 / 2
    kills = [f.target for f in faults if f.kind == "agent_kill"]
    assert all(t in NODES for t in kills)
    assert len(set(kills[:3])) == min(3, len(kills))  # each node once before any twice
    assert all(f.target == "" for f in faults if f.kind != "agent_kill")


def test_the_two_minute_smoke_run_gets_one_fault_of_each_kind() -> None:
    faults = plan.fault_schedule(18, 120, NODES)
    assert sorted(f.kind for f in faults) == sorted(plan.FAULT_KINDS)
    assert all(12 <= f.at < 108 for f in faults)


def test_a_run_too_short_for_every_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="raise --minutes"):
        plan.fault_schedule(1, 60, NODES)


def test_churn_arrives_at_its_rate_inside_the_run() -> None:
    times = plan.churn_times(3, 1800, 0.5)
    assert times == plan.churn_times(3, 1800, 0.5)
    assert times == sorted(times) and times[0] > 0 and times[-1] < 1800
    assert len(times) == pytest.approx(900, rel=0.1)
    assert plan.churn_times(3, 100, 0) == []


# --- churn steps ---------------------------------------------------------------------------


def start_world() -> plan.World:
    return plan.World((), {}, {"steady-0": "iptables", "steady-1": "userspace"}, (), 0)


def advance(world: plan.World, op: plan.Op) -> plan.World:
    """What the API server would list after ``op`` (a model of the lab, for the test)."""
    services = {s.name: s for s in world.services}
    policies = dict(world.policies)
    steady = dict(world.steady_modes)
    pods = set(world.pods)
    index = world.next_index
    p = op.params
    if op.kind == "add_service":
        size = len(p["endpoints"]["addresses"]) if p["backing"] == "slice" else p["replicas"]
        services[op.target] = plan.ChurnService(op.target, p["backing"], p["group"], size)
        pods |= {f"{op.target}-pod{i}" for i in range(size if p["backing"] == "pods" else 0)}
        index += 1
    elif op.kind == "delete_service":
        del services[op.target]
        pods = {q for q in pods if not q.startswith(op.target + "-")}
    elif op.kind == "set_endpoints":
        services[op.target] = replace(services[op.target], size=len(p["endpoints"]["addresses"]))
    elif op.kind == "scale":
        services[op.target] = replace(services[op.target], size=p["replicas"])
        pods = {q for q in pods if not q.startswith(op.target + "-")}
        pods |= {f"{op.target}-pod{i}" for i in range(p["replicas"])}
    elif op.kind == "delete_pod":
        assert op.target in pods
    elif op.kind == "add_policy":
        policies[op.target] = p["group"]
        index += 1
    elif op.kind == "delete_policy":
        del policies[op.target]
    elif op.kind == "switch_steady":
        steady[op.target] = p["mode"]
    return plan.World(tuple(services.values()), policies, steady, tuple(sorted(pods)), index)


def walk(seed: int, steps: int, modes: list[str] = MODES) -> list[tuple[plan.World, plan.Op]]:
    rng = random.Random(seed)
    world, out = start_world(), []
    for _ in range(steps):
        op = plan.next_op(rng, world, modes, ADDRESSES)
        out.append((world, op))
        world = advance(world, op)
    return out


def test_the_same_seed_and_state_give_the_same_steps() -> None:
    assert [op for _, op in walk(5, 200)] == [op for _, op in walk(5, 200)]
    assert [op for _, op in walk(5, 200)] != [op for _, op in walk(6, 200)]


@pytest.mark.parametrize("seed", range(5))
def test_every_step_fits_the_world_it_was_drawn_for(seed: int) -> None:
    limits = plan.Limits()
    names: set[str] = set()
    for world, op in walk(seed, 400):
        services = {s.name: s for s in world.services}
        if op.kind in ("add_service", "add_policy"):
            assert op.target not in names, "a name is never used twice"
            names.add(op.target)
        if op.kind == "add_service":
            assert len(services) < limits.max_services
        if op.kind in ("delete_service", "set_endpoints", "scale"):
            assert op.target in services
        if op.kind == "set_endpoints":
            assert services[op.target].backing == "slice"
            eps = op.params["endpoints"]
            assert set(eps["addresses"]) <= set(ADDRESSES)
            assert plan.ENDPOINT_PORTS[0] <= eps["port"] <= plan.ENDPOINT_PORTS[1]
        if op.kind == "scale":
            assert services[op.target].backing == "pods"
            assert op.params["replicas"] != services[op.target].size
        if op.kind in ("change_policy", "delete_policy"):
            assert op.target in world.policies
        if op.kind == "switch_steady":
            assert op.params["mode"] != world.steady_modes[op.target]
        if "spec" in op.params:  # valid for the API models (and their CEL rules)
            ServiceProxyPolicySpec.model_validate(plan.churn_policy_spec("g1", op.params["spec"]))


def test_a_long_walk_takes_every_kind_of_step() -> None:
    kinds = Counter(op.kind for _, op in walk(1, 600))
    assert set(kinds) == set(plan.OP_WEIGHTS)


def test_without_ipvs_no_step_asks_for_it() -> None:
    steps = walk(2, 300, ["iptables", "userspace"])
    modes = {op.params["spec"]["mode"] for _, op in steps if "spec" in op.params}
    modes |= {op.params["mode"] for _, op in steps if op.kind == "switch_steady"}
    assert modes == {"iptables", "userspace"}


def test_steady_policy_specs_are_valid_in_every_mode() -> None:
    for mode in MODES:
        spec = plan.steady_policy_spec("steady-0", mode)
        parsed = ServiceProxyPolicySpec.model_validate(spec)
        assert parsed.mode == mode and parsed.services == ["steady-0"]


def test_a_switch_to_iptables_removes_the_scheduler() -> None:
    old = plan.steady_policy_spec("s", "ipvs")
    patch = plan.spec_patch(plan.steady_policy_spec("s", "iptables"), old)
    assert patch == {"spec": {"ipvs": None, "mode": "iptables", "services": ["s"], "priority": 0}}


def test_bodies_tie_slices_to_services_and_pods_to_deployments() -> None:
    eps = {"addresses": ["172.29.0.12", "172.29.0.11"], "port": 20001}
    body = plan.slice_body("churn-3", "uid-1", eps)
    assert body["metadata"]["labels"]["kubernetes.io/service-name"] == "churn-3"
    assert body["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert [e["addresses"] for e in body["endpoints"]] == [["172.29.0.12"], ["172.29.0.11"]]
    assert body["ports"] == [{"name": "tcp", "port": 20001, "protocol": "TCP"}]
    dep = plan.deployment_body("churn-4", 2, {plan.CHURN_LABEL: "true"})
    template = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= template.items()
    assert template[plan.CHURN_LABEL] == "true"


# --- RSS ------------------------------------------------------------------------------------


def test_slope_is_the_least_squares_fit() -> None:
    assert report.slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
    assert report.slope([(0, 1), (1, 2), (2, 1), (3, 2)]) == pytest.approx(0.2)
    assert report.slope([(0, 1)]) is None
    assert report.slope([(5, 1), (5, 2)]) is None


def test_a_restart_is_neither_growth_nor_a_hiding_place() -> None:
    # Two incarnations, each growing 1 MB per 10 min; the second starts 50 MB lower.
    first = [report.Sample(t, 10, 100 + t / 600) for t in range(0, 900, 5)]
    second = [report.Sample(t, 11, 50 + (t - 900) / 600) for t in range(900, 1800, 5)]
    trend = report.rss_trend(first + second, settle=0)
    assert trend["slope_mb_per_hour"] == pytest.approx(6.0)
    assert trend["incarnations"] == 2
    assert [p["slope_mb_per_hour"] for p in trend["per_incarnation"]] == [pytest.approx(6.0)] * 2
    assert trend["min_mb"] == 50 and trend["max_mb"] == pytest.approx(100 + 895 / 600)
    flat = [report.Sample(t, 10, 80.0) for t in range(0, 900, 5)]
    flat += [report.Sample(t, 11, 40.0) for t in range(900, 1800, 5)]
    assert report.rss_trend(flat, settle=0)["slope_mb_per_hour"] == 0


def test_each_incarnations_start_is_left_out_of_the_fit_only() -> None:
    samples = [report.Sample(0, 7, 300.0), report.Sample(10, 7, 200.0)]
    samples += [report.Sample(t, 7, 60.0) for t in range(30, 600, 10)]
    trend = report.rss_trend(samples, settle=30)
    assert trend["slope_mb_per_hour"] == 0
    assert trend["fitted_samples"] == len(samples) - 2
    assert trend["max_mb"] == 300.0
    assert report.rss_trend([], settle=30)["slope_mb_per_hour"] is None


# --- kernel objects ---------------------------------------------------------------------------

NAT = """# Generated by iptables-nft-save v1.8.9
*nat
:PREROUTING ACCEPT [10:600]
:SVCPROXY-SERVICES - [0:0]
:SVCPROXY-SVC-ABC - [3:180]
:SVCPROXY-PORTALS - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -m comment --comment svcproxy-services -j SVCPROXY-SERVICES
-A SVCPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SVCPROXY-SVC-ABC
-A SVCPROXY-PORTALS -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 41234
-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-X
COMMIT
*filter
:SVCPROXY-NO-ENDPOINTS - [0:0]
-A SVCPROXY-NO-ENDPOINTS -d 10.96.0.12/32 -j REJECT
COMMIT
"""
IPVS = "-A -t 10.96.0.13:80 -s rr\n-a -t 10.96.0.13:80 -r 10.244.2.5:80 -m -w 1\n"
ADDR = ("7: svcproxy0    inet 10.96.0.13/32 scope global svcproxy0\\       valid_lft forever\n"
        "7: svcproxy0    inet6 fe80::b841:ecff:fe90:5217/64 scope link \\       valid_lft forever\n")
LISTEN = ("tcp   LISTEN 0 128    0.0.0.0:9101   0.0.0.0:*\n"
          "tcp   LISTEN 0 128    0.0.0.0:41234  0.0.0.0:*\n"
          "udp   UNCONN 0 0      0.0.0.0:50000  0.0.0.0:*\n")


def test_kernel_objects_keep_svcproxys_own_and_drop_what_changes_per_start() -> None:
    objects = report.kernel_objects({"iptables-nft": NAT, "ipvs": IPVS, "svcproxy0": ADDR,
                                     "listen": LISTEN})
    assert objects == Counter([
        "iptables-nft nat :SVCPROXY-SERVICES",
        "iptables-nft nat :SVCPROXY-SVC-ABC",
        "iptables-nft nat :SVCPROXY-PORTALS",
        "iptables-nft nat -A PREROUTING -m comment --comment svcproxy-services -j SVCPROXY-SERVICES",
        "iptables-nft nat -A SVCPROXY-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SVCPROXY-SVC-ABC",
        "iptables-nft nat -A SVCPROXY-PORTALS -d 10.96.0.11/32 -p tcp -m tcp --dport 80"
        " -j REDIRECT --to-ports <port>",
        "iptables-nft filter :SVCPROXY-NO-ENDPOINTS",
        "iptables-nft filter -A SVCPROXY-NO-ENDPOINTS -d 10.96.0.12/32 -j REJECT",
        "ipvs -A -t 10.96.0.13:80 -s rr",
        "ipvs -a -t 10.96.0.13:80 -r 10.244.2.5:80 -m -w 1",
        "svcproxy0 inet 10.96.0.13/32",
        "listen tcp 0.0.0.0:9101", "listen tcp 0.0.0.0:<ephemeral>", "listen udp 0.0.0.0:<ephemeral>",
    ])
    assert not any(k.startswith("listen") for k in report.owned_only(objects))


def test_leak_diff_names_what_only_one_side_has() -> None:
    fresh = report.kernel_objects({"iptables-legacy": NAT})
    before = fresh + Counter({"iptables-legacy nat :SVCPROXY-SVC-GONE": 1})
    before["iptables-legacy nat :SVCPROXY-SVC-ABC"] -= 1
    diff = report.leak_diff(before, fresh)
    assert diff["leaked"] == ["iptables-legacy nat :SVCPROXY-SVC-GONE"]
    assert diff["missing"] == ["iptables-legacy nat :SVCPROXY-SVC-ABC"]
    assert report.leak_diff(fresh, fresh)["leaked_count"] == 0


def test_a_node_is_settled_when_it_reports_every_program_at_its_hash() -> None:
    programs = {"soak/a": "h1", "soak/b": "h2", "soak/bad": "h3"}
    good = {"applied": {"soak/a": "h1", "soak/b": "h2"},
            "errors": [{"service": "soak/bad", "message": "refused", "reason": "ForeignRealServer"}]}
    late = {"applied": {"soak/a": "h0", "soak/b": "h2", "soak/old": "h9"}}
    assert report.pending_programs(programs, {"node-1": good}) == {}
    assert report.pending_programs(programs, {"node-2": late, "node-3": None}) == {
        "node-2": ["not applied: soak/a", "not applied: soak/bad", "applied but gone: soak/old"],
        "node-3": ["no ProxyNode report"],
    }


def policy(name: str, spec: dict[str, Any], *, generation: int = 1, observed: int | None = 1,
           rows: list[dict[str, Any]] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return {"metadata": meta, "spec": spec,
            "status": {"observedGeneration": observed, "services": rows or []}}


def test_the_operator_is_settled_when_programs_match_what_policies_select() -> None:
    services = {"steady-0": {}, "churn-1": {plan.GROUP_LABEL: "g1"}, "churn-2": {plan.GROUP_LABEL: "g2"}}
    policies = [policy("steady-0", plan.steady_policy_spec("steady-0", "iptables")),
                policy("churn-p3", plan.churn_policy_spec("g1", {"mode": "iptables"}),
                       rows=[{"name": "churn-1", "state": "Programmed"}])]
    programs = {"soak/steady-0": "h", "soak/churn-1": "h", "other/x": "h"}
    assert report.operator_pending("soak", programs, services, policies) == []
    late = [policy("churn-p3", plan.churn_policy_spec("g2", {"mode": "iptables"}), generation=2,
                   rows=[{"name": "churn-2", "state": "Pending"}]),
            policy("churn-p4", plan.churn_policy_spec("g1", {"mode": "iptables"}), deleting=True)]
    assert report.operator_pending("soak", programs, services, late) == [
        "no program yet: soak/churn-2",
        "program of no policy: soak/churn-1", "program of no policy: soak/steady-0",
        "policy not observed at its generation: churn-p3", "Pending in churn-p3: churn-2",
        "policy being deleted: churn-p4",
    ]


def pod(name: str, *, ready: bool, phase: str = "Running", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-01T00:00:00Z"
    return {"metadata": meta, "status": {"phase": phase, "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}}


def test_pods_are_settled_when_ready_or_finished_and_none_terminates() -> None:
    assert report.pods_pending([pod("a", ready=True), pod("b", ready=False, phase="Failed")]) == []
    assert report.pods_pending([pod("c", ready=False, phase="Pending"),
                                pod("d", ready=True, deleting=True)]) == [
        "Pod not ready: c", "Pod terminating: d"]


# --- requests -----------------------------------------------------------------------------------

FAULTS: list[dict[str, Any]] = [
    {"kind": "etcd_compact", "target": "", "t": 1000.0},
    {"kind": "agent_kill", "target": "node-2", "t": 1100.0, "restarted_t": 1103.0},
    {"kind": "apiserver_restart", "target": "", "t": 1300.0, "restarted_t": 1310.0},
]


def test_nearest_fault_looks_both_ways() -> None:
    assert report.nearest_fault(1090.0, FAULTS) == {"kind": "agent_kill", "target": "node-2",
                                                    "t": 1100.0, "offset_s": -10.0}
    assert report.nearest_fault(1040.0, FAULTS)["kind"] == "etcd_compact"  # type: ignore[index]
    assert report.nearest_fault(5.0, []) is None


def test_modes_at_includes_a_switch_still_landing() -> None:
    line = [(900.0, "iptables"), (1100.0, "userspace")]
    assert report.modes_at(line, 1000.0) == ["iptables"]
    assert report.modes_at(line, 1104.0) == ["iptables", "userspace"]
    assert report.modes_at(line, 1200.0) == ["userspace"]
    assert report.modes_at(line, 800.0) == []


def test_an_agent_is_down_from_its_kill_to_the_grace_after_its_restart() -> None:
    assert report.agent_down(FAULTS, "node-2", 1110.0, grace=10)
    assert not report.agent_down(FAULTS, "node-2", 1114.0, grace=10)
    assert not report.agent_down(FAULTS, "node-1", 1101.0, grace=10)
    assert not report.agent_down(FAULTS, "node-2", 1099.0, grace=10)


def test_request_summary_counts_everything_and_explains_only_userspace_without_agent() -> None:
    records = [
        {"node": "node-1", "svc": "steady-0", "t": 1000.5, "ok": True, "ms": 2.0},
        {"node": "node-1", "svc": "steady-0", "t": 1001.0, "ok": True, "ms": 4.0},
        {"node": "node-2", "svc": "steady-1", "t": 1101.0, "ok": False, "err": "connect: refused"},
        {"node": "node-3", "svc": "steady-1", "t": 1101.5, "ok": False, "err": "answer: timed out"},
        {"node": "node-2", "svc": "steady-0", "t": 1102.0, "ok": False, "err": "connect: refused"},
    ]
    timelines = {"steady-0": [(900.0, "iptables")], "steady-1": [(900.0, "userspace")]}
    out = report.request_summary(records, timelines, FAULTS, grace=15)
    assert (out["sent"], out["ok"], out["failed"], out["failed_unexplained"]) == (5, 2, 3, 2)
    assert out["per_service"]["steady-0"]["nodes"] == {"node-1": {"sent": 2, "ok": 2},
                                                        "node-2": {"sent": 1, "failed": 1}}
    assert out["per_service"]["steady-0"]["latency_ms"]["max"] == 4.0
    first, second, third = out["failures"]
    assert (first["node"], first["cause"], first["modes"]) == ("node-2", report.USERSPACE_DOWN,
                                                               ["userspace"])
    assert first["nearest_fault"]["kind"] == "agent_kill"
    assert second["cause"] is None, "another node's agent was not down"
    assert third["cause"] is None, "an iptables Service does not need its agent"
    assert out["failed_by_cause"] == {report.USERSPACE_DOWN: 1, "unexplained": 2}


def test_readiness_ignores_unanswered_samples_but_not_empty_ones() -> None:
    rows = report.readiness([(1.0, "a", 2), (2.0, "a", None), (3.0, "a", 1),
                             (1.0, "b", 2), (2.0, "b", 0), (3.0, "c", None)])
    assert rows["a"]["ready_throughout"] and rows["a"]["min_ready"] == 1
    assert rows["a"]["unanswered"] == 1
    assert not rows["b"]["ready_throughout"] and rows["b"]["none_ready_at"] == [2.0]
    assert not rows["c"]["ready_throughout"], "never answered: not known to be ready"
