"""``svcproxy demo``: five Services in one namespace, each proxied its own way, on a real lab.

Brings up a lab (node-1 a network namespace without IPVS, node-2 and node-3
user-mode-linux guests with a real IPVS kernel when available), installs svcproxy
(CRDs and RBAC through the Helm chart; the operator and agents run as lab processes
from the working tree), deploys echo Pods (``echo``, and ``web`` with stable and
canary tracks), then applies five ServiceProxyPolicies at once, one per Service:
ipvs rr, ipvs sh with ClientIP affinity, ipvs wrr with canary weights 1:4,
iptables and userspace. When every policy is Programmed on every node, each of the
four client addresses behind every node (``network.client_addresses``) sends the
same number of new connections to every Service, by ClusterIP (the lab has no
CoreDNS). It prints a progress line per step with the elapsed seconds, the table of
Services and policies, a clients x Pods grid per Service with a verdict (see
``demoview.py``), and ``kubectl get spp,pvs,pn``; it writes
``demo-out/clients-x-pods.png`` and ``demo-out/demo.json``, and exits non-zero if a
request failed. Called by the CLI (``make demo``); checked by ``tests/e2e/test_demo.py``.
What it runs is ``demoplan.py``, the steps it shares with the kind demo ``demosteps.py``;
``--kind`` hands over to ``demokind.py`` (the same on the kind cluster, by DNS name).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from svcproxy_lab import network, traffic
from svcproxy_lab.cluster import Lab, LabError, uml_available
from svcproxy_lab.demoplan import PORT, SERVICES, TARGET_PORT
from svcproxy_lab.demosteps import (
    Clock,
    Kubectl,
    apply_policies,
    deploy,
    exit_status,
    outcome_for,
    say,
    show,
    wait_agents,
    wait_programmed,
)
from svcproxy_lab.demoview import Outcome

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
NODES = 3
REQUESTS = 18  # per client address per Service
# The lab kubelet's built-in echo server: answers with the Pod's name, /healthz for readiness.
ECHO = {
    "name": "echo", "image": "svcproxy.io/echo",
    "ports": [{"containerPort": TARGET_PORT, "protocol": "TCP"}],
    "readinessProbe": {"httpGet": {"path": "/healthz", "port": TARGET_PORT}, "periodSeconds": 1},
}


def install_chart(bin_dir: Path, kubeconfig: Path) -> None:
    """Install the chart: CRDs, ServiceAccounts, RBAC, the admission policy, metrics Services.

    The lab has no container runtime, so its Pods could not run the images: the lab runs the
    operator and the agents as processes from the working tree instead, and the chart's
    operator Deployment is scaled to 0 and its agent DaemonSet selects no node. That operator
    runs as the lab's admin, not the chart's operator ServiceAccount, so the admission policy
    that lets only that ServiceAccount write programs is left out here (the chart's own tests
    cover it, tests/e2e/test_chart_lab.py).
    """
    argv = [str(bin_dir / "helm"), "--kubeconfig", str(kubeconfig), "upgrade", "--install",
            "svcproxy", str(REPO / "charts" / "svcproxy"), "--namespace", "svcproxy-system",
            "--create-namespace", "--set", "operator.replicas=0",
            "--set", "operator.programRestriction.enabled=false",
            "--set", "agent.nodeSelector.svcproxy\\.io/lab-runs-agent-pods=never", "--wait"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"helm install failed: {proc.stderr.strip()}")
    say("installed the svcproxy chart into namespace svcproxy-system")


def client_name(node: int, source: str) -> str:
    return f"node-{node} .{source.rsplit('.', 1)[-1]}"


Answers = dict[str, list[str | None]]  # client address -> the Pod of each request (None: failed)


def send(node: int, vip: str, requests: int) -> tuple[Answers, list[str]]:
    """Every client address behind ``node`` sends ``requests`` new connections to ``vip``."""
    sources = network.client_addresses(node)
    try:
        return traffic.burst_from(node, vip, PORT, requests, sources=sources)
    except (traffic.TrafficError, subprocess.TimeoutExpired) as exc:
        return {s: [None] * requests for s in sources}, [str(exc)]


def record(o: Outcome, node: int, answers: Answers, errors: list[str]) -> None:
    o.errors += [f"node-{node}: {e}" for e in errors]
    for source in network.client_addresses(node):
        # a source the probe did not report failed whole
        o.add(client_name(node, source), answers.get(source, []))


def drive(outcomes: list[Outcome], vips: dict[str, str]) -> None:
    """Traffic to each Service in turn, from the three nodes at once."""
    nodes = range(1, NODES + 1)
    with ThreadPoolExecutor(NODES) as pool:
        for o in outcomes:
            results = list(pool.map(lambda n, o=o: send(n, vips[o.name], o.requests), nodes))
            for node, (answers, errors) in zip(nodes, results, strict=True):
                record(o, node, answers, errors)
            say(f"{o.name} ({vips[o.name]}): {o.answered()} answered, {o.failed} failed")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kind", action="store_true",
                        help="run on the kind cluster (`make kind-up`) instead of a lab: the "
                             "chart's own Pods, clients in Pods, requests by DNS name")
    parser.add_argument("--state-dir", type=Path,
                        default=Path.home() / ".cache" / "svcproxy" / "labs" / "demo",
                        help="the lab's state folder (not used with --kind)")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--requests", type=int,
                        help=f"new connections per client per Service (default {REQUESTS} per "
                             "client address on the lab, 30 per client Pod on kind)")
    parser.add_argument("--down", action="store_true",
                        help="tear the lab down at the end (with --kind: delete the demo's "
                             "namespace; the cluster stays)")


def prepare(args: argparse.Namespace) -> tuple[Lab, Path, Kubectl, dict[str, Any]]:
    lab = Lab(args.state_dir)
    ipvs_nodes = 2 if uml_available() else 0
    if not ipvs_nodes:
        say("user-mode-linux nodes are not available: every node runs without IPVS (fallback)")
    kubeconfig = lab.up(nodes=NODES, ipvs_nodes=ipvs_nodes, svcproxy=True, say=say)
    state = lab.load()
    if state is None:
        raise LabError(f"the lab in {args.state_dir} came up but wrote no state file")
    kubectl = Kubectl(Path(state["bin_dir"]), kubeconfig)
    install_chart(Path(state["bin_dir"]), kubeconfig)
    wait_agents(kubectl, NODES, "see the agent logs in the lab's logs folder")
    return lab, kubeconfig, kubectl, state


def run(args: argparse.Namespace) -> int:
    if args.kind:
        from svcproxy_lab import demokind

        return demokind.run(args)
    Clock.reset()
    requests = args.requests or REQUESTS
    try:
        lab, kubeconfig, kubectl, state = prepare(args)
        deploy(kubectl, NAMESPACE, ECHO)
        apply_policies(kubectl, NAMESPACE)
        rows = wait_programmed(kubectl, NAMESPACE)
        outcomes = [outcome_for(kubectl, NAMESPACE, s, rows[s.name], requests=requests) for s in SERVICES]
        vips = {s.name: kubectl("-n", NAMESPACE, "get", "svc", s.name, "-o",
                                "jsonpath={.spec.clusterIP}") for s in SERVICES}
        drive(outcomes, vips)
        how = (f"{len(outcomes[0].grid)} clients ({network.CLIENT_SOURCES} source addresses "
               f"behind each of {NODES} nodes), {requests} new connections each per Service, "
               "by ClusterIP (the lab has no CoreDNS, so no DNS names)")
        ipvs_nodes = [f"node-{n['index']}" for n in state["nodes"] if n["kind"] == "uml"]
        show(outcomes, kubectl, args.out, namespace=NAMESPACE, how=how,
             summary={"via": "ClusterIP", "nodes": NODES, "ipvs_nodes": ipvs_nodes})
    except LabError as exc:
        say(f"demo failed: {exc}")
        return 1
    say(f"done in {Clock.elapsed():.0f} s")
    print("\nlook around:")
    print(f"  export KUBECONFIG={kubeconfig}")
    print(f"  {state['bin_dir']}/kubectl -n {NAMESPACE} describe spp echo-sticky")
    cli = Path(sys.executable).parent / "svcproxy"
    print(f"  {cli} lab exec --state-dir {args.state_dir} node-2 -- ipvsadm -Ln")
    print(f"tear down: {cli} lab down --state-dir {args.state_dir}")
    if args.down:
        lab.down(say)
    return exit_status(outcomes)
