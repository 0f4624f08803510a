"""Nodes coming and going, end to end (issue #18): a Node that leaves takes its ProxyNode
and its count with it; a new machine of that name that joins gets every program.

A lab of its own (``system_helpers.system_lab``: 3 netns nodes, the operator and the
agents the lab starts, the real kube-controller-manager with its garbage collector and
PodGC) with two echo Deployments: ``web`` (one Pod on every node) behind Service ``web``
(TCP 80), and ``pinned`` (2 Pods kept off node-3) behind ``api`` (TCP 8080) and ``dgram``
(UDP 80), whose programs do not change when node-3 leaves: node-3's last report still
shows them at their current hash, a report that would count if reports were counted.
One policy runs the three Services in iptables mode. In order:

1. Programmed 3/3. While steady TCP traffic runs from node-1's and node-2's client
   namespaces, node-3 leaves: its agent and kubelet stop (``Lab.stop_node``) and its
   Node is deleted. A finalizer the test put on node-3's ProxyNode holds the report
   after the garbage collector deleted it, so the count is checked while the stale
   report still exists: Programmed 2/2, every Service 2 of 2 nodes. Released, the
   ProxyNode is gone. PodGC removes node-3's web Pod, the Deployment replaces it, the
   programs follow; no request from the staying nodes failed, and every Service answers.
2. node-3's machine is wiped (Pods, kernel state, kubelet state) and a new one of that
   name joins: its kubelet registers the Node again (a new uid). Before its agent runs,
   the policy counts the Ready Node that does not report: 2/3, "no agent report from
   node-3". Its agent starts with an empty kernel; its new ProxyNode, owned by the new
   Node, reports every program at its content hash, the policy is Programmed 3/3, and
   every Service answers from node-3's client namespace too. How long the node took
   (Node Ready, agent start, every program applied) is printed (``-s``), not asserted:
   speed belongs in benchmarks/.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from system_helpers import NODES, Batch, SystemLab, echo_deployment, echo_service, system_lab, wait_for
from waiting import wait_until

from svcproxy_lab.kubeapi import KubeApi

pytestmark = [pytest.mark.lab, pytest.mark.root]

STATE = Path(os.environ.get("SVCPROXY_E2E_NODES_STATE_DIR", "/tmp/svcproxy-e2e-nodes"))
NS = "nodes"
POLICY = "p"
LEAVING = "node-3"
STAYING = ("node-1", "node-2")
# Service -> (its Deployment, protocol, port).
SERVICES = {"web": ("web", "TCP", 80), "api": ("pinned", "TCP", 8080), "dgram": ("pinned", "UDP", 80)}
REPLICAS = {"web": 3, "pinned": 2}
HOLD = "e2e.svcproxy.io/hold"
API = "/apis/svcproxy.io/v1alpha1"


@pytest.fixture(scope="module")
def nlab(lab_slot: None) -> Iterator[SystemLab]:
    with system_lab(STATE, NODES, up_args=()) as lab:
        lab.kubectl("create", "namespace", NS)
        wait_for("the default ServiceAccount",
                 lambda: lab.get("serviceaccount", "default", "-n", NS))
        web = echo_deployment("web", REPLICAS["web"])
        # One Pod per node, so that the leaving node takes one with it.
        web["spec"]["template"]["spec"]["topologySpreadConstraints"] = [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}},
        }]
        pinned = echo_deployment("pinned", REPLICAS["pinned"])
        pinned["spec"]["template"]["spec"]["affinity"] = {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{
                "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn",
                                      "values": [LEAVING]}]}]}}}
        services = [echo_service(name, app, [(name, proto, port)], labels={"e2e": "nodes"})
                    for name, (app, proto, port) in SERVICES.items()]
        lab.apply([web, pinned, *services], NS)
        for app, count in REPLICAS.items():
            lab.wait_ready_pods(NS, f"app={app}", count)
        lab.apply_policy(NS, POLICY, {"serviceSelector": {"matchLabels": {"e2e": "nodes"}},
                                      "mode": "iptables"})
        yield lab


def pods_on(lab: SystemLab, node: str) -> list[str]:
    items = (lab.get("pods", "-n", NS, "--field-selector", f"spec.nodeName={node}") or {})
    return [p["metadata"]["name"] for p in items.get("items") or []]


def node_uid(lab: SystemLab, node: str) -> str | None:
    obj = lab.get("node", node)
    return str(obj["metadata"]["uid"]) if obj else None


def wait_count(lab: SystemLab, done: int, total: int, *, programmed: bool,
               timeout: float = 60) -> dict[str, Any]:
    """The policy's status for its generation once it says ``done/total`` nodes, overall
    and for every Service, with ``Programmed`` as asked; returns the status."""
    seen: list[Any] = [None]  # the last status, for the failure message

    def check() -> dict[str, Any] | None:
        obj = lab.get("spp", POLICY, "-n", NS)
        status = (obj or {}).get("status") or {}
        if not obj or status.get("observedGeneration") != obj["metadata"]["generation"]:
            return None
        cond = {c["type"]: c for c in status.get("conditions") or []}.get("Programmed") or {}
        rows = status.get("services") or []
        seen[0] = (status.get("programmed"), cond.get("status"), cond.get("message"),
                   [(r["name"], f"{r.get('nodesProgrammed')}/{r.get('nodesTotal')}") for r in rows])
        if (status.get("programmed") == f"{done}/{total}"
                and cond.get("status") == ("True" if programmed else "False")
                and sorted(r["name"] for r in rows) == sorted(SERVICES)
                and all(r.get("nodesTotal") == total and r.get("nodesProgrammed") == done
                        for r in rows)):
            return status
        return None
    try:
        return wait_for(f"policy {NS}/{POLICY} at {done}/{total} nodes, Programmed={programmed}",
                        check, timeout)
    except pytest.fail.Exception:
        pytest.fail(f"policy {NS}/{POLICY} not at {done}/{total} nodes with Programmed={programmed}"
                    f" after {timeout:.0f} s; last (programmed, Programmed, message, rows): {seen[0]}")


def settle(lab: SystemLab, nodes: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """Every Deployment's Ready Pods (app -> name -> IP) and every Service's program with
    exactly its Pods, applied on ``nodes``."""
    pods = {app: lab.wait_ready_pods(NS, f"app={app}", count) for app, count in REPLICAS.items()}
    for name, (app, _, _) in SERVICES.items():
        lab.wait_applied(NS, name, set(pods[app].values()), timeout=90, nodes=nodes)
    return pods


def every_service_answers(lab: SystemLab, nodes: tuple[str, ...],
                          pods: dict[str, dict[str, str]]) -> None:
    """6 requests to every Service from each of ``nodes``: all answered, by its Pods only."""
    for name, (app, proto, port) in SERVICES.items():
        vip = lab.cluster_ip(NS, name)
        for node, got in lab.batch(vip, port, 6, proto=proto.lower(), nodes=nodes).items():
            assert got.failed == 0, f"{name} ({proto} {vip}:{port}) from {node}: {got.errors}"
            assert set(got.counts) <= set(pods[app]), f"{name} from {node}: {got.counts} not of {pods[app]}"


def no_failures(results: dict[str, Batch]) -> None:
    sent = ", ".join(f"{n} {b.sent}/{b.failed}" for n, b in sorted(results.items()))
    print(f"\nNODE LEAVE {LEAVING}: steady traffic sent/failed per node: {sent}")
    assert set(results) == set(STAYING), f"a client did not report: {sorted(results)}"
    for node, got in sorted(results.items()):
        assert got.sent and not got.failed, (
            f"{node}: {got.failed}/{got.sent} requests failed while {LEAVING} left: {got.errors}; "
            f"answers before each failure: {got.around_failures()}")


def every_program_applied(api: KubeApi, node: str) -> dict[str, str] | None:
    """Every program in the cluster at its content hash in ``node``'s report, or None."""
    want = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["spec"]["contentHash"]
            for p in api.get(f"{API}/proxyvirtualservers")["items"]}
    report = api.get_or_none(f"{API}/proxynodes/{node}") or {}
    applied = (report.get("status") or {}).get("applied") or {}
    return want if want and all(applied.get(k) == v for k, v in want.items()) else None


def test_a_node_leaves_and_a_new_one_of_that_name_joins(nlab: SystemLab) -> None:
    lab, cluster = nlab, nlab.cluster
    lab.wait_programmed(NS, POLICY)
    settle(lab, NODES)
    wait_count(lab, 3, 3, programmed=True)
    assert pods_on(lab, LEAVING), f"no web Pod on {LEAVING}: the spread constraint did not hold"
    pinned = lab.get("pvs", "api", "-n", NS)["spec"]["contentHash"]
    old_uid = node_uid(lab, LEAVING)
    web = lab.cluster_ip(NS, "web")

    # --- node-3 leaves ---------------------------------------------------------------
    with lab.steady_traffic(web, 80, nodes=STAYING) as results:
        cluster.stop_node(LEAVING)
        lab.kubectl("patch", "proxynode", LEAVING, "--type=merge",
                    "-p", json.dumps({"metadata": {"finalizers": [HOLD]}}))
        try:
            lab.kubectl("delete", "node", LEAVING)
            held = wait_for(f"the garbage collector to delete {LEAVING}'s ProxyNode",
                            lambda: (o := lab.get("proxynode", LEAVING))
                            and o["metadata"].get("deletionTimestamp") and o, 120)
            # The report of a Node that is gone is still there, and does not count.
            status = wait_count(lab, 2, 2, programmed=True)
            assert "on 2/2 nodes" in {c["type"]: c for c in status["conditions"]}[
                "Programmed"]["message"], status
            # ... though it shows api at its current hash: counted, it would say 3 of 2.
            assert (held.get("status") or {}).get("applied", {}).get(f"{NS}/api") == pinned, held
            assert lab.get("pvs", "api", "-n", NS)["spec"]["contentHash"] == pinned
        finally:
            lab.kubectl("patch", "proxynode", LEAVING, "--type=json", "-p",
                        json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]), check=False)
        wait_for(f"{LEAVING}'s ProxyNode gone", lambda: lab.get("proxynode", LEAVING) is None)
        wait_for(f"PodGC to delete the Pods bound to {LEAVING}",
                 lambda: not pods_on(lab, LEAVING), timeout=180)
        pods = settle(lab, STAYING)
    no_failures(results)
    wait_count(lab, 2, 2, programmed=True)  # and it stays so: no stale 3 after the churn
    every_service_answers(lab, STAYING, pods)

    # --- a new machine of that name joins ----------------------------------------------
    cluster.stop_node(LEAVING, wipe=True)
    started = time.monotonic()
    cluster.start_node(LEAVING, agent=False)
    ready = time.monotonic()
    new_uid = node_uid(lab, LEAVING)
    assert new_uid not in (None, old_uid), f"{LEAVING} not registered again: uid {new_uid}"
    # Count Nodes, not reports: a Ready Node whose agent has not reported holds it at 2/3.
    status = wait_count(lab, 2, 3, programmed=False)
    message = {c["type"]: c for c in status["conditions"]}["Programmed"]["message"]
    assert f"no agent report from {LEAVING}" in message, status
    held_back = time.monotonic()
    cluster.start_agent(LEAVING)
    api = KubeApi(cluster.admin_kubeconfig)
    want = wait_until(f"every program applied on {LEAVING}",
                      lambda: every_program_applied(api, LEAVING), timeout=120, interval=0.05)
    applied = time.monotonic()
    print(f"\nNODE JOIN {LEAVING}: kubelet start -> Node Ready {ready - started:.2f} s; "
          f"Node Ready -> agent start {held_back - ready:.2f} s (held back for the 2/3 check); "
          f"agent start -> all {len(want)} programs applied {applied - held_back:.2f} s; "
          f"Node Ready -> all applied {applied - ready:.2f} s")
    report = lab.get("proxynode", LEAVING)
    assert report["metadata"].get("ownerReferences") == [
        {"apiVersion": "v1", "kind": "Node", "name": LEAVING, "uid": new_uid}], report["metadata"]
    assert report["status"]["applied"] == want, "the new node reports programs that are not there"
    wait_count(lab, 3, 3, programmed=True)
    every_service_answers(lab, NODES, {app: lab.ready_pods(NS, f"app={app}") for app in REPLICAS})
