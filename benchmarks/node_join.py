"""Node join: a new node's Node Ready -> every program applied on it, by number of Services; JSON.

Issue #18 asks that a node added gets every program within the figure measured for one
change. A fresh 3-node netns lab with svcproxy (operator and agents as ``svcproxy lab up``
starts them) gets one echo Deployment (``--pods`` Pods, kept off the joining node so that
its leaving changes no endpoint) behind N Services that one iptables-mode policy selects.
Real Pods, not the other benchmarks' selectorless Services: the agent refuses real servers
outside every Node's Pod CIDR. Then, ``--rounds`` times per size: the node leaves
(``Lab.stop_node`` with ``wipe``: its Pods, kernel state and kubelet state go; its Node is
deleted and its ProxyNode collected) and a new machine of that name joins
(``Lab.start_node``: kubelet, Node Ready, then the agent, as a DaemonSet would). Measured
per round, polling the API (ProxyNode every ``--poll`` s, the policy every 4 x that):

* ``kubelet_to_ready_s``: kubelet start -> the Node Ready (the lab's own kubelet);
* ``ready_to_applied_s``: Node Ready -> every program at its contentHash in the node's
  new ProxyNode (agent start, lists, first full sync, the first report: the figure);
* ``ready_to_programmed_s``: Node Ready -> the policy Programmed N/N again (the operator
  folded the report in);
* ``gc_s``: Node deleted -> its ProxyNode gone (the garbage collector).

Run as root from the repository root, holding the lab turn:

    flock /run/svcproxy-lab-turn.lock .venv/bin/python -m benchmarks.node_join \\
        --sizes 100,1000 --rounds 5 --out benchmarks/results/node_join.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchmarks._lab import harness
from benchmarks._lab.harness import NAMESPACE, POLICY_PATH, SVC_PATH, BenchLab, say
from benchmarks._report import emit, provenance
from svcproxy_lab.kubeapi import ApiError, KubeApi
from svcproxy_lab.stats import summary

API = "/apis/svcproxy.io/v1alpha1"
APP = "join-echo"
POLICY = "join"
JOINING = "node-3"
FIGURES = ("kubelet_to_ready_s", "ready_to_applied_s", "ready_to_programmed_s", "gc_s")


def deployment(pods: int, avoid: str) -> dict[str, Any]:
    """The echo Pods, never on ``avoid`` (its leaving must change no endpoint)."""
    away = {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [avoid]}]}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": APP},
            "spec": {"replicas": pods, "selector": {"matchLabels": {"app": APP}},
                     "template": {"metadata": {"labels": {"app": APP}},
                                  "spec": {"affinity": {"nodeAffinity": {
                                      "requiredDuringSchedulingIgnoredDuringExecution": away}},
                                      "containers": [{"name": "echo", "image": "svcproxy.io/echo",
                                                      "ports": [{"containerPort": 80}]}]}}}}


def service(i: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "labels": {harness.MEMBER_LABEL: "true"}},
            "spec": {"selector": {"app": APP}, "ports": [{"port": 80, "targetPort": 80}]}}


def missing(want: Mapping[str, str], report: Mapping[str, Any] | None) -> int:
    """How many of ``want`` (owner -> contentHash) the report does not show applied."""
    applied = ((report or {}).get("status") or {}).get("applied") or {}
    return sum(1 for owner, digest in want.items() if applied.get(owner) != digest)


def programmed(policy: Mapping[str, Any] | None, count: str) -> bool:
    """The policy's status for its generation says ``count`` nodes and Programmed=True."""
    meta, status = (policy or {}).get("metadata") or {}, (policy or {}).get("status") or {}
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return (status.get("observedGeneration") == meta.get("generation")
            and status.get("programmed") == count and conds.get("Programmed") == "True")


def wait(what: str, check: Callable[[], bool], timeout: float, poll: float) -> float:
    """Seconds until ``check()`` holds; RuntimeError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - start


def settle(api: KubeApi, n: int, pods: int, nodes: int, timeout: float) -> dict[str, str]:
    """Every Service's program with all Pods, Programmed on ``nodes``: owner -> contentHash."""
    def ready() -> bool:
        try:
            items = api.get(f"{API}/namespaces/{NAMESPACE}/proxyvirtualservers")["items"]
        except ApiError as exc:
            if exc.status not in (404, 429):  # the CRDs are served a moment after they are applied
                raise
            return False
        full = [p for p in items
                if sum(len(vs["realServers"]) for vs in p["spec"]["virtualServers"]) == pods]
        return len(full) == n and programmed(api.get_or_none(f"{POLICY_PATH}/{POLICY}"),
                                             f"{nodes}/{nodes}")
    took = wait(f"{n} programs with {pods} real servers each, Programmed {nodes}/{nodes}",
                ready, timeout, 1.0)
    say(f"{n} Services programmed on {nodes} nodes after {took:.1f} s")
    items = api.get(f"{API}/namespaces/{NAMESPACE}/proxyvirtualservers")["items"]
    return {f"{NAMESPACE}/{p['metadata']['name']}": p["spec"]["contentHash"] for p in items}


def one_round(bench: BenchLab, want: Mapping[str, str], args: argparse.Namespace) -> dict[str, float]:
    lab, api = bench.lab, bench._api()
    lab.stop_node(JOINING, wipe=True, say=say)
    api.delete(f"/api/v1/nodes/{JOINING}")
    gone = wait(f"{JOINING}'s ProxyNode collected",
                lambda: api.get_or_none(f"{API}/proxynodes/{JOINING}") is None, args.timeout, args.poll)
    wait("the policy at 2/2", lambda: programmed(api.get_or_none(f"{POLICY_PATH}/{POLICY}"), "2/2"),
         args.timeout, args.poll * 4)
    start = time.monotonic()
    lab.start_node(JOINING, agent=False, say=say)
    ready = time.monotonic()
    lab.start_agent(JOINING, say=say)
    wait(f"every program applied on {JOINING}",
         lambda: not missing(want, api.get_or_none(f"{API}/proxynodes/{JOINING}")), args.timeout, args.poll)
    applied = time.monotonic()
    wait("the policy at 3/3", lambda: programmed(api.get_or_none(f"{POLICY_PATH}/{POLICY}"), "3/3"),
         args.timeout, args.poll * 4)
    return {"kubelet_to_ready_s": round(ready - start, 3), "ready_to_applied_s": round(applied - ready, 3),
            "ready_to_programmed_s": round(time.monotonic() - ready, 3), "gc_s": round(gone, 3)}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with BenchLab(Path(args.state_dir)) as bench:
        api = bench.up()
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": NAMESPACE}})
        api.create(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
                   deployment(args.pods, JOINING))
        bench.start_svcproxy()
        written = 0
        for n in sorted(int(k) for k in args.sizes.split(",")):
            for i in range(written, n):
                api.create(SVC_PATH, service(i))
            written = n
            if api.get_or_none(f"{POLICY_PATH}/{POLICY}") is None:
                _create_policy(api)
            want = settle(api, n, args.pods, 3, args.timeout * 3)
            rounds = []
            for r in range(args.rounds):
                figures = one_round(bench, want, args)
                say(f"{n} Services, round {r + 1}/{args.rounds}: {figures}")
                rounds.append(figures)
            out.append({"services": n, "rounds": rounds,
                        **{k: summary([r[k] for r in rounds]) for k in FIGURES}})
    return out


def _create_policy(api: KubeApi) -> None:
    body = harness.policy_body(POLICY)
    deadline = time.monotonic() + 30
    while True:  # the CRDs are served a moment after the operator starts
        try:
            api.create(POLICY_PATH, body)
            return
        except ApiError as exc:
            if exc.status not in (404, 429) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100", help="numbers of Services, comma-separated")
    parser.add_argument("--rounds", type=int, default=5, help="joins per size")
    parser.add_argument("--pods", type=int, default=4, help="echo Pods (real servers per Service)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between ProxyNode reads")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for each wait")
    parser.add_argument("--state-dir", default=str(harness.DEFAULT_STATE))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    report = {"benchmark": "node_join", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "provenance": provenance(), "mode": "iptables (netns nodes)", "node": JOINING,
              "pods": args.pods, "poll_s": args.poll, "sizes": run(args)}
    return emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
