"""The Helm chart against a real API server: install, RBAC enough and not more, upgrade, uninstall.

``helm install`` puts the chart into a fresh namespace of the lab (or of the cluster named by
SVCPROXY_E2E_KUBECONFIG, e.g. kind). The lab's kubelet runs only the echo image, so the
chart's operator and agent Pods stay Pending there, bound to their nodes; the tests then run
the operator and an agent as local processes with the chart's own ServiceAccount credentials
(TokenRequest API; the agent's token is bound to the chart's DaemonSet Pod on node-1, so it
carries that node's name), which proves the chart's RBAC is enough. ``kubectl auth can-i``
with the same tokens, and real writes refused by the admission policies, prove it is not more:
an agent writes only its own node's ProxyNode, and nobody but the operator's account creates
or updates a ProxyVirtualServer (deletes, and the garbage collector's updates, stay allowed).
On an external cluster the chart's own Pods run and do the same work.

The local operator watches only the test's namespace (``--namespace``) and runs standalone,
so it cannot touch other tests' policies; the local agent runs in a network namespace this
test creates (no routes, no traffic), so it programs nothing that matters.
"""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Lab, svcproxy_cli

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "svcproxy"
ECHO = "svcproxy.io/echo"
HANDOVER = "service.kubernetes.io/service-proxy-name"
pytestmark = pytest.mark.lab
# Set when SVCPROXY_E2E_KUBECONFIG is a cluster whose kubelets run the chart's images.
# Otherwise (the lab, whose kubelet runs only its echo image) the Pods stay Pending and the
# tests run the operator and an agent as local processes with the chart's credentials.
CHART_SET = os.environ.get("SVCPROXY_E2E_CHART_SET", "")


def _helpers() -> Any:
    """tests/unit/test_chart_kubeconform.py: schema conversion shared with the offline test."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "chart_kubeconform", REPO / "tests/unit/test_chart_kubeconform.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


KC = _helpers()


@dataclass
class Release:
    name: str
    namespace: str
    helm: Path
    kubeconfig: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run([str(self.helm), "--kubeconfig", str(self.kubeconfig), *args],
                             capture_output=True, text=True, timeout=600, check=False)
        if check:
            assert out.returncode == 0, f"helm {' '.join(args)}: {out.stdout}{out.stderr}"
        return out

    @property
    def operator_sa(self) -> str:
        return f"{self.name}-operator"

    @property
    def agent_sa(self) -> str:
        return f"{self.name}-agent"


@pytest.fixture(scope="module")
def release(lab: Lab) -> Iterator[Release]:
    helm = KC.toolchain_bin() / "helm"
    suffix = uuid.uuid4().hex[:6]
    rel = Release(f"svcproxy-e2e-{suffix}", f"svcproxy-e2e-{suffix}", helm, lab.kubeconfig)
    # Each release needs its own peering name on a shared cluster.
    args = ["install", rel.name, str(CHART), "--namespace", rel.namespace, "--create-namespace",
            "--set", f"operator.peering={rel.name}"]
    if CHART_SET:
        args += ["--set", CHART_SET, "--wait", "--timeout", "5m"]
    out = rel.run(*args)
    assert "STATUS: deployed" in out.stdout, out.stdout
    try:
        yield rel
    finally:
        rel.run("uninstall", rel.name, "--namespace", rel.namespace, "--wait", check=False)
        lab.kubectl("delete", "namespace", rel.namespace, "--wait=false", "--ignore-not-found", check=False)


def token_kubeconfig(lab: Lab, path: Path, token: str) -> Path:
    """A kubeconfig with the lab's server and CA and only this bearer token (no client cert)."""
    admin = yaml.safe_load(lab.kubeconfig.read_text())
    cluster = dict(admin["clusters"][0]["cluster"])
    doc = {
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}],
    }
    path.write_text(yaml.safe_dump(doc))
    path.chmod(0o600)
    return path


def can_i(lab: Lab, kubeconfig: Path, *args: str) -> bool:
    out = subprocess.run([lab.kubectl_bin, "--kubeconfig", str(kubeconfig), "auth", "can-i", *args],
                         capture_output=True, text=True, timeout=60, check=False)
    answer = out.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {args}: {out.stdout}{out.stderr}"
    return answer == "yes"


def agent_pod(lab: Lab, rel: Release, node: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        pods = lab.pods(rel.namespace, "app.kubernetes.io/component=agent")
        return next((p for p in pods if p["spec"].get("nodeName") == node), None)

    pod: dict[str, Any] = lab.wait_until(f"the chart's agent Pod on {node}", find)
    return pod


@pytest.fixture(scope="module")
def tokens(lab: Lab, release: Release, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kubeconfigs: the operator's token, an agent token bound to its Pod on node-1, and an
    agent token bound to nothing (no node name)."""
    tmp = tmp_path_factory.mktemp("tokens")
    node = lab.nodes[0]
    pod = agent_pod(lab, release, node)
    ns = release.namespace
    op = lab.kubectl("create", "token", release.operator_sa, "-n", ns, "--duration=1h").strip()
    bound = lab.kubectl("create", "token", release.agent_sa, "-n", ns, "--duration=1h",
                        "--bound-object-kind=Pod", f"--bound-object-name={pod['metadata']['name']}").strip()
    unbound = lab.kubectl("create", "token", release.agent_sa, "-n", ns, "--duration=1h").strip()
    return {
        "operator": token_kubeconfig(lab, tmp / "operator.kubeconfig", op),
        "agent": token_kubeconfig(lab, tmp / "agent.kubeconfig", bound),
        "agent-unbound": token_kubeconfig(lab, tmp / "agent-unbound.kubeconfig", unbound),
    }


# --- install ------------------------------------------------------------------------------------


def test_install_serves_the_crds_and_creates_the_workloads(lab: Lab, release: Release) -> None:
    resources = lab.kubectl("api-resources", "--api-group=svcproxy.io", "-o", "name")
    assert set(resources.split()) >= {"serviceproxypolicies.svcproxy.io", "proxyvirtualservers.svcproxy.io",
                                      "proxynodes.svcproxy.io"}, resources
    for crd in ("serviceproxypolicies.svcproxy.io", "clusterkopfpeerings.kopf.dev"):
        obj = lab.kubectl_json("get", "crd", crd)
        assert any(c["type"] == "Established" and c["status"] == "True"
                   for c in obj["status"]["conditions"]), obj["status"]
    ds = lab.kubectl_json("get", "daemonset", release.agent_sa, "-n", release.namespace)
    # Every node gets an agent Pod, whatever its taints.
    lab.wait_until("an agent Pod per node", lambda: ds_scheduled(lab, release) == len(lab.nodes))
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    dep = lab.kubectl_json("get", "deployment", release.operator_sa, "-n", release.namespace)
    assert dep["spec"]["replicas"] == 2
    lab.kubectl_json("get", "pdb", release.operator_sa, "-n", release.namespace)
    notes = release.run("get", "notes", release.name, "-n", release.namespace).stdout
    assert "kubectl wait --for=condition=Programmed" in notes


def ds_scheduled(lab: Lab, release: Release) -> int:
    ds = lab.kubectl_json("get", "daemonset", release.agent_sa, "-n", release.namespace)
    return int((ds.get("status") or {}).get("currentNumberScheduled") or 0)


def test_rendered_chart_validates_against_the_live_openapi(lab: Lab, release: Release,
                                                         tmp_path: Path) -> None:
    """kubeconform (strict) with schemas made from this API server's own /openapi/v3."""
    bin_dir = KC.toolchain_bin()
    out = KC.helm_template(bin_dir / "helm", "--include-crds", namespace=release.namespace)
    assert out.returncode == 0, out.stderr
    docs = KC.documents(out.stdout)
    wanted = KC.kinds_of(docs)
    paths = json.loads(lab.kubectl("get", "--raw", "/openapi/v3"))["paths"]
    groups = {("api/v1" if "/" not in av else f"apis/{av}") for av, _ in wanted}
    openapi = [json.loads(lab.kubectl("get", "--raw", paths[g]["serverRelativeURL"]))
               for g in sorted(groups) if g in paths]
    KC.write_crd_schemas(KC.crd_documents(), tmp_path)
    found = KC.write_builtin_schemas(openapi, tmp_path, wanted)
    assert wanted - found == set(), f"the API server serves no schema for {wanted - found}"
    res = KC.kubeconform(bin_dir / "kubeconform", tmp_path, out.stdout)
    assert res.returncode == 0 and f"Valid: {len(docs)}" in res.stdout, res.stdout + res.stderr


# --- RBAC is enough: the operator and an agent with the chart's credentials -----------------------


def _others(lab: Lab, role: str) -> list[str]:
    """Other svcproxy operator/agent processes talking to this cluster (another test's)."""
    out = subprocess.run(["pgrep", "-af", f"svcproxy.* {role}( |$)"], capture_output=True, text=True,
                         check=False).stdout
    here = [str(lab.kubeconfig)] + ([str(lab.state_dir)] if lab.state_dir else [])
    return [line for line in out.splitlines()
            if "pgrep" not in line and any(h in line for h in here)]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def workload(lab: Lab, release: Release) -> Iterator[str]:
    ns = f"chart-app-{uuid.uuid4().hex[:6]}"
    lab.kubectl("create", "namespace", ns)
    lab.kubectl("create", "deployment", "web", f"--image={ECHO}", "--replicas=2", "-n", ns)
    lab.kubectl("expose", "deployment", "web", "--port=80", "-n", ns)
    try:
        yield ns
    finally:
        lab.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _pvs(lab: Lab, ns: str) -> dict[str, Any] | None:
    out = lab.kubectl("get", "pvs", "web", "-n", ns, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def test_operator_works_with_the_charts_rbac(lab: Lab, release: Release, tokens: dict[str, Path],
                                             workload: str, tmp_path: Path) -> None:
    ns = workload
    proc = None
    clusterwide = False
    made: list[str] = []
    log = tmp_path / "operator.log"
    if not CHART_SET:
        others = _others(lab, "operator")
        if others:
            pytest.skip(f"another svcproxy operator runs on this machine ({others[0][:120]}); "
                        "its writes could not be told from this one's")
        # On a lab this session started, the operator runs as the chart runs it: cluster-wide,
        # in the release's peering. On a shared lab it watches only the test's namespace and
        # runs standalone, so it cannot touch other tests' policies.
        clusterwide = lab.owned and not _others(lab, "agent")
        scope = (["--peering", release.name] if clusterwide else ["--namespace", ns, "--standalone"])
        proc = subprocess.Popen(
            svcproxy_cli("operator", "--kubeconfig", str(tokens["operator"]), *scope,
                         "--metrics-port", "0", "--liveness-port", "0", "--handover-delay", "1"),
            stdout=log.open("w"), stderr=subprocess.STDOUT)
        if clusterwide:
            lab.wait_until("the operator announcing itself in its ClusterKopfPeering", timeout=60,
                           check=lambda: (lab.kubectl_json("get", "clusterkopfpeering", release.name)
                                          if lab.kubectl("get", "clusterkopfpeering", release.name,
                                                         "--ignore-not-found").strip() else {}
                                          ).get("status"))
    try:
        lab.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
            "apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": "chart"},
            "spec": {"services": ["web"], "mode": "iptables"}}))
        # Reads (policies, Services, EndpointSlices, Pods) and writes (program, status, finalizer).
        program = lab.wait_until("the ProxyVirtualServer of web with both Pods",
                                 lambda: (p := _pvs(lab, ns)) and len(
                                     {rs["address"] for vs in p["spec"]["virtualServers"]
                                      for rs in vs["realServers"]}) == 2 and p, timeout=120)
        assert program["metadata"]["ownerReferences"][0]["kind"] == "Service"
        lab.wait_until("the policy's Accepted condition", lambda: _accepted(lab, ns), timeout=60)
        lab.wait_until("kopf's finalizer on the policy (a policy patch)", lambda: "svcproxy.io/handover" in (
            lab.kubectl_json("get", "spp", "chart", "-n", ns)["metadata"].get("finalizers") or []))
        if clusterwide:
            # Every node reports the program (written here as the agents would): the operator
            # labels the Service for the handover, a Service patch with its token.
            have = set(lab.kubectl("get", "proxynodes", "-o", "name").split())
            made = [n for n in lab.nodes if f"proxynode.svcproxy.io/{n}" not in have]
            for node in made:
                lab.kubectl("create", "-f", "-", input=json.dumps(
                    {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyNode", "metadata": {"name": node}}))
            digest = program["spec"]["contentHash"]
            for node in lab.nodes:
                lab.kubectl("patch", "proxynode", node, "--subresource=status", "--type=merge",
                            "-p", json.dumps({"status": {"applied": {f"{ns}/web": digest}}}))
            lab.wait_until("the handover label on web", timeout=60, check=lambda: HANDOVER in (
                lab.kubectl_json("get", "service", "web", "-n", ns)["metadata"].get("labels") or {}))
        # Deletion: the finalizer step hands back and removes the program, then lets the policy go.
        lab.kubectl("delete", "spp", "chart", "-n", ns, "--wait=false")
        lab.wait_until("the policy to go (finalizer removed)",
                       lambda: not lab.kubectl("get", "spp", "-n", ns, "-o", "name").strip(), timeout=120)
        assert _pvs(lab, ns) is None
        labels = lab.kubectl_json("get", "service", "web", "-n", ns)["metadata"].get("labels") or {}
        assert HANDOVER not in labels, "the Service was not handed back to kube-proxy"
        if proc is not None:
            assert proc.poll() is None, f"the operator died: {log.read_text()[-3000:]}"
            # Only --namespace (this test's mode, not the chart's clusterwide one) makes kopf
            # list namespaces; without the right it falls back to the named namespace.
            refused = [line for line in log.read_text().splitlines()
                       if ("Forbidden" in line or "forbidden" in line)
                       and "namespaces is forbidden" not in line]
            assert not refused, "\n".join(refused)[-4000:]
    finally:
        if proc is not None:
            _stop(proc)
            print(log.read_text()[-6000:])
            lab.kubectl("delete", "clusterkopfpeering", release.name, "--ignore-not-found", check=False)
        if made:
            lab.kubectl("delete", "proxynodes", *made, "--ignore-not-found", check=False)


def _accepted(lab: Lab, ns: str) -> dict[str, Any] | None:
    obj: dict[str, Any] = lab.kubectl_json("get", "spp", "chart", "-n", ns)
    conds = (obj.get("status") or {}).get("conditions") or []
    return obj if any(c["type"] == "Accepted" and c["status"] == "True" for c in conds) else None


def test_peering_object_is_writable_by_the_operator(lab: Lab, release: Release,
                                                   tokens: dict[str, Path]) -> None:
    """kopf peering: create and patch its own ClusterKopfPeering, and only that one."""
    kc = tokens["operator"]
    name = release.name
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    run = [lab.kubectl_bin, "--kubeconfig", str(kc)]
    out = subprocess.run([*run, "create", "-f", "-"], input=json.dumps(body), capture_output=True,
                         text=True, check=False)
    assert out.returncode == 0 or "AlreadyExists" in out.stderr, out.stderr
    try:
        out = subprocess.run([*run, "patch", "clusterkopfpeering", name, "--type=merge",
                              "-p", '{"status": {"e2e": {"priority": 1}}}'],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr
        assert can_i(lab, kc, "watch", "clusterkopfpeerings.kopf.dev")
        assert not can_i(lab, kc, "patch", "clusterkopfpeerings.kopf.dev/someone-else")
        assert not can_i(lab, kc, "delete", f"clusterkopfpeerings.kopf.dev/{name}")
    finally:
        lab.kubectl("delete", "clusterkopfpeering", name, "--ignore-not-found", check=False)


@pytest.fixture
def node_netns(lab: Lab) -> str:
    """The lab node's network namespace: the agent reaches the API server from there
    (172.29.0.1 over the lab bridge), and programs only that node's own netns."""
    if CHART_SET:
        return ""  # the chart's own agent Pods run there
    if os.geteuid() != 0:
        pytest.skip("the local agent runs in the lab node's network namespace: needs root")
    name = f"svcp-{lab.nodes[0]}"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    if name not in listed.split():
        pytest.skip(f"no network namespace {name}: not a lab whose first node is a netns node")
    return name


def test_agent_works_with_a_pod_bound_token(lab: Lab, release: Release, tokens: dict[str, Path],
                                            node_netns: str, tmp_path: Path) -> None:
    """The agent lists/watches programs and creates and patches its own node's ProxyNode.

    Its first sync (and so its first report's lastSyncTime) waits for the first complete
    list of ProxyVirtualServers, so a fresh lastSyncTime proves the list and the writes."""
    node = lab.nodes[0]
    if CHART_SET:
        lab.wait_until(f"the chart's agent on {node} reporting", timeout=300,
                       check=lambda: lab.kubectl("get", "proxynode", node, "--ignore-not-found").strip())
        return
    others = subprocess.run(["pgrep", "-af", f"svcproxy.* agent .*{node}"], capture_output=True,
                            text=True, check=False).stdout.strip()
    if others:
        pytest.skip(f"another agent for {node} runs on this machine: {others[:120]}")
    # The same token, with the server address the node's network namespace reaches.
    kc = yaml.safe_load(tokens["agent"].read_text())
    kc["clusters"][0]["cluster"]["server"] = "https://172.29.0.1:6443"
    node_kc = tmp_path / "agent-node.kubeconfig"
    node_kc.write_text(yaml.safe_dump(kc))
    existed = bool(lab.kubectl("get", "proxynode", node, "--ignore-not-found").strip())
    started = time.time()
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node_netns, sys.executable, "-m", "svcproxy.cli", "agent",
         "--kubeconfig", str(node_kc), "--node-name", node, "--modes", "iptables",
         "--metrics-port", "0", "--health-port", "0"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        def reported() -> dict[str, Any] | None:
            out = lab.kubectl("get", "proxynode", node, "-o", "json", "--ignore-not-found")
            if not out.strip():
                return None
            status = json.loads(out).get("status") or {}
            stamp = status.get("lastSyncTime")
            if not stamp:
                return None
            when = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
            return status if when >= int(started) - 1 and "agent started" in log.read_text() else None

        try:
            status = lab.wait_until(f"the ProxyNode {node} written by the local agent", reported,
                                    timeout=120)
        except BaseException:
            print(log.read_text()[-5000:])
            raise
        assert status["nodeName"] == node
        assert proc.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        assert "write failed" not in text and "Forbidden" not in text and "403" not in text, text[-4000:]
    finally:
        _stop(proc)
        # Leave the node as found: nothing of this agent in its kernel, no ProxyNode it made.
        subprocess.run(["ip", "netns", "exec", node_netns, sys.executable, "-m", "svcproxy.cli", "agent",
                        "--cleanup", "--node-name", node, "--modes", "iptables"],
                       capture_output=True, check=False)
        if not existed:
            lab.kubectl("delete", "proxynode", node, "--ignore-not-found", check=False)


# --- RBAC is not more than needed -------------------------------------------------------------------


def test_agent_can_do_nothing_else(lab: Lab, release: Release, tokens: dict[str, Path]) -> None:
    kc = tokens["agent"]
    assert can_i(lab, kc, "watch", "proxyvirtualservers.svcproxy.io", "--all-namespaces")
    assert can_i(lab, kc, "patch", "proxynodes.svcproxy.io", "--subresource=status")
    # Services' addresses and Nodes' ranges: what the agent checks each program against
    # (docs/agent.md, "Refused programs"); its own ProxyNode it watches to recreate it.
    assert can_i(lab, kc, "watch", "services", "-A")
    assert can_i(lab, kc, "watch", "nodes")
    assert can_i(lab, kc, "watch", "proxynodes.svcproxy.io")
    for args in [("get", "secrets", "-A"), ("list", "secrets", "-n", release.namespace),
                 ("patch", "services", "-A"), ("delete", "services", "-A"), ("list", "pods", "-A"),
                 ("create", "proxyvirtualservers.svcproxy.io", "-A"), ("delete", "proxynodes.svcproxy.io"),
                 ("patch", "serviceproxypolicies.svcproxy.io", "-A"), ("patch", "nodes"),
                 ("create", "events", "-A"), ("create", "serviceaccounts/token", "-A")]:
        assert not can_i(lab, kc, *args), f"the agent may {' '.join(args)}"


def test_operator_can_do_nothing_else(lab: Lab, release: Release, tokens: dict[str, Path]) -> None:
    kc = tokens["operator"]
    assert can_i(lab, kc, "patch", "services", "-A")
    # Nodes are read to know which ones must report before a program counts as Programmed.
    assert can_i(lab, kc, "watch", "nodes")
    spp = "serviceproxypolicies.svcproxy.io"
    for args in [("get", "secrets", "-A"), ("list", "configmaps", "-A"), ("delete", "services", "-A"),
                 ("update", "services", "-A"), ("create", "pods", "-A"), ("delete", "pods", "-A"),
                 ("patch", "nodes"), ("get", "nodes"), ("delete", "nodes"),
                 ("patch", "proxynodes.svcproxy.io", "--subresource=status"),
                 ("create", spp, "-A"), ("delete", spp, "-A"),
                 ("create", "clusterrolebindings"), ("delete", "customresourcedefinitions"),
                 ("patch", "endpointslices.discovery.k8s.io", "-A")]:
        assert not can_i(lab, kc, *args), f"the operator may {' '.join(args)}"


def _kubectl_as(lab: Lab, kc: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([lab.kubectl_bin, "--kubeconfig", str(kc), *args], input=input,
                          capture_output=True, text=True, timeout=60, check=False)


def test_agent_cannot_write_another_nodes_proxynode(lab: Lab, release: Release,
                                                    tokens: dict[str, Path]) -> None:
    own, other = lab.nodes[0], lab.nodes[1]
    stranger = f"chart-e2e-{uuid.uuid4().hex[:6]}"
    body = {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyNode", "metadata": {"name": stranger},
            "spec": {}}
    out = _kubectl_as(lab, tokens["agent"], "create", "-f", "-", input=json.dumps(body))
    assert out.returncode != 0, f"the agent of {own} created ProxyNode {stranger}"
    assert f"may write only the ProxyNode of its own node: this token belongs to node {own}" in out.stderr, \
        out.stderr
    assert not lab.kubectl("get", "proxynode", stranger, "--ignore-not-found").strip()
    # A patch of another node's existing ProxyNode (made here if no agent made it).
    made = not lab.kubectl("get", "proxynode", other, "--ignore-not-found").strip()
    if made:
        lab.kubectl("create", "-f", "-", input=json.dumps({**body, "metadata": {"name": other}}))
    try:
        for sub in ([], ["--subresource=status"]):
            out = _kubectl_as(lab, tokens["agent"], "patch", "proxynode", other, "--type=merge", *sub,
                              "-p", '{"status": {"errors": [{"service": "", "message": "forged"}]}}')
            assert out.returncode != 0 and "ValidatingAdmissionPolicy" in out.stderr, out.stderr
        # A token of the agent's account that is not bound to a Pod names no node: refused too.
        out = _kubectl_as(lab, tokens["agent-unbound"], "patch", "proxynode", other, "--type=merge",
                          "--subresource=status", "-p", '{"status": {"errors": []}}')
        assert out.returncode != 0 and "not bound to a Pod" in out.stderr, out.stderr
        status = lab.kubectl_json("get", "proxynode", other).get("status") or {}
        assert "forged" not in json.dumps(status)
    finally:
        if made:
            lab.kubectl("delete", "proxynode", other, "--ignore-not-found", check=False)


# --- programs are the operator's alone ---------------------------------------------------------------


def _program(name: str, ns: str, mode: str = "iptables", **metadata: Any) -> str:
    return json.dumps({
        "apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
        "metadata": {"name": name, "namespace": ns, **metadata},
        "spec": {"service": {"name": name}, "policy": {"name": "e2e"}, "mode": mode}})


@pytest.fixture(scope="module")
def programs_ns(lab: Lab, release: Release,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A namespace of its own, and the kubeconfig of an "intruder" ServiceAccount there whose
    Role grants every write on ProxyVirtualServers: RBAC lets it, only admission refuses."""
    ns = f"chart-pvs-{uuid.uuid4().hex[:6]}"
    lab.kubectl("create", "namespace", ns)
    try:
        lab.kubectl("create", "serviceaccount", "intruder", "-n", ns)
        lab.kubectl("create", "role", "program-writer", "-n", ns,
                    "--resource=proxyvirtualservers.svcproxy.io", "--verb=get,create,update,patch,delete")
        lab.kubectl("create", "rolebinding", "program-writer", "-n", ns, "--role=program-writer",
                    f"--serviceaccount={ns}:intruder")
        token = lab.kubectl("create", "token", "intruder", "-n", ns, "--duration=1h").strip()
        yield ns, token_kubeconfig(lab, tmp_path_factory.mktemp("intruder") / "kubeconfig", token)
    finally:
        lab.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def _replace(lab: Lab, kc: Path, ns: str, name: str, change: Any) -> subprocess.CompletedProcess[str]:
    """An update (PUT: the verb the operator's Role has, as its client uses) of the stored object."""
    obj = lab.kubectl_json("get", "pvs", name, "-n", ns)
    change(obj)
    return _kubectl_as(lab, kc, "replace", "-f", "-", input=json.dumps(obj))


def _refused(out: subprocess.CompletedProcess[str], release: Release, who: str, what: str) -> None:
    """Refused by the chart's program policy, with a message naming who may write programs."""
    assert out.returncode != 0, f"{who} could {what}: {out.stdout}"
    operator = f"system:serviceaccount:{release.namespace}:{release.operator_sa}"
    assert f"{release.name}-operator-writes-programs" in out.stderr, out.stderr
    assert f"ProxyVirtualServers are written only by the svcproxy operator ({operator})" in out.stderr, \
        out.stderr
    assert f"{who} may not {what}" in out.stderr, out.stderr


def test_only_the_operator_may_create_or_update_programs(lab: Lab, release: Release, tokens: dict[str, Path],
                                                        programs_ns: tuple[str, Path]) -> None:
    ns, intruder = programs_ns
    admin = lab.kubeconfig
    spec_patch = ["--type=merge", "-p", '{"spec": {"mode": "userspace"}}']

    def mode() -> str:
        return str(lab.kubectl_json("get", "pvs", "p1", "-n", ns)["spec"]["mode"])

    # The operator's token creates and changes a program (spec, labels, finalizers).
    out = _kubectl_as(lab, tokens["operator"], "create", "-f", "-", input=_program("p1", ns))
    assert out.returncode == 0, out.stderr
    changes = [lambda o: o["spec"].update(mode="ipvs"),
               lambda o: o["metadata"].update(labels={"svcproxy.io/e2e": "yes"}),
               lambda o: o["metadata"].update(finalizers=["svcproxy.io/e2e"]),
               lambda o: o["metadata"].pop("finalizers")]
    for i, change in enumerate(changes):
        out = _replace(lab, tokens["operator"], ns, "p1", change)
        assert out.returncode == 0, f"change {i}: {out.stderr}"
    assert mode() == "ipvs"

    # Another ServiceAccount that RBAC lets write programs: refused by admission.
    who = f"system:serviceaccount:{ns}:intruder"
    out = _kubectl_as(lab, intruder, "create", "-f", "-", input=_program("p2", ns))
    _refused(out, release, who, f"create {ns}/p2")
    out = _kubectl_as(lab, intruder, "patch", "pvs", "p1", "-n", ns, *spec_patch)
    _refused(out, release, who, f"change {ns}/p1")
    out = _kubectl_as(lab, intruder, "patch", "pvs", "p1", "-n", ns, "--type=merge",
                      "-p", '{"metadata": {"labels": {"svcproxy.io/e2e": "forged"}}}')
    _refused(out, release, who, f"change {ns}/p1")
    out = _replace(lab, intruder, ns, "p1", lambda o: o["spec"].update(mode="userspace"))
    _refused(out, release, who, f"change {ns}/p1")
    # The agent's token (RBAC refuses it already; whichever layer, nothing is written).
    for args in (["create", "-f", "-"], ["patch", "pvs", "p1", "-n", ns, *spec_patch]):
        out = _kubectl_as(lab, tokens["agent"], *args, input=_program("p3", ns))
        assert out.returncode != 0, f"the agent could {args[0]} a program: {out.stdout}"
    # Admins too: the cluster's admin, and a user impersonated with system:masters.
    out = _kubectl_as(lab, admin, "create", "-f", "-", input=_program("p4", ns))
    assert out.returncode != 0 and "ProxyVirtualServers are written only by the svcproxy operator" \
        in out.stderr, out.stderr
    out = _kubectl_as(lab, admin, "--as=jane", "--as-group=system:masters", "patch", "pvs", "p1", "-n", ns,
                      *spec_patch)
    _refused(out, release, "jane", f"change {ns}/p1")
    out = _kubectl_as(lab, admin, "--as=jane", "--as-group=system:masters", "create", "-f", "-",
                      input=_program("p5", ns))
    _refused(out, release, "jane", f"create {ns}/p5")

    assert mode() == "ipvs"
    labels = lab.kubectl_json("get", "pvs", "p1", "-n", ns)["metadata"].get("labels") or {}
    assert labels == {"svcproxy.io/e2e": "yes"}, labels
    assert lab.kubectl("get", "pvs", "-n", ns, "-o", "name").split() == ["proxyvirtualserver.svcproxy.io/p1"]
    # Deleting stays allowed: an admin cleans up.
    out = _kubectl_as(lab, admin, "delete", "pvs", "p1", "-n", ns, "--wait=true", "--timeout=60s")
    assert out.returncode == 0, out.stderr
    assert not lab.kubectl("get", "pvs", "-n", ns, "-o", "name").strip()


def test_programs_can_still_be_let_go(lab: Lab, release: Release, tokens: dict[str, Path],
                                      programs_ns: tuple[str, Path]) -> None:
    """The garbage collector (kube-controller-manager's own account) strips ownerReferences for
    an orphaning delete and removes the foregroundDeletion finalizer, both updates; an admin
    removes a finalizer nobody will remove. None changes a program, so the policy admits them."""
    ns, _ = programs_ns
    op = tokens["operator"]

    def owner(name: str) -> dict[str, Any]:
        lab.kubectl("create", "configmap", name, "-n", ns)
        uid = lab.kubectl_json("get", "configmap", name, "-n", ns)["metadata"]["uid"]
        return {"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": uid}

    def gone(kind: str, name: str) -> bool:
        return not lab.kubectl("get", kind, name, "-n", ns, "--ignore-not-found").strip()

    # Background delete of the owner: the GC deletes the program (a delete: not matched). The
    # GC watches a CRD's objects only from its next discovery sync (30 s) after the CRD came,
    # so this also waits until it watches ProxyVirtualServers.
    out = _kubectl_as(lab, op, "create", "-f", "-",
                      input=_program("child", ns, ownerReferences=[owner("o2")]))
    assert out.returncode == 0, out.stderr
    lab.kubectl("delete", "configmap", "o2", "-n", ns)
    lab.wait_until("the GC to delete the owned program", timeout=120, check=lambda: gone("pvs", "child"))
    # Orphaning delete of the owner: the GC patches the program's ownerReferences away.
    out = _kubectl_as(lab, op, "create", "-f", "-",
                      input=_program("orphan", ns, ownerReferences=[owner("o1")]))
    assert out.returncode == 0, out.stderr
    # The GC learns of dependents from its watch: an owner deleted before the program's event
    # reached it would just lose its orphan finalizer, with no update of the program.
    time.sleep(2)
    lab.kubectl("delete", "configmap", "o1", "-n", ns, "--cascade=orphan", "--wait=false")
    lab.wait_until("the orphaned owner to go (the GC updated the program)", timeout=90,
                   check=lambda: gone("configmap", "o1"))
    assert not lab.kubectl_json("get", "pvs", "orphan", "-n", ns)["metadata"].get("ownerReferences")
    # Foreground delete of the program: the GC removes its foregroundDeletion finalizer.
    lab.kubectl("delete", "pvs", "orphan", "-n", ns, "--cascade=foreground", "--wait=false")
    lab.wait_until("the program deleted in the foreground to go", timeout=90,
                   check=lambda: gone("pvs", "orphan"))

    # A finalizer no controller removes: an admin deletes and lets the program go, but cannot
    # change the program while it waits.
    out = _kubectl_as(lab, op, "create", "-f", "-",
                      input=_program("held", ns, finalizers=["svcproxy.io/e2e-hold"]))
    assert out.returncode == 0, out.stderr
    lab.kubectl("delete", "pvs", "held", "-n", ns, "--wait=false")
    out = _kubectl_as(lab, lab.kubeconfig, "patch", "pvs", "held", "-n", ns, "--type=merge",
                      "-p", '{"spec": {"mode": "userspace"}}')
    assert out.returncode != 0 and "may not change" in out.stderr, out.stderr
    out = _kubectl_as(lab, lab.kubeconfig, "patch", "pvs", "held", "-n", ns, "--type=json",
                      "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]')
    assert out.returncode == 0, out.stderr
    lab.wait_until("the held program to go", timeout=30, check=lambda: gone("pvs", "held"))


def test_program_policy_type_checks(lab: Lab, release: Release) -> None:
    """The API server type-checks the policy's expressions against the CRD's schema."""
    name = f"{release.name}-operator-writes-programs"

    def checked() -> dict[str, Any] | None:
        obj = lab.kubectl_json("get", "validatingadmissionpolicy", name)
        status = obj.get("status") or {}
        return status if status.get("observedGeneration") == obj["metadata"]["generation"] else None

    status = lab.wait_until(f"the type check of {name}", checked, timeout=60)
    assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status


# --- upgrade and uninstall ------------------------------------------------------------------------


def test_upgrade_then_uninstall_leaves_only_the_crds(lab: Lab, release: Release) -> None:
    rel = release
    rel.run("upgrade", rel.name, str(CHART), "--namespace", rel.namespace, "--reuse-values",
            "--set", "operator.replicas=1", "--set", "agent.logLevel=debug")
    dep = lab.kubectl_json("get", "deployment", rel.operator_sa, "-n", rel.namespace)
    assert dep["spec"]["replicas"] == 1
    ds = lab.kubectl_json("get", "daemonset", rel.agent_sa, "-n", rel.namespace)
    assert "--log-level=debug" in ds["spec"]["template"]["spec"]["containers"][0]["args"]
    # One replica needs no PodDisruptionBudget (it would block every drain).
    assert not lab.kubectl("get", "pdb", "-n", rel.namespace, "-o", "name").strip()
    history = rel.run("history", rel.name, "-n", rel.namespace, "-o", "json").stdout
    assert [h["revision"] for h in json.loads(history)] == [1, 2]

    rel.run("uninstall", rel.name, "--namespace", rel.namespace, "--wait")
    selector = f"app.kubernetes.io/instance={rel.name}"
    namespaced = "deployments,daemonsets,pods,services,serviceaccounts,poddisruptionbudgets,secrets"
    cluster = ("clusterroles,clusterrolebindings,validatingadmissionpolicies,"
               "validatingadmissionpolicybindings")
    lab.wait_until("the release's Pods to go",
                   lambda: not lab.kubectl("get", "pods", "-n", rel.namespace, "-l", selector,
                                           "-o", "name").strip(), timeout=120)
    left = lab.kubectl("get", namespaced, "-n", rel.namespace, "-l", selector, "-o", "name").strip()
    assert not left, f"left behind in {rel.namespace}: {left}"
    left = lab.kubectl("get", cluster, "-l", selector, "-o", "name").strip()
    assert not left, f"left behind cluster-wide: {left}"
    helm_secrets = lab.kubectl("get", "secrets", "-n", rel.namespace, "-l", f"owner=helm,name={rel.name}",
                               "-o", "name").strip()
    assert not helm_secrets, helm_secrets
    # What Helm documents: CRDs stay (deleting them would delete every user's policies).
    for crd in ("serviceproxypolicies.svcproxy.io", "proxynodes.svcproxy.io", "clusterkopfpeerings.kopf.dev"):
        lab.kubectl("get", "crd", crd)
