"""``svcproxy demo``: the two-minute tour, on a real local lab.

Brings up a lab (2 nodes with a real IPVS kernel when user-mode-linux is
available, 1 without), installs svcproxy (CRDs and RBAC through the Helm chart;
the operator and agents run as lab processes from the working tree), deploys
an echo Deployment behind a Service, then applies a sequence of policies and
sends real traffic from the client namespace of every node for each step. It
prints requests per Pod per step, writes ``demo-out/distribution.png`` and
exits non-zero if any request of any step failed. Called by the CLI
(``make demo``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from svcproxy_lab import traffic
from svcproxy_lab.cluster import Lab, LabError, uml_available

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "demo"
SERVICE = "echo"
PORT = 80


@dataclass(frozen=True)
class Step:
    title: str
    spec: dict[str, Any]


STEPS: tuple[Step, ...] = (
    Step("ipvs rr", {"mode": "ipvs", "ipvs": {"scheduler": "rr"}}),
    Step("ipvs lc", {"mode": "ipvs", "ipvs": {"scheduler": "lc"}}),
    Step(
        "ipvs sh + ClientIP",
        {"mode": "ipvs", "ipvs": {"scheduler": "sh"},
         "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600}},
    ),
    Step("iptables", {"mode": "iptables"}),
    Step("userspace rr", {"mode": "userspace", "ipvs": {"scheduler": "rr"}}),
)


@dataclass
class StepResult:
    step: Step
    per_pod: Counter[str] = field(default_factory=Counter)
    per_node: dict[str, Counter[str]] = field(default_factory=dict)
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    operator Deployment is scaled to 0 and its agent DaemonSet selects no node.
    """
    argv = [str(bin_dir / "helm"), "--kubeconfig", str(kubeconfig), "upgrade", "--install",
            "svcproxy", str(REPO / "charts" / "svcproxy"), "--namespace", "svcproxy-system",
            "--create-namespace", "--set", "operator.replicas=0",
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


def deploy_echo(kubectl: Kubectl, replicas: int = 3) -> None:
    manifests = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": SERVICE}},
                "template": {
                    "metadata": {"labels": {"app": SERVICE}},
                    "spec": {"containers": [{
                        "name": "echo", "image": "svcproxy.io/echo",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080},
                                           "periodSeconds": 1},
                    }]},
                },
            },
        },
        {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": SERVICE, "namespace": NAMESPACE, "labels": {"app": SERVICE}},
            "spec": {"selector": {"app": SERVICE},
                     "ports": [{"name": "tcp", "port": PORT, "targetPort": 8080, "protocol": "TCP"}]},
        },
    ]
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
    kubectl("-n", NAMESPACE, "rollout", "status", f"deployment/{SERVICE}", "--timeout=120s")
    say(f"{replicas} echo Pods Ready behind Service {NAMESPACE}/{SERVICE}")


def apply_policy(kubectl: Kubectl, step: Step, timeout: float = 120) -> None:
    policy = {
        "apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
        "metadata": {"name": "demo", "namespace": NAMESPACE},
        "spec": {"services": [SERVICE], **step.spec},
    }
    # replace, not apply: each step states the whole spec, fields of the last step must go.
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=svcproxy-demo",
            "-f", "-", input=yaml.safe_dump(policy))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        obj = kubectl.json("-n", NAMESPACE, "get", "spp", "demo")
        status = obj.get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions", [])}
        programmed = conds.get("Programmed", {})
        if (status.get("observedGeneration") == obj["metadata"]["generation"]
                and programmed.get("status") == "True"
                and programmed.get("observedGeneration", obj["metadata"]["generation"])
                == obj["metadata"]["generation"]):
            say(f"policy '{step.title}' Programmed on {status.get('programmed')} nodes")
            return
        last = programmed.get("message", "")
        time.sleep(0.5)
    raise LabError(f"policy '{step.title}' not Programmed after {timeout:.0f} s: {last}")


def send(node: int, vip: str, count: int, result: StepResult) -> None:
    name = f"node-{node}"
    counts = result.per_node.setdefault(name, Counter())
    try:
        answers, errors = traffic.burst(node, vip, PORT, count)
    except (traffic.TrafficError, subprocess.TimeoutExpired) as exc:
        result.failed += count
        result.errors.append(f"{name}: {exc}")
        return
    result.errors += [f"{name}: {e}" for e in errors]
    for pod in answers:
        if pod is None:
            result.failed += 1
            continue
        counts[pod] += 1
        result.per_pod[pod] += 1


def print_table(results: list[StepResult], pods: list[str]) -> None:
    width = max([len(p) for p in pods] + [10])
    head = f"{'step':<22}" + "".join(f"{p[-width:]:>{width + 2}}" for p in pods) + f"{'failed':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        row = f"{r.step.title:<22}" + "".join(f"{r.per_pod.get(p, 0):>{width + 2}}" for p in pods)
        print(row + f"{r.failed:>8}")


def plot(results: list[StepResult], pods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(pods), 1)
    for i, pod in enumerate(pods):
        xs = [j + i * width for j in range(len(results))]
        ax.bar(xs, [r.per_pod.get(pod, 0) for r in results], width, label=pod)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))])
    ax.set_xticklabels([r.step.title for r in results])
    ax.set_ylabel("requests answered")
    ax.set_title("svcproxy demo: requests per Pod for each policy")
    ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path,
                        default=Path.home() / ".cache" / "svcproxy" / "labs" / "demo")
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--requests", type=int, default=12, help="requests per node per step")
    parser.add_argument("--down", action="store_true", help="tear the lab down at the end")


def run(args: argparse.Namespace) -> int:
    lab = Lab(args.state_dir)
    ipvs_nodes = 2 if uml_available() else 0
    if not ipvs_nodes:
        say("user-mode-linux nodes are not available: every node runs without IPVS (fallback)")
    try:
        kubeconfig = lab.up(nodes=3, ipvs_nodes=ipvs_nodes, svcproxy=True, say=say)
        state = lab.load()
        assert state is not None
        kubectl = Kubectl(Path(state["bin_dir"]), kubeconfig)
        install_chart(Path(state["bin_dir"]), kubeconfig)
        wait_agents(kubectl, 3)
        deploy_echo(kubectl)
        vip = kubectl("-n", NAMESPACE, "get", "svc", SERVICE, "-o", "jsonpath={.spec.clusterIP}")
        pods = sorted(kubectl("-n", NAMESPACE, "get", "pods", "-l", f"app={SERVICE}", "-o",
                              "jsonpath={.items[*].metadata.name}").split())
        results: list[StepResult] = []
        for step in STEPS:
            apply_policy(kubectl, step)
            result = StepResult(step)
            for node in range(1, 4):
                send(node, vip, args.requests, result)
            say(f"{step.title}: {sum(result.per_pod.values())} answered, {result.failed} failed")
            results.append(result)
    except LabError as exc:
        say(f"demo failed: {exc}")
        return 1
    print()
    print_table(results, pods)
    plot(results, pods, args.out / "distribution.png")
    print(f"\nchart: {args.out / 'distribution.png'}")
    print("\nlook around:")
    print(f"  export KUBECONFIG={kubeconfig}")
    print(f"  {state['bin_dir']}/kubectl get spp,pvs -A; {state['bin_dir']}/kubectl get pn")
    cli = Path(sys.executable).parent / "svcproxy"
    print(f"  {cli} lab exec --state-dir {args.state_dir} node-2 -- ipvsadm -Ln")
    print(f"tear down: {cli} lab down --state-dir {args.state_dir}")
    if args.down:
        lab.down(say)
    failed = sum(r.failed for r in results)
    for r in results:
        for err in r.errors[:3]:
            say(f"failed request ({r.step.title}): {err}")
    return 1 if failed else 0
