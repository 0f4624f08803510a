"""ClusterServiceProxyPolicy against the lab's real API server, operator and agents.

A lab of its own (2 netns nodes, the operator and agents the lab starts, in
its own state folder). One namespace labelled for the cluster policy holds an
echo Deployment behind Services ``web`` and ``api`` and a headless Service;
another namespace, not labelled at first, holds Service ``other``. The test
shows, in order: the cluster policy (iptables mode) programs the labelled
namespace's Services and real traffic from each node's client namespace gets
through, while the headless Service and the other namespace are left to
kube-proxy; a ServiceProxyPolicy overrides it for ``web`` (the program's mode
changes, the cluster policy reports it overridden, not conflicted); an invalid
cluster policy is refused by the API server naming the field; labelling the
other namespace brings its Service in; deleting the cluster policy hands its
Services back (the label goes first, the programs after).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from system_helpers import SystemLab, echo_deployment, echo_service, system_lab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.root]

STATE = Path(os.environ.get("SVCPROXY_E2E_CSPP_STATE_DIR", "/tmp/svcproxy-e2e-cspp"))
NODES = ("node-1", "node-2")
NS, OTHER = "cspp-on", "cspp-later"
SELECT_LABEL = "svcproxy.io/e2e-cspp"
HANDOVER = "service.kubernetes.io/service-proxy-name"
CSPP = "e2e-default"


@pytest.fixture(scope="module")
def clab(lab_slot: None) -> Iterator[SystemLab]:
    with system_lab(STATE, NODES, up_args=()) as lab:
        yield lab


def cluster_policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ClusterServiceProxyPolicy",
        "metadata": {"name": CSPP},
        "spec": spec,
    }


def labels(lab: SystemLab, namespace: str, service: str) -> dict[str, str]:
    obj = lab.get("service", service, "-n", namespace) or {}
    return dict((obj.get("metadata") or {}).get("labels") or {})


def wait_status(lab: SystemLab, check: Any, what: str, timeout: float = 90) -> dict[str, Any]:
    """The cluster policy's status, once it is for the current generation and ``check`` holds."""

    def ready() -> dict[str, Any] | None:
        obj = lab.get("cspp", CSPP)
        if not obj:
            return None
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        return status if check(status) else None

    return wait_for(what, ready, timeout)


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions", [])}


def test_cluster_policy_programs_overrides_refuses_and_hands_back(clab: SystemLab) -> None:
    lab = clab
    lab.kubectl("create", "namespace", NS)
    lab.kubectl("label", "namespace", NS, f"{SELECT_LABEL}=on")
    lab.kubectl("create", "namespace", OTHER)
    wait_for("default ServiceAccounts", lambda: lab.get("serviceaccount", "default", "-n", OTHER), 60)
    wait_for("default ServiceAccount", lambda: lab.get("serviceaccount", "default", "-n", NS), 60)
    headless = echo_service("hl", "echo", [("http", "TCP", 80)])
    headless["spec"]["clusterIP"] = "None"
    lab.apply(
        [
            echo_deployment("echo", 2),
            echo_service("web", "echo", [("http", "TCP", 80)]),
            echo_service("api", "echo", [("http", "TCP", 80)]),
            headless,
        ],
        NS,
    )
    lab.apply([echo_deployment("echo", 1), echo_service("other", "echo", [("http", "TCP", 80)])], OTHER)
    pods = lab.wait_ready_pods(NS, "app=echo", 2)
    lab.wait_ready_pods(OTHER, "app=echo", 1)

    # 1. The cluster policy takes the labelled namespace's Services, in iptables mode.
    select = {"namespaceSelector": {"matchLabels": {SELECT_LABEL: "on"}}, "mode": "iptables"}
    lab.apply([cluster_policy(select)], "default")
    status = wait_status(
        lab,
        lambda s: conditions(s).get("Programmed") == "True" and s["summary"]["selected"] == 3,
        "the cluster policy Programmed over web, api and hl",
    )
    assert status["summary"]["programmed"] == 2 and status["summary"]["notProxied"] == 1, status
    assert status["programmed"] == f"{len(NODES)}/{len(NODES)}"
    for svc in ("web", "api"):
        wait_for(f"{svc} labelled", lambda svc=svc: labels(lab, NS, svc).get(HANDOVER) == "svcproxy", 60)
        pvs = lab.get("pvs", svc, "-n", NS)
        assert pvs["spec"]["mode"] == "iptables"
        assert pvs["spec"]["policy"]["name"] == f"ClusterServiceProxyPolicy/{CSPP}"
    assert HANDOVER not in labels(lab, NS, "hl") and lab.get("pvs", "hl", "-n", NS) is None
    assert HANDOVER not in labels(lab, OTHER, "other") and lab.get("pvs", "other", "-n", OTHER) is None
    batches = lab.batch(lab.cluster_ip(NS, "api"), 80, 6, nodes=NODES)
    for node, b in batches.items():
        assert b.failed == 0 and set(b.counts) <= set(pods), (node, b)
        assert sum(b.counts.values()) == 6, (node, b)

    # 2. A namespaced policy beats the cluster policy for web, whatever the priority.
    lab.apply(
        [
            {
                "apiVersion": "svcproxy.io/v1alpha1",
                "kind": "ServiceProxyPolicy",
                "metadata": {"name": "web-userspace"},
                "spec": {"services": ["web"], "mode": "userspace", "priority": -1000},
            }
        ],
        NS,
    )
    lab.wait_programmed(NS, "web-userspace", timeout=90)
    pvs = lab.get("pvs", "web", "-n", NS)
    assert pvs["spec"]["mode"] == "userspace" and pvs["spec"]["policy"]["name"] == "web-userspace"
    status = wait_status(lab, lambda s: s["summary"]["overridden"] == 1, "web reported overridden")
    assert conditions(status)["Conflicted"] == "False"
    assert [(p["name"], p["state"]) for p in status["problems"]] == [("web", "Overridden")]
    batches = lab.batch(lab.cluster_ip(NS, "web"), 80, 6, nodes=NODES)
    assert all(b.failed == 0 and sum(b.counts.values()) == 6 for b in batches.values()), batches

    # 3. An invalid cluster policy is refused by the API server, naming the field.
    bad = cluster_policy({"mode": "iptables", "ipvs": {"scheduler": "rr"}})
    bad["metadata"]["name"] = "e2e-bad"
    proc = subprocess.run(
        [lab.kubectl_bin, "--kubeconfig", str(lab.cluster.admin_kubeconfig), "apply", "-f", "-"],
        input=json.dumps(bad),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "spec.ipvs" in proc.stderr, proc.stderr
    assert "iptables mode takes no scheduler" in proc.stderr
    assert lab.get("cspp", "e2e-bad") is None

    # 4. Labelling a namespace brings its Services under the cluster policy.
    lab.kubectl("label", "namespace", OTHER, f"{SELECT_LABEL}=on")
    wait_for("other labelled", lambda: labels(lab, OTHER, "other").get(HANDOVER) == "svcproxy", 90)
    wait_status(lab, lambda s: s["summary"]["namespaces"] == 2, "two namespaces in the summary")

    # 5. Deleting the cluster policy hands its Services back: label first, then the program.
    lab.kubectl("delete", "cspp", CSPP, "--wait=false")
    for namespace, svc in ((NS, "api"), (OTHER, "other")):
        wait_for(
            f"{namespace}/{svc} unlabelled",
            lambda namespace=namespace, svc=svc: HANDOVER not in labels(lab, namespace, svc),
            60,
        )
        wait_for(
            f"{namespace}/{svc}'s program deleted",
            lambda namespace=namespace, svc=svc: lab.get("pvs", svc, "-n", namespace) is None,
            60,
        )
    wait_for("the cluster policy gone (finalizer released)", lambda: lab.get("cspp", CSPP) is None, 60)
    # web stays with its namespaced policy.
    assert labels(lab, NS, "web").get(HANDOVER) == "svcproxy"
    assert lab.get("pvs", "web", "-n", NS)["spec"]["mode"] == "userspace"
