"""plan_namespace: programs written only on change, handover order, policy statuses, Events."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_compile_helpers import endpoint, endpoint_slice, policy_obj, proxy_node, service

from svcproxy.api import HANDOVER_LABEL, ProxyNode
from svcproxy.compile.planner import NamespacePlan, NamespaceView, PlanMemo, plan_namespace

JSON = dict[str, Any]


def view(
    policies: list[JSON],
    services: list[JSON] | None = None,
    *,
    programs: dict[str, JSON] | None = None,
    nodes: list[ProxyNode] | None = None,
    now: float = 100.0,
    unlabelled_at: dict[str, float] | None = None,
) -> NamespaceView:
    svcs = services if services is not None else [service("web")]
    return NamespaceView(
        namespace="ns",
        policies=policies,
        services={s["metadata"]["name"]: s for s in svcs},
        slices={"web": [endpoint_slice([endpoint("10.244.1.2", pod="web-1"), endpoint("10.244.2.2")])]},
        pod_labels={},
        programs=programs or {},
        nodes=nodes if nodes is not None else [proxy_node("node-1"), proxy_node("node-2")],
        now=now,
        now_iso="2026-11-26T18:00:00Z",
        unlabelled_at=unlabelled_at or {},
        handover_delay=3.0,
    )


def conditions(plan: NamespacePlan, name: str) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c.get("reason", "")) for c in plan.statuses[name]["conditions"]}


def stored(plan: NamespacePlan, name: str = "web") -> dict[str, JSON]:
    return {name: {"metadata": {"name": name}, "spec": plan.writes[name].wire()}}


def test_new_policy_writes_program_and_is_accepted_not_programmed() -> None:
    plan = plan_namespace(view([policy_obj("p")]))
    assert list(plan.writes) == ["web"]
    assert [r.address for r in plan.writes["web"].virtual_servers[0].real_servers] == [
        "10.244.1.2",
        "10.244.2.2",
    ]
    assert conditions(plan, "p") == {
        "Accepted": ("True", "Accepted"),
        "Programmed": ("False", "Pending"),
        "Conflicted": ("False", "NoConflict"),
        "Degraded": ("False", "AllNodesHealthy"),
    }
    status = plan.statuses["p"]
    assert status["programmed"] == "0/2" and status["observedGeneration"] == 1
    assert status["services"][0]["state"] == "Pending"
    assert plan.label == [] and plan.delete == []
    assert {e.reason for e in plan.events} == {"Accepted", "Pending"}


def test_unchanged_program_is_not_rewritten() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    again = plan_namespace(view([policy_obj("p")], programs=stored(first)))
    assert again.writes == {}


def test_programmed_on_every_node_labels_the_service() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    digest = first.writes["web"].content_hash
    half = plan_namespace(
        view(
            [policy_obj("p")],
            programs=stored(first),
            nodes=[proxy_node("node-1", {"ns/web": digest}), proxy_node("node-2")],
        )
    )
    assert half.label == []
    assert half.statuses["p"]["services"][0]["nodesProgrammed"] == 1
    assert half.statuses["p"]["programmed"] == "1/2"
    both = [proxy_node("node-1", {"ns/web": digest}), proxy_node("node-2", {"ns/web": digest})]
    done = plan_namespace(
        view([policy_obj("p", status=half.statuses["p"])], programs=stored(first), nodes=both)
    )
    assert done.label == ["web"]
    assert conditions(done, "p")["Programmed"] == ("True", "Programmed")
    assert done.statuses["p"]["programmed"] == "2/2"
    assert [e.reason for e in done.events] == ["Programmed"]
    stale = [proxy_node("node-1", {"ns/web": "old"}), proxy_node("node-2", {"ns/web": digest})]
    assert plan_namespace(view([policy_obj("p")], programs=stored(first), nodes=stale)).label == []


def test_a_node_without_an_agent_report_holds_programmed_and_the_handover() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    digest = first.writes["web"].content_hash
    both = [proxy_node("node-1", {"ns/web": digest}), proxy_node("node-2", {"ns/web": digest})]
    three = replace(
        view([policy_obj("p")], programs=stored(first), nodes=both),
        expected_nodes=frozenset({"node-1", "node-2", "node-3"}),
    )
    plan = plan_namespace(three)
    # kube-proxy must keep the Service until node-3 runs the program too.
    assert plan.label == []
    status, reason = conditions(plan, "p")["Programmed"]
    assert (status, reason) == ("False", "Pending")
    message = next(c["message"] for c in plan.statuses["p"]["conditions"] if c["type"] == "Programmed")
    assert "no agent report from node-3" in message and "web: 2/3 nodes" in message
    assert plan.statuses["p"]["programmed"] == "2/3"


def test_a_report_from_a_node_that_is_gone_does_not_count() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    digest = first.writes["web"].content_hash
    reports = [proxy_node("node-1", {"ns/web": digest}), proxy_node("node-old")]
    only_one = replace(
        view([policy_obj("p")], programs=stored(first), nodes=reports),
        expected_nodes=frozenset({"node-1"}),
    )
    plan = plan_namespace(only_one)
    assert plan.label == ["web"]
    assert conditions(plan, "p")["Programmed"] == ("True", "Programmed")
    assert plan.statuses["p"]["programmed"] == "1/1"


def test_a_node_that_leaves_and_one_that_joins_move_the_count_through_one_memo() -> None:
    """What tests/e2e/test_nodes_come_and_go.py does to the cluster, pass by pass, with the
    operator's memo kept between passes: each pass says what a pass without it says."""
    first = plan_namespace(view([policy_obj("p")]))
    digest = first.writes["web"].content_hash
    done = {"ns/web": digest}
    three = frozenset({"node-1", "node-2", "node-3"})
    staying = [proxy_node("node-1", done), proxy_node("node-2", done)]
    steps = [
        ("all three report", three, [*staying, proxy_node("node-3", done)], "3/3", True),
        # Deleted: its ProxyNode waits for the garbage collector and does not count.
        ("node-3's Node deleted", three - {"node-3"}, [*staying, proxy_node("node-3", done)], "2/2", True),
        ("its ProxyNode collected", three - {"node-3"}, staying, "2/2", True),
        # A new Node of that name is Ready before its agent reports: it counts.
        ("node-3 Ready, no report", three, staying, "2/3", False),
        ("its agent reports an empty table", three, [*staying, proxy_node("node-3")], "2/3", False),
        ("its agent applied the program", three, [*staying, proxy_node("node-3", done)], "3/3", True),
    ]
    memo = PlanMemo()
    for what, expected, reports, count, programmed in steps:
        now = replace(view([policy_obj("p")], programs=stored(first), nodes=reports), expected_nodes=expected)
        plan = plan_namespace(now, memo)
        assert plan.statuses == plan_namespace(now).statuses, what
        status = plan.statuses["p"]
        assert status["programmed"] == count, what
        assert conditions(plan, "p")["Programmed"][0] == ("True" if programmed else "False"), what
        row = status["services"][0]
        assert f"{row['nodesProgrammed']}/{row['nodesTotal']}" == count, what


def test_no_agents_means_not_programmed() -> None:
    plan = plan_namespace(view([policy_obj("p")], nodes=[]))
    assert conditions(plan, "p")["Programmed"] == ("False", "NoAgents")
    assert plan.label == []


def test_policy_gone_unlabels_first_then_deletes_after_delay() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    labelled = service("web", labels={HANDOVER_LABEL: "svcproxy"})
    step1 = plan_namespace(
        view([policy_obj("p", deleting=True)], [labelled], programs=stored(first), now=100)
    )
    assert step1.unlabel == ["web"] and step1.delete == []
    assert step1.recheck_at == 103.0
    assert step1.owned_after == {"web": "p"}  # the finalizer keeps waiting
    assert "p" not in step1.statuses  # no status writes for a policy being deleted
    unlabelled = service("web")
    step2 = plan_namespace(
        view(
            [policy_obj("p", deleting=True)],
            [unlabelled],
            programs=stored(first),
            now=102,
            unlabelled_at=step1.unlabelled_at,
        )
    )
    assert step2.delete == [] and step2.unlabel == []
    step3 = plan_namespace(
        view(
            [policy_obj("p", deleting=True)],
            [unlabelled],
            programs=stored(first),
            now=103.5,
            unlabelled_at=step2.unlabelled_at,
        )
    )
    assert step3.delete == ["web"] and step3.owned_after == {}
    assert step3.unlabelled_at == {}


def test_service_dropped_from_selection_withdraws_too() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    labelled = service("web", labels={HANDOVER_LABEL: "svcproxy"})
    plan = plan_namespace(
        view([policy_obj("p", {"services": ["other"]})], [labelled], programs=stored(first))
    )
    assert plan.unlabel == ["web"] and plan.delete == []
    assert conditions(plan, "p")["Accepted"] == ("False", "NoServicesFound")


def test_program_of_a_deleted_service_is_deleted_at_once() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    plan = plan_namespace(view([policy_obj("p")], [], programs=stored(first)))
    assert plan.delete == ["web"]


def test_conflict_loser_names_service_and_winner_and_gets_warning() -> None:
    old = policy_obj("old", created="2026-01-01T00:00:00Z")
    new = policy_obj(
        "new", {"services": ["web"], "ipvs": {"scheduler": "lc"}}, created="2026-02-01T00:00:00Z"
    )
    plan = plan_namespace(view([new, old]))
    assert plan.writes["web"].policy.name == "old" and plan.writes["web"].scheduler == "rr"
    assert conditions(plan, "new")["Conflicted"] == ("True", "OtherPolicyWins")
    assert conditions(plan, "old")["Conflicted"] == ("False", "NoConflict")
    msg = next(c["message"] for c in plan.statuses["new"]["conditions"] if c["type"] == "Conflicted")
    assert msg == "Service web: policy old wins (same priority, older policy)"
    assert plan.statuses["new"]["services"][0]["state"] == "Conflicted"
    warnings = [e for e in plan.events if e.type == "Warning"]
    assert [(e.policy, e.reason) for e in warnings] == [("new", "OtherPolicyWins")]
    # The loser wins once it outranks the other.
    urgent = policy_obj(
        "new",
        {"services": ["web"], "ipvs": {"scheduler": "lc"}, "priority": 5},
        created="2026-02-01T00:00:00Z",
    )
    assert plan_namespace(view([urgent, old])).writes["web"].scheduler == "lc"


def test_external_name_and_headless_are_not_proxied() -> None:
    svcs = [service("web", cluster_ip="None"), service("ext", type_="ExternalName", cluster_ip=None)]
    plan = plan_namespace(view([policy_obj("p", {"services": ["web", "ext"]})], svcs))
    assert plan.writes == {}
    rows = {r["name"]: r for r in plan.statuses["p"]["services"]}
    assert rows["web"]["state"] == "NotProxied" and "headless" in rows["web"]["message"]
    assert rows["ext"]["state"] == "NotProxied" and "DNS" in rows["ext"]["message"]
    assert conditions(plan, "p")["Programmed"] == ("False", "NothingToProgram")


def test_services_that_need_more_than_a_cluster_ip_stay_with_kube_proxy() -> None:
    node_port = service("np", type_="NodePort")
    external = service("ext")
    external["spec"]["externalIPs"] = ["192.0.2.10"]
    local = service("loc")
    local["spec"]["internalTrafficPolicy"] = "Local"
    plain = service("web")
    plan = plan_namespace(
        view(
            [policy_obj("p", {"services": ["np", "ext", "loc", "web"]})], [node_port, external, local, plain]
        )
    )
    assert list(plan.writes) == ["web"]
    rows = {r["name"]: r for r in plan.statuses["p"]["services"]}
    assert rows["np"]["state"] == "NotProxied" and "type NodePort" in rows["np"]["message"]
    assert rows["ext"]["state"] == "NotProxied" and "externalIPs" in rows["ext"]["message"]
    assert rows["loc"]["state"] == "NotProxied" and "internalTrafficPolicy" in rows["loc"]["message"]
    # A Service already handed to svcproxy that becomes a NodePort goes back to kube-proxy.
    labelled = service("np", type_="NodePort", labels={HANDOVER_LABEL: "svcproxy"})
    back = plan_namespace(view([policy_obj("p", {"services": ["np"]})], [labelled]))
    assert back.unlabel == ["np"] and back.label == []


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_node_ports_and_external_ips_are_taken_in_iptables_and_userspace_modes(mode: str) -> None:
    node_port = service("np", type_="NodePort", ports=[{"name": "", "port": 80, "nodePort": 30080}])
    external = service("ext")
    external["spec"]["externalIPs"] = ["192.0.2.10"]
    names = {"services": ["np", "ext"]}
    plan = plan_namespace(view([policy_obj("p", {**names, "mode": mode})], [node_port, external]))
    assert sorted(plan.writes) == ["ext", "np"]
    types = {vs.address_type for w in plan.writes.values() for vs in w.virtual_servers}
    assert types == {"ClusterIP", "NodePort", "ExternalIP"}
    plan = plan_namespace(view([policy_obj("p", {**names, "mode": "ipvs"})], [node_port, external]))
    assert plan.writes == {}
    rows = {r["name"]: r for r in plan.statuses["p"]["services"]}
    assert all("mode is ipvs" in rows[n]["message"] for n in ("np", "ext")), rows


def test_service_handed_to_another_proxy_is_left_alone() -> None:
    svc = service("web", labels={HANDOVER_LABEL: "cilium"})
    plan = plan_namespace(view([policy_obj("p")], [svc]))
    assert plan.writes == {} and plan.unlabel == []
    assert plan.statuses["p"]["services"][0]["state"] == "NotProxied"


def test_fallback_and_errors_make_degraded_naming_nodes() -> None:
    nodes = [
        proxy_node("node-1", modes=[{"requested": "ipvs", "effective": "iptables", "reason": "no IPVS"}]),
        proxy_node("node-2", errors=[{"service": "ns/web", "message": "scheduler mh not loaded"}]),
    ]
    plan = plan_namespace(view([policy_obj("p")], nodes=nodes))
    cond = next(c for c in plan.statuses["p"]["conditions"] if c["type"] == "Degraded")
    assert cond["status"] == "True"
    assert (
        "iptables on node-1" in cond["message"]
        and "node-2: ns/web: scheduler mh not loaded" in cond["message"]
    )
    assert plan.statuses["p"]["services"][0]["mode"] == "ipvs (iptables on node-1)"


def test_invalid_policy_gets_a_status_message_not_a_crash() -> None:
    bad = policy_obj("bad", {"services": ["web"], "mode": "warp", "ipvs": {"scheduler": "nope"}})
    plan = plan_namespace(view([bad]))
    cond = next(c for c in plan.statuses["bad"]["conditions"] if c["type"] == "Accepted")
    assert cond["status"] == "False" and cond["reason"] == "InvalidSpec"
    assert "mode" in cond["message"] or "scheduler" in cond["message"]
    assert plan.writes == {}


def test_huge_selector_and_service_without_ports() -> None:
    huge = {"serviceSelector": {"matchLabels": {f"k{i}": "v" for i in range(500)}}}
    plan = plan_namespace(view([policy_obj("huge", huge), policy_obj("p")], [service("web", ports=[])]))
    assert conditions(plan, "huge")["Accepted"] == ("False", "InvalidSpec")
    assert plan.statuses["p"]["services"][0]["state"] == "NotProxied"


def test_program_too_large_for_etcd_is_refused_with_a_message() -> None:
    eps = [endpoint(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", pod=f"pod-{i}") for i in range(7000)]
    v = view([policy_obj("p")])
    big = NamespaceView(**{**v.__dict__, "slices": {"web": [endpoint_slice(eps)]}})
    plan = plan_namespace(big)
    assert plan.writes == {}
    row = plan.statuses["p"]["services"][0]
    assert row["state"] == "NotProxied" and "limit 1000000" in row["message"]


def test_transition_times_kept_and_no_write_when_status_unchanged() -> None:
    first = plan_namespace(view([policy_obj("p")]))
    later = NamespaceView(
        **{
            **view([policy_obj("p", status=first.statuses["p"])], programs=stored(first)).__dict__,
            "now_iso": "2030-01-01T00:00:00Z",
        }
    )
    again = plan_namespace(later)
    assert "p" not in again.statuses and again.events == []


# --- property: the handover order holds whatever the starting state -------------------------


@settings(max_examples=200)
@given(
    policy_state=st.sampled_from(["live", "deleting", "absent", "selects-other"]),
    labelled=st.booleans(),
    has_program=st.booleans(),
    service_exists=st.booleans(),
    since=st.one_of(st.none(), st.floats(90, 100)),
    now=st.floats(100, 110),
)
def test_handover_order_invariants(
    *,
    policy_state: str,
    labelled: bool,
    has_program: bool,
    service_exists: bool,
    since: float | None,
    now: float,
) -> None:
    policies = {
        "live": [policy_obj("p")],
        "deleting": [policy_obj("p", deleting=True)],
        "absent": [],
        "selects-other": [policy_obj("p", {"services": ["other"]})],
    }[policy_state]
    svc = service("web", labels={HANDOVER_LABEL: "svcproxy"} if labelled else {})
    programs = {}
    if has_program:
        programs = stored(plan_namespace(view([policy_obj("p")])))
    plan = plan_namespace(
        view(
            policies,
            [svc] if service_exists else [],
            programs=programs,
            now=now,
            unlabelled_at={"web": since} if since is not None else {},
        )
    )
    # A Service kube-proxy ignores (labelled) never loses its program while it exists.
    if service_exists and labelled and "web" not in plan.unlabel:
        assert "web" not in plan.delete
    # Unlabel and delete of one Service never happen in the same pass.
    assert not ("web" in plan.unlabel and "web" in plan.delete)
    # A program is deleted only after the delay since the label went (or with its Service).
    if "web" in plan.delete and service_exists:
        assert since is not None and now >= since + 3.0
    # Labelling needs every node to report the current program: the fake nodes report nothing.
    assert plan.label == []
    # A live selecting policy always has its program, and never withdraws it.
    if policy_state == "live" and service_exists:
        assert "web" not in plan.delete and "web" not in plan.unlabel
        assert "web" in plan.compiled
