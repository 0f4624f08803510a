"""What both demos run (lab/svcproxy_lab/demoplan.py): manifests, status rows, expectations.

The expectations are checked where the policy's own mode runs and where every node runs
it as iptables (the kind cluster: no IPVS in the host's kernel), so a grid judged by
the wrong mode's promise fails here.
"""

from __future__ import annotations

from typing import Any

import pytest

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy_lab import demoplan
from svcproxy_lab.demoplan import SERVICES

NODES = ("kind-control-plane", "kind-worker", "kind-worker2")
NO_IPVS = "IPVS is not available in this kernel"


def service(name: str) -> demoplan.DemoService:
    return next(s for s in SERVICES if s.name == name)


def proxynode(name: str, *modes: tuple[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"modes": [
        {"requested": r, "effective": e, **({"reason": NO_IPVS} if r != e else {})}
        for r, e in modes]}}


def test_five_services_in_different_modes_and_schedulers() -> None:
    kinds = {(s.mode, (s.spec.get("ipvs") or {}).get("scheduler")) for s in SERVICES}
    assert len(SERVICES) == len(kinds) == 5
    assert {m for m, _ in kinds} == {"ipvs", "iptables", "userspace"}


def test_each_policy_expects_what_its_own_mode_shows() -> None:
    assert {s.name: s.expect for s in SERVICES} == {
        "echo-rr": "even", "echo-sticky": "pinned", "web-canary": "weighted",
        "echo-iptables": "random", "echo-userspace": "even"}


@pytest.mark.parametrize(("mode", "spec", "expect"), [
    ("iptables", {"ipvs": {"scheduler": "rr"}}, "random"),  # rr asked, iptables picks at random
    ("iptables", {"ipvs": {"scheduler": "sh"}}, "random"),  # no hash in iptables
    ("iptables", {"sessionAffinity": {"type": "ClientIP"}}, "pinned"),
    ("iptables", {"weights": demoplan.CANARY_WEIGHTS}, "weighted"),
    ("ipvs", {"ipvs": {"scheduler": "mh"}}, "pinned"),
    ("ipvs", {"ipvs": {"scheduler": "wrr"}}, "even"),
    ("ipvs", {"ipvs": {"scheduler": "lc"}}, "random"),  # stateful: no promise
    ("ipvs", {"sessionAffinity": {"type": "None"}}, "even"),  # rr by default
    ("userspace", {"ipvs": {"scheduler": "sh"}}, "pinned"),  # the agent hashes the client
    ("userspace", {"ipvs": {"scheduler": "nq"}}, "random"),
])
def test_expect_for_follows_the_mode_that_runs(mode: str, spec: dict[str, Any], expect: str) -> None:
    assert demoplan.expect_for(mode, spec) == expect


def test_every_node_without_ipvs_judges_ipvs_grids_as_iptables() -> None:
    modes = demoplan.effective_modes([proxynode(n, ("ipvs", "iptables"), ("iptables", "iptables"))
                                      for n in NODES])
    assert modes[NODES[0]] == {"ipvs": ("iptables", NO_IPVS), "iptables": ("iptables", "")}
    title, expect = demoplan.in_effect(service("echo-rr"), modes)
    assert (title, expect) == ("ipvs rr -> iptables", "random")
    assert demoplan.mode_in_effect(service("echo-rr"), modes) == "ipvs (iptables on 3/3 nodes)"
    assert demoplan.in_effect(service("echo-sticky"), modes)[1] == "pinned"  # affinity holds
    assert demoplan.in_effect(service("web-canary"), modes)[1] == "weighted"  # probabilities
    # Policies in other modes are not touched by the ipvs fallback.
    assert demoplan.in_effect(service("echo-iptables"), modes) == ("iptables", "random")
    assert demoplan.in_effect(service("echo-userspace"), modes) == ("userspace rr", "even")
    assert demoplan.mode_in_effect(service("echo-iptables"), modes) == "iptables"


def test_some_nodes_without_ipvs_are_named_and_keep_the_policys_expectation() -> None:
    modes = demoplan.effective_modes([proxynode("node-1", ("ipvs", "iptables")),
                                      proxynode("node-2", ("ipvs", "ipvs")), proxynode("node-3")])
    assert demoplan.in_effect(service("echo-rr"), modes) == ("ipvs rr (iptables on node-1)", "even")
    assert demoplan.mode_in_effect(service("echo-rr"), modes) == "ipvs (iptables on 1/3 nodes)"


def test_no_fallback_keeps_title_and_expectation() -> None:
    modes = demoplan.effective_modes([proxynode(n, ("ipvs", "ipvs")) for n in NODES])
    assert demoplan.in_effect(service("echo-rr"), modes) == ("ipvs rr", "even")
    assert demoplan.mode_in_effect(service("echo-rr"), modes) == "ipvs"
    assert demoplan.fallback_notes(modes) == []


def test_fallback_notes_name_every_node_once_with_the_reason() -> None:
    modes = demoplan.effective_modes([proxynode(n, ("ipvs", "iptables"), ("userspace", "userspace"))
                                      for n in NODES])
    assert demoplan.fallback_notes(modes) == [
        f"ipvs runs as iptables on {', '.join(NODES)} (their ProxyNode says: {NO_IPVS})"]


def test_workload_deploys_six_pods_behind_five_services_in_one_namespace() -> None:
    container = {"name": "c", "image": "x"}
    docs = demoplan.workload(container, "ns")
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}}
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert sum(d["spec"]["replicas"] for d in deployments) == 6
    for d in deployments:
        assert d["metadata"]["namespace"] == "ns"
        assert d["spec"]["template"]["spec"]["containers"] == [container]
        assert d["spec"]["selector"]["matchLabels"] == d["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(services) == {s.name for s in SERVICES}
    assert services["web-canary"]["spec"]["selector"] == {"app": "web"}
    assert services["echo-rr"]["spec"]["ports"] == [
        {"name": "tcp", "port": 80, "targetPort": 8080, "protocol": "TCP"}]


def test_policy_manifests_are_valid_and_name_their_service() -> None:
    for s in SERVICES:
        doc = demoplan.policy_manifest(s, "ns")
        policy = ServiceProxyPolicy.model_validate(doc)
        assert doc["metadata"] == {"name": s.name, "namespace": "ns"}
        assert doc["spec"]["services"] == [s.name] and policy.spec.mode == s.mode


def spp(*, gen: int = 2, observed: int = 2, programmed: str = "True", done: int = 3,
        total: int = 3, mode: str = "ipvs (iptables on a, b, c)") -> dict[str, Any]:
    return {
        "metadata": {"generation": gen},
        "spec": {"mode": "ipvs", "ipvs": {"scheduler": "sh"},
                 "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600}},
        "status": {"observedGeneration": observed,
                   "conditions": [{"type": "Programmed", "status": programmed,
                                   "observedGeneration": observed}],
                   "services": [{"name": "s", "clusterIP": "10.97.0.9", "mode": mode,
                                 "state": "Programmed", "nodesProgrammed": done,
                                 "nodesTotal": total}]},
    }


def test_programmed_row_reads_the_status_of_this_generation_on_every_node() -> None:
    assert demoplan.programmed_row(spp()) == {
        "mode": "ipvs (iptables on a, b, c)", "scheduler": "sh", "affinity": "ClientIP 600s",
        "programmed": "3/3", "nodes_programmed": 3, "nodes_total": 3, "cluster_ip": "10.97.0.9"}
    assert demoplan.programmed_row(spp(observed=1)) is None  # an older generation's status
    assert demoplan.programmed_row(spp(programmed="False")) is None
    assert demoplan.programmed_row(spp(done=2)) is None  # not yet on every node
