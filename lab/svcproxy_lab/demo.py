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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.compile.program import endpoint_weight
from svcproxy_lab import demoview, network, traffic
from svcproxy_lab.cluster import Lab, LabError, uml_available
from svcproxy_lab.demoview import Outcome

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
PORT = 80
NODES = 3


class Clock:
    """Seconds since the demo started, for the progress lines."""

    start = time.monotonic()

    @classmethod
    def reset(cls) -> None:
        cls.start = time.monotonic()

    @classmethod
    def elapsed(cls) -> float:
        return time.monotonic() - cls.start


@dataclass(frozen=True)
class DemoService:
    """One Service of the demo and the policy that proxies it."""

    name: str
    app: str  # the Pods it selects: app=<app>
    title: str
    spec: dict[str, Any]  # the policy's spec, without the Service it names
    expect: str  # what the grid should show, see demoview.verdict


CANARY_WEIGHTS = [
    {"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 1},
    {"podSelector": {"matchLabels": {"track": "stable"}}, "weight": 4},
]
SERVICES: tuple[DemoService, ...] = (
    DemoService("echo-rr", "echo", "ipvs rr", {"mode": "ipvs", "ipvs": {"scheduler": "rr"}}, "even"),
    DemoService(
        "echo-sticky", "echo", "ipvs sh + ClientIP",
        {"mode": "ipvs", "ipvs": {"scheduler": "sh"},
         "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600}},
        "pinned",
    ),
    DemoService("web-canary", "web", "ipvs wrr canary 1:4",
                {"mode": "ipvs", "ipvs": {"scheduler": "wrr"}, "weights": CANARY_WEIGHTS},
                "weighted"),
    DemoService("echo-iptables", "echo", "iptables", {"mode": "iptables"}, "random"),
    DemoService("echo-userspace", "echo", "userspace rr",
                {"mode": "userspace", "ipvs": {"scheduler": "rr"}}, "even"),
)
# (Deployment, Pod labels, replicas): three echo Pods, and web's two stable Pods and one canary.
DEPLOYMENTS = (
    ("echo", {"app": "echo"}, 3),
    ("web-stable", {"app": "web", "track": "stable"}, 2),
    ("web-canary", {"app": "web", "track": "canary"}, 1),
)


def say(msg: str) -> None:
    print(f"[demo {Clock.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


class Kubectl:
    def __init__(self, bin_dir: Path, kubeconfig: Path) -> None:
        self.argv = [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run([*self.argv, *args], input=input, capture_output=True, text=True,
                              check=False)
        if check and proc.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))


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


def wait_agents(kubectl: Kubectl, nodes: int, timeout: float = 120) -> None:
    """Every node's agent has reported (its ProxyNode exists and is Ready)."""
    deadline = time.monotonic() + timeout
    ready: list[str] = []
    while time.monotonic() < deadline:
        ready = [
            pn["metadata"]["name"]
            for pn in kubectl.json("get", "pn")["items"]
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (pn.get("status") or {}).get("conditions", []))
        ]
        if len(ready) >= nodes:
            say(f"agents report from {', '.join(sorted(ready))}")
            return
        time.sleep(0.5)
    raise LabError(f"only {ready} of {nodes} agents reported after {timeout:.0f} s; "
                   "see the agent logs in the lab's logs folder")


def _deployment(name: str, labels: dict[str, str], replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "echo", "image": "svcproxy.io/echo",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                       "periodSeconds": 1},
                }]},
            },
        },
    }


def deploy(kubectl: Kubectl) -> None:
    """The Deployments and one Service per DemoService, all in namespace ``demo``."""
    manifests: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}]
    manifests += [_deployment(*d) for d in DEPLOYMENTS]
    manifests += [{
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": NAMESPACE, "labels": {"app": s.app}},
        "spec": {"selector": {"app": s.app},
                 "ports": [{"name": "tcp", "port": PORT, "targetPort": 8080, "protocol": "TCP"}]},
    } for s in SERVICES]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
    for name, _, _ in DEPLOYMENTS:
        kubectl("-n", NAMESPACE, "rollout", "status", f"deployment/{name}", "--timeout=180s")
    pods = sum(r for _, _, r in DEPLOYMENTS)
    say(f"{pods} echo Pods Ready behind {len(SERVICES)} Services in namespace {NAMESPACE}")


def policy_manifest(s: DemoService) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": s.name, "namespace": NAMESPACE},
            "spec": {"services": [s.name], **s.spec}}


def apply_policies(kubectl: Kubectl) -> None:
    """All five policies in one apply; policies of an earlier demo in the namespace go."""
    mine = {s.name for s in SERVICES}
    old = kubectl.json("-n", NAMESPACE, "get", "spp")["items"]
    stale = [p["metadata"]["name"] for p in old if p["metadata"]["name"] not in mine]
    if stale:
        kubectl("-n", NAMESPACE, "delete", "spp", *stale)
        say(f"deleted policies of an earlier demo: {', '.join(stale)}")
    # Server-side apply with one field manager: a rerun states each whole spec again.
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=svcproxy-demo",
            "-f", "-", input=yaml.safe_dump_all([policy_manifest(s) for s in SERVICES]))
    say(f"applied {len(SERVICES)} policies at once: " + "; ".join(
        f"{s.name}: {s.title}" for s in SERVICES))


def _programmed(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The table row of a policy that is Programmed on every node for this generation."""
    gen = obj["metadata"]["generation"]
    status = obj.get("status") or {}
    cond = {c["type"]: c for c in status.get("conditions", [])}.get("Programmed", {})
    services = status.get("services") or []
    if (status.get("observedGeneration") != gen or cond.get("status") != "True"
            or cond.get("observedGeneration", gen) != gen or not services):
        return None
    row = services[0]
    if row.get("state") != "Programmed" or row.get("nodesProgrammed") != row.get("nodesTotal"):
        return None
    spec = obj["spec"]
    affinity = spec.get("sessionAffinity") or {}
    return {
        "mode": row.get("mode") or spec.get("mode"),
        "scheduler": "-" if spec.get("mode") == "iptables" else (spec.get("ipvs") or {}).get(
            "scheduler", "rr"),
        "affinity": (f"ClientIP {affinity.get('timeoutSeconds')}s"
                     if affinity.get("type") == "ClientIP" else "None"),
        "programmed": f"{row.get('nodesProgrammed')}/{row.get('nodesTotal')}",
        "nodes_programmed": row.get("nodesProgrammed"), "nodes_total": row.get("nodesTotal"),
        "cluster_ip": row.get("clusterIP"),
    }


def wait_programmed(kubectl: Kubectl, timeout: float = 180) -> dict[str, dict[str, Any]]:
    """Each policy's table row once every policy is Programmed on every node."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for obj in kubectl.json("-n", NAMESPACE, "get", "spp")["items"]:
            name = obj["metadata"]["name"]
            row = _programmed(obj)
            if row is not None and name not in rows:
                say(f"policy {name} ({row['mode']}) Programmed on {row['programmed']} nodes")
            if row is not None:
                rows[name] = row
        if all(s.name in rows for s in SERVICES):
            return rows
        time.sleep(0.5)
    waiting = [s.name for s in SERVICES if s.name not in rows]
    raise LabError(f"policies {', '.join(waiting)} not Programmed on every node after "
                   f"{timeout:.0f} s: see `kubectl -n {NAMESPACE} describe spp` and the agent logs")


def outcome_for(kubectl: Kubectl, s: DemoService, status: dict[str, Any], requests: int) -> Outcome:
    """An empty Outcome: the Service's Pods, their weights under its policy, its status."""
    items = kubectl.json("-n", NAMESPACE, "get", "pods", "-l", f"app={s.app}")["items"]
    labels = {p["metadata"]["name"]: p["metadata"].get("labels") or {} for p in items}
    policy = ServiceProxyPolicy.model_validate(policy_manifest(s))
    weights = {pod: endpoint_weight(policy, lab) for pod, lab in labels.items()}
    return Outcome(name=s.name, title=s.title, expect=s.expect, pods=sorted(labels),
                   weights=weights, requests=requests, status=status)


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
        row = o.grid.setdefault(client_name(node, source), Counter())
        got = answers.get(source, [])
        o.failed += o.requests - len(got)  # a source the probe did not report failed whole
        for pod in got:
            if pod is None:
                o.failed += 1
            else:
                row[pod] += 1


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
    parser.add_argument("--state-dir", type=Path,
                        default=Path.home() / ".cache" / "svcproxy" / "labs" / "demo")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--requests", type=int, default=18,
                        help="new connections per client address per Service (default 18)")
    parser.add_argument("--down", action="store_true", help="tear the lab down at the end")


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
    wait_agents(kubectl, NODES)
    return lab, kubeconfig, kubectl, state


def show(outcomes: list[Outcome], kubectl: Kubectl, out: Path, state: dict[str, Any]) -> None:
    clients = len(outcomes[0].grid)
    print(f"\n{len(outcomes)} Services in namespace {NAMESPACE}, each with its own policy:\n")
    print(demoview.table(outcomes))
    print(f"\n{clients} clients ({network.CLIENT_SOURCES} source addresses behind each of "
          f"{NODES} nodes), {outcomes[0].requests} new connections each per Service, "
          "by ClusterIP (the lab has no CoreDNS, so no DNS names):")
    for o in outcomes:
        print()
        print(demoview.grid(o))
    demoview.plot(outcomes, out / "clients-x-pods.png")
    ipvs_nodes = [f"node-{n['index']}" for n in state["nodes"] if n["kind"] == "uml"]
    summary = {"namespace": NAMESPACE, "via": "ClusterIP", "nodes": NODES, "ipvs_nodes": ipvs_nodes,
               "elapsed_s": round(Clock.elapsed(), 1),
               "services": [o.to_json() for o in outcomes]}
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\npictures: {out / 'clients-x-pods.png'}; numbers: {out / 'demo.json'}")
    print(f"\n$ kubectl -n {NAMESPACE} get spp,pvs,pn")
    print(kubectl("-n", NAMESPACE, "get", "spp,pvs,pn").rstrip())


def run(args: argparse.Namespace) -> int:
    Clock.reset()
    try:
        lab, kubeconfig, kubectl, state = prepare(args)
        deploy(kubectl)
        apply_policies(kubectl)
        rows = wait_programmed(kubectl)
        outcomes = [outcome_for(kubectl, s, rows[s.name], args.requests) for s in SERVICES]
        vips = {s.name: kubectl("-n", NAMESPACE, "get", "svc", s.name, "-o",
                                "jsonpath={.spec.clusterIP}") for s in SERVICES}
        drive(outcomes, vips)
        show(outcomes, kubectl, args.out, state)
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
    for o in outcomes:
        for err in o.errors[:3]:
            say(f"failed request ({o.name}): {err}")
    return 1 if any(o.failed for o in outcomes) else 0
