"""Cluster policies in the planner: namespace selection, precedence below every
namespaced policy, Services never taken, handover back, and a status that stays small."""

from __future__ import annotations

import json
from typing import Any

from test_compile_helpers import endpoint, endpoint_slice, policy_obj, proxy_node, service

from svcproxy.api import HANDOVER_LABEL, ProxyNode
from svcproxy.compile.cluster import (
    CLUSTER_PREFIX,
    ClusterPart,
    cluster_status,
    for_namespace,
    parse_cluster,
)
from svcproxy.compile.planner import NamespacePlan, NamespaceView, plan_namespace

JSON = dict[str, Any]
NOW = "2026-12-07T16:00:00Z"


def cluster_obj(
    name: str = "default",
    spec: JSON | None = None,
    *,
    created: str = "2026-01-01T00:00:00Z",
    status: JSON | None = None,
) -> JSON:
    obj: JSON = {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ClusterServiceProxyPolicy",
        "metadata": {"name": name, "uid": f"uid-{name}", "generation": 1, "creationTimestamp": created},
        "spec": spec if spec is not None else {"mode": "iptables"},
    }
    if status is not None:
        obj["status"] = status
    return obj


def view(
    clusters: list[JSON],
    *,
    policies: list[JSON] | None = None,
    services: list[JSON] | None = None,
    labels: dict[str, str] | None = None,
    namespace: str = "ns",
    nodes: list[ProxyNode] | None = None,
    programs: dict[str, JSON] | None = None,
    now: float = 100.0,
    unlabelled_at: dict[str, float] | None = None,
) -> NamespaceView:
    svcs = services if services is not None else [service("web")]
    stand_ins = for_namespace([parse_cluster(c) for c in clusters], labels or {"proxy": "svcproxy"})
    return NamespaceView(
        namespace=namespace,
        policies=policies or [],
        services={s["metadata"]["name"]: s for s in svcs},
        slices={s["metadata"]["name"]: [endpoint_slice([endpoint("10.244.1.2")])] for s in svcs},
        pod_labels={},
        programs=programs or {},
        nodes=nodes if nodes is not None else [proxy_node("node-1"), proxy_node("node-2")],
        now=now,
        now_iso=NOW,
        unlabelled_at=unlabelled_at or {},
        handover_delay=3.0,
        cluster_policies=stand_ins,
    )


def stored(plan: NamespacePlan) -> dict[str, JSON]:
    return {n: {"metadata": {"name": n}, "spec": plan.writes[n].wire()} for n in plan.writes}


def conditions(status: JSON) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_namespace_selector_picks_namespaces_by_label() -> None:
    parsed = [parse_cluster(cluster_obj(spec={"namespaceSelector": {"matchLabels": {"proxy": "svcproxy"}}}))]
    assert [s["metadata"]["name"] for s in for_namespace(parsed, {"proxy": "svcproxy"})] == [
        CLUSTER_PREFIX + "default"
    ]
    assert for_namespace(parsed, {"proxy": "kube-proxy"}) == []
    assert for_namespace(parsed, {}) == []
    # No namespaceSelector: every namespace.
    everywhere = [parse_cluster(cluster_obj(spec={}))]
    assert len(for_namespace(everywhere, {})) == 1


def test_cluster_policy_programs_every_service_then_labels_once_every_node_reports() -> None:
    first = plan_namespace(
        view([cluster_obj()], services=[service("web"), service("api", cluster_ip="10.96.0.11")])
    )
    assert sorted(first.writes) == ["api", "web"]
    assert first.writes["web"].mode == "iptables"
    assert first.writes["web"].policy.name == CLUSTER_PREFIX + "default"
    assert first.statuses == {}  # a cluster policy has no namespaced status
    part = first.cluster["default"]
    assert (part.selected, part.pending, part.programmed) == (2, 2, 0)
    assert [p[:2] for p in part.problems] == [("api", "Pending"), ("web", "Pending")]
    hashes = {n: s.content_hash for n, s in first.writes.items()}
    applied = {f"ns/{n}": h for n, h in hashes.items()}
    done = plan_namespace(
        view(
            [cluster_obj()],
            services=[service("web"), service("api", cluster_ip="10.96.0.11")],
            programs=stored(first),
            nodes=[proxy_node("node-1", applied), proxy_node("node-2", applied)],
        )
    )
    assert done.label == ["api", "web"]
    part = done.cluster["default"]
    assert (part.programmed, part.pending, part.complete) == (2, 0, frozenset({"node-1", "node-2"}))
    status = cluster_status(
        parse_cluster(cluster_obj()), {"ns": part}, nodes_reporting=2, nodes_total=2, now_iso=NOW
    )
    assert conditions(status)["Programmed"] == ("True", "Programmed")
    assert conditions(status)["Accepted"] == ("True", "Accepted")
    assert status["programmed"] == "2/2"
    assert status["summary"]["selected"] == 2 and status["summary"]["namespaces"] == 1
    assert status["problems"] == []


def test_a_namespaced_policy_beats_a_cluster_policy_whatever_the_priority() -> None:
    urgent = cluster_obj(spec={"mode": "iptables", "priority": 1000000})
    low = policy_obj("web-ipvs", {"services": ["web"], "mode": "ipvs", "priority": -1000000})
    plan = plan_namespace(
        view([urgent], policies=[low], services=[service("web"), service("api", cluster_ip="10.96.0.11")])
    )
    assert plan.writes["web"].policy.name == "web-ipvs" and plan.writes["web"].mode == "ipvs"
    assert plan.writes["api"].mode == "iptables"
    part = plan.cluster["default"]
    assert (part.selected, part.overridden, part.conflicted, part.pending) == (2, 1, 0, 1)
    overridden = [p for p in part.problems if p[1] == "Overridden"]
    assert overridden[0][0] == "web" and "web-ipvs wins" in overridden[0][2]
    # Overridden is not an error: the cluster policy is not Conflicted, the namespaced one neither.
    status = cluster_status(
        parse_cluster(urgent), {"ns": part}, nodes_reporting=2, nodes_total=2, now_iso=NOW
    )
    assert conditions(status)["Conflicted"] == ("False", "NoConflict")
    assert status["summary"]["overridden"] == 1
    assert conditions({"conditions": plan.statuses["web-ipvs"]["conditions"]})["Conflicted"][0] == "False"
    assert [r["state"] for r in plan.statuses["web-ipvs"]["services"]] == ["Pending"]


def test_among_cluster_policies_higher_priority_then_older_wins() -> None:
    old = cluster_obj("old", {"mode": "iptables"}, created="2026-01-01T00:00:00Z")
    new = cluster_obj("new", {"mode": "ipvs"}, created="2026-02-01T00:00:00Z")
    plan = plan_namespace(view([new, old]))
    assert plan.writes["web"].policy.name == CLUSTER_PREFIX + "old"
    assert plan.cluster["new"].conflicted == 1 and plan.cluster["old"].conflicted == 0
    status = cluster_status(parse_cluster(new), plan.cluster, nodes_reporting=2, nodes_total=2, now_iso=NOW)
    assert conditions(status)["Conflicted"] == ("True", "OtherPolicyWins")
    urgent = cluster_obj("new", {"mode": "ipvs", "priority": 5}, created="2026-02-01T00:00:00Z")
    plan = plan_namespace(view([urgent, old]))
    assert plan.writes["web"].policy.name == CLUSTER_PREFIX + "new"
    assert plan.cluster["old"].conflicted == 1


def test_headless_external_name_and_other_proxies_services_are_never_taken() -> None:
    services = [
        service("web"),
        service("headless", cluster_ip="None"),
        {**service("ext", cluster_ip=None, type_="ExternalName")},
        service("other", cluster_ip="10.96.0.12", labels={HANDOVER_LABEL: "another-proxy"}),
    ]
    plan = plan_namespace(view([cluster_obj(spec={})], services=services))
    assert list(plan.writes) == ["web"]
    assert plan.label == [] and plan.unlabel == []
    part = plan.cluster["default"]
    assert (part.selected, part.not_proxied, part.pending) == (4, 3, 1)


def test_deleting_the_cluster_policy_hands_its_services_back_label_first() -> None:
    first = plan_namespace(view([cluster_obj()]))
    labelled = service("web", labels={HANDOVER_LABEL: "svcproxy"})
    gone = plan_namespace(view([], services=[labelled], programs=stored(first), now=200.0))
    assert gone.unlabel == ["web"] and gone.delete == []
    assert gone.cluster == {}
    later = plan_namespace(
        view(
            [], services=[service("web")], programs=stored(first), now=204.0, unlabelled_at=gone.unlabelled_at
        )
    )
    assert later.delete == ["web"]


def test_status_stays_small_over_many_services_and_namespaces() -> None:
    parts: dict[str, ClusterPart] = {}
    for n in range(20):
        svcs = [service(f"s{i}", cluster_ip=f"10.96.{n}.{i + 1}") for i in range(100)]
        plan = plan_namespace(view([cluster_obj()], services=svcs, namespace=f"ns{n:02}"))
        parts[f"ns{n:02}"] = plan.cluster["default"]
    # 2,000 Services in 20 namespaces; scaled to 10k Services across many namespaces the
    # status is the same size: counts and at most ten problem rows.
    many = {f"team{i:04}": parts["ns00"] for i in range(100)} | parts
    status = cluster_status(parse_cluster(cluster_obj()), many, nodes_reporting=2, nodes_total=2, now_iso=NOW)
    assert status["summary"]["selected"] == 12000 and status["summary"]["pending"] == 12000
    assert status["summary"]["namespaces"] == 120
    assert len(status["problems"]) == 10
    assert [(p["namespace"], p["name"]) for p in status["problems"][:2]] == [("ns00", "s0"), ("ns00", "s1")]
    assert len(json.dumps(status)) < 8000
    assert status["programmed"] == "0/2"


def test_invalid_cluster_policy_is_not_accepted_and_transition_times_are_kept() -> None:
    bad = parse_cluster(cluster_obj(spec={"mode": "iptables", "ipvs": {"scheduler": "rr"}}))
    assert bad.policy is None and "ipvs" in bad.error
    assert for_namespace([bad], {}) == []
    status = cluster_status(bad, {}, nodes_reporting=2, nodes_total=2, now_iso=NOW)
    assert conditions(status)["Accepted"] == ("False", "InvalidSpec")
    first = cluster_status(parse_cluster(cluster_obj()), {}, nodes_reporting=2, nodes_total=2, now_iso=NOW)
    assert conditions(first)["Accepted"] == ("False", "NoServicesFound")
    again = cluster_status(
        parse_cluster(cluster_obj(status=first)),
        {},
        nodes_reporting=2,
        nodes_total=2,
        now_iso="2026-12-08T00:00:00Z",
    )
    assert again == first  # nothing changed: nothing to write
