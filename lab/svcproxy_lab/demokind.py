"""``svcproxy demo --kind``: the lab demo's five Services and policies on the kind cluster.

Needs the cluster ``make kind-up`` made (``hack/kind.sh``); without one it says so
and how to make one, and exits 1. It installs the chart again with the images that
cluster last loaded (``hack/kind.sh chart``: the operator Deployment and the agent
DaemonSet run the built images, no svcproxy process on the host), deploys the
workload and policies of ``demoplan`` with agnhost backends in namespace
``svcproxy-demo``, and starts one agnhost client Pod on each kind node (pinned by
``nodeName``). Each client sends new connections to every Service by DNS name
(``curl http://SERVICE.svcproxy-demo.svc.cluster.local/hostname``, resolved by
CoreDNS in the cluster), so all traffic stays between Pods of the cluster's internal
network: the host only talks to the API server. The answers are counted per backend
Pod and shown as the lab demo shows them (``demosteps.show``), with the address each
name resolved to. The kind nodes run this host's kernel, which has no IPVS: the
``ipvs`` policies run as iptables there, and the table, the grid titles and their
verdicts follow what every ProxyNode reports it programmed. Called from ``demo.py``;
checked by ``tests/kind/test_kind_demo.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svcproxy_lab.cluster import REPO, LabError, ensure_toolchain
from svcproxy_lab.demoplan import (
    SERVICES,
    TARGET_PORT,
    effective_modes,
    fallback_notes,
    in_effect,
    mode_in_effect,
)
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

CLUSTER = "svcproxy"  # hack/kind.sh's cluster, and its kubeconfig's name
KIND_STATE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svcproxy" / "kind"
NAMESPACE = "svcproxy-demo"  # not docs/examples' "demo", whose app=web Pods would join web-canary
REQUESTS = 30  # per client Pod per Service
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"  # built and loaded by hack/kind.sh
BACKEND = {
    "name": "netexec", "image": AGNHOST, "imagePullPolicy": "Never",
    "args": ["netexec", f"--http-port={TARGET_PORT}"],  # /hostname answers with the Pod's name
    "ports": [{"containerPort": TARGET_PORT, "name": "http"}],
    "readinessProbe": {"httpGet": {"path": "/hostname", "port": TARGET_PORT}, "periodSeconds": 1},
}
CLIENT_LABELS = {"app": "demo-client"}  # selected by no demo Service


def missing_cluster(kubeconfig: Path, running: bool) -> str | None:
    """What to tell the user when there is no kind cluster to run on, else None."""
    if kubeconfig.exists() and running:
        return None
    why = (f"its kubeconfig {kubeconfig} is missing" if not kubeconfig.exists()
           else f"its control-plane container {CLUSTER}-control-plane is not running")
    return (f"svcproxy demo --kind: there is no kind cluster {CLUSTER!r} here ({why}). "
            "Make one with `make kind-up` (as root; it builds the images here, about 5 "
            "minutes warm, 15 the first time), then run `svcproxy demo --kind` again; "
            "or run `make demo` for the same demo on a local lab.")


def control_plane_running() -> bool:
    try:
        proc = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}",
                               f"{CLUSTER}-control-plane"], capture_output=True, text=True,
                              check=False, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False  # no Docker, or one that does not answer: no cluster to run on
    return proc.returncode == 0 and proc.stdout.strip() == "true"


def client_pod(node: str, namespace: str) -> dict[str, Any]:
    """An agnhost Pod on ``node`` whose curl the demo runs with ``kubectl exec``."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"client-{node}", "namespace": namespace, "labels": CLIENT_LABELS},
        "spec": {
            "nodeName": node,  # one client per node, whatever the scheduler would do
            "tolerations": [{"operator": "Exists"}],  # the control-plane node's taint too
            "containers": [{"name": "client", "image": AGNHOST, "imagePullPolicy": "Never",
                            "args": ["pause"]}],
            "terminationGracePeriodSeconds": 1,
        },
    }


def host(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def burst_script(url: str, count: int) -> str:
    """``count`` curls of ``url``, each a new process: a new DNS lookup and a new connection.

    One line per request: ``answer:<curl exit> <body> <address connected to>``.
    """
    return (f"for i in $(seq {count}); do a=$(curl -s -m 3 -w ' %{{remote_ip}}' {url}); "
            'echo "answer:$? $a"; done')


@dataclass(frozen=True)
class Answer:
    """One request: the Pod that answered (None: failed), where curl connected, its exit."""

    pod: str | None
    address: str | None
    exit: int


def parse_answers(out: str) -> list[Answer]:
    """The client's lines from :func:`burst_script`, in order; anything else is ignored."""
    answers = []
    for line in out.splitlines():
        if not line.startswith("answer:"):
            continue
        code, _, rest = line[len("answer:"):].partition(" ")
        words = rest.split()
        exit_code = int(code) if code.isdigit() else -1
        address = words[-1] if words else None
        pod = words[0] if exit_code == 0 and len(words) == 2 else None
        answers.append(Answer(pod, address, exit_code))
    return answers


def failures(answers: Sequence[Answer]) -> list[str]:
    """Failed requests by curl's exit code, e.g. "2 failed with curl exit 7"."""
    codes = Counter(a.exit for a in answers if a.pod is None)
    return [f"{n} failed with " + (f"curl exit {code}" if code else "an empty answer")
            for code, n in sorted(codes.items())]


def send(kubectl: Kubectl, namespace: str, node: str, url: str,
         count: int) -> tuple[list[Answer], list[str]]:
    """``count`` requests from the client Pod on ``node``; its answers and what went wrong."""
    try:
        out = kubectl("-n", namespace, "exec", f"client-{node}", "--", "sh", "-c",
                      burst_script(url, count), timeout=count * 4 + 60)
    except (LabError, subprocess.TimeoutExpired) as exc:
        return [], [str(exc)]
    answers = parse_answers(out)
    return answers, failures(answers)


def drive(kubectl: Kubectl, namespace: str, outcomes: list[Outcome], nodes: list[str],
          vips: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Traffic to each Service in turn, from every client at once; what each name resolved to."""
    resolved: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(len(nodes)) as pool:
        for o in outcomes:
            name = host(o.name, namespace)
            url = f"http://{name}/hostname"
            results = list(pool.map(lambda n, u=url, o=o: send(kubectl, namespace, n, u,
                                                               o.requests), nodes))
            addresses: set[str] = set()
            for node, (answers, errors) in zip(nodes, results, strict=True):
                o.errors += [f"{node}: {e}" for e in errors]
                o.add(node, [a.pod for a in answers])
                addresses |= {a.address for a in answers if a.pod and a.address}
            vip = vips[o.name]
            if addresses - {vip}:
                o.errors.append(f"{name} reached {sorted(addresses)}, not only its ClusterIP {vip}")
            resolved[o.name] = {"name": name, "addresses": sorted(addresses), "cluster_ip": vip}
            where = "its ClusterIP" if addresses == {vip} else f"not only its ClusterIP {vip}"
            say(f"{o.name} by name {name} -> {', '.join(sorted(addresses)) or 'nothing'} "
                f"({where}): {o.answered()} answered, {o.failed} failed")
    return resolved


def prepare(kubeconfig: Path) -> tuple[Kubectl, list[str]]:
    """kubectl for the cluster, the chart installed, every agent reporting; the node names."""
    kubectl = Kubectl(ensure_toolchain(say), kubeconfig)
    proc = subprocess.run(["bash", str(REPO / "hack" / "kind.sh"), "chart"], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise LabError(f"hack/kind.sh chart failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-2000:]}")
    tag = (KIND_STATE / "image-tag").read_text().strip()
    say(f"installed the svcproxy chart into namespace svcproxy-system (images svcproxy-operator "
        f"and svcproxy-agent:{tag}, built here by make kind-up)")
    nodes = sorted(n["metadata"]["name"] for n in kubectl.json("get", "nodes")["items"])
    wait_agents(kubectl, len(nodes),
                "see `kubectl -n svcproxy-system logs -l app.kubernetes.io/component=agent`")
    return kubectl, nodes


def start_clients(kubectl: Kubectl, nodes: list[str]) -> None:
    """The workload, the policies' Services and one client Pod per node, all Ready."""
    phase = kubectl("get", "namespace", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False)
    if phase == "Terminating":  # an earlier demo's --down, still going
        say(f"namespace {NAMESPACE} of an earlier demo is still being deleted: waiting")
        kubectl("wait", "--for=delete", f"namespace/{NAMESPACE}", "--timeout=180s", timeout=200)
    deploy(kubectl, NAMESPACE, BACKEND, [client_pod(n, NAMESPACE) for n in nodes])
    selector = ",".join(f"{k}={v}" for k, v in CLIENT_LABELS.items())
    kubectl("-n", NAMESPACE, "wait", "--for=condition=Ready", "pod", "-l", selector,
            "--timeout=120s", timeout=140)
    say(f"a client Pod on each of {', '.join(nodes)}")


def run(args: argparse.Namespace) -> int:
    Clock.reset()
    kubeconfig = KIND_STATE / f"{CLUSTER}.kubeconfig"
    problem = missing_cluster(kubeconfig, kubeconfig.exists() and control_plane_running())
    if problem:
        say(problem)
        return 1
    requests = args.requests or REQUESTS
    try:
        kubectl, nodes = prepare(kubeconfig)
        start_clients(kubectl, nodes)
        apply_policies(kubectl, NAMESPACE)
        rows = wait_programmed(kubectl, NAMESPACE)
        proxynodes = kubectl.json("get", "pn")["items"]
        modes = effective_modes(proxynodes)
        notes = fallback_notes(modes)
        for note in notes:
            say(note)
        outcomes = []
        for s in SERVICES:
            title, expect = in_effect(s, modes)
            # The policy's own words name every node; the table counts them instead.
            row = {**rows[s.name], "policy_mode": rows[s.name]["mode"],
                   "mode": mode_in_effect(s, modes)}
            outcomes.append(outcome_for(kubectl, NAMESPACE, s, row, requests=requests,
                                        title=title, expect=expect))
        vips = {s.name: kubectl("-n", NAMESPACE, "get", "svc", s.name, "-o",
                                "jsonpath={.spec.clusterIP}") for s in SERVICES}
        resolved = drive(kubectl, NAMESPACE, outcomes, nodes, vips)
        how = (f"{len(nodes)} clients (one agnhost Pod on each kind node, pinned by nodeName), "
               f"{requests} requests each per Service, each a new connection by DNS name "
               f"through CoreDNS (curl http://SERVICE.{NAMESPACE}.svc.cluster.local/hostname)")
        ipvs_nodes = sorted(pn["metadata"]["name"] for pn in proxynodes
                            if ((pn.get("status") or {}).get("capabilities") or {}).get("ipvs"))
        show(outcomes, kubectl, args.out, namespace=NAMESPACE, how=how,
             summary={"via": "DNS name", "cluster": f"kind {CLUSTER}", "nodes": len(nodes),
                      "node_names": nodes, "ipvs_nodes": ipvs_nodes, "fallback": notes,
                      "resolved": resolved},
             notes=[f"  {n}" for n in notes])
    except LabError as exc:
        say(f"demo failed: {exc}")
        return 1
    say(f"done in {Clock.elapsed():.0f} s")
    print("\nlook around:")
    print(f"  export KUBECONFIG={kubeconfig}")
    tool = kubectl.argv[0]
    print(f"  {tool} -n {NAMESPACE} describe spp echo-sticky")
    print(f"  {tool} get pn   # MODES iptables(ipvs): no IPVS in this kernel")
    print(f"  {tool} -n {NAMESPACE} exec client-{nodes[0]} -- curl -s "
          f"http://{host('web-canary', NAMESPACE)}/hostname")
    print(f"clean up: {tool} delete namespace {NAMESPACE}; the cluster: make kind-down")
    if args.down:
        kubectl("delete", "namespace", NAMESPACE, "--wait=false")
        say(f"deleting namespace {NAMESPACE} (the cluster stays: make kind-down deletes it)")
    return exit_status(outcomes)
