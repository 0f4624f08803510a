"""The operator against a real API server: programs follow Deployments and policies,
conflicts are reported, ProxyNode reports drive Programmed, and deleting a policy
hands its Services back to kube-proxy before the program goes.

The operator runs as a subprocess (`svcproxy operator`); ProxyNode reports are
written by the test (agents are not started), as an agent would write them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import svcproxy_cli
from test_crd_validation import install_crds

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab
ECHO = "svcproxy.io/echo"
HANDOVER = "service.kubernetes.io/service-proxy-name"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Operator:
    def __init__(self, lab: Lab, log: Path) -> None:
        self.metrics_port, self.liveness_port = _free_port(), _free_port()
        self.log = log
        self.proc = subprocess.Popen(
            # Peering "svcproxy" with a high priority: an operator the lab started pauses meanwhile.
            svcproxy_cli(
                "operator",
                "--kubeconfig",
                str(lab.kubeconfig),
                "--peering",
                "svcproxy",
                "--priority",
                "100",
                "--metrics-port",
                str(self.metrics_port),
                "--liveness-port",
                str(self.liveness_port),
                "--handover-delay",
                "3",
            ),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def reconciles(self) -> float:
        for line in self.http(self.metrics_port, "/metrics").splitlines():
            if line.startswith('svcproxy_operator_reconciles_total{result="ok"}'):
                return float(line.split()[-1])
        return 0.0

    def http(self, port: int, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            body: bytes = resp.read()
            return body.decode()


@pytest.fixture(scope="module")
def operator(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    install_crds(lab)
    op = Operator(lab, tmp_path_factory.mktemp("operator") / "operator.log")
    try:
        lab.wait_until(
            "the operator's liveness endpoint", lambda: _try(lambda: op.http(op.liveness_port, "/healthz"))
        )
        yield op
        assert op.alive(), f"the operator died: {op.log.read_text()[-3000:]}"
        # Let the operator release its finalizers in the namespaces the tests deleted,
        # or they would stay Terminating in a shared lab.
        lab.wait_until(
            "policies being deleted to go",
            lambda: (
                not [
                    p
                    for p in lab.kubectl_json("get", "spp", "-A")["items"]
                    if p["metadata"].get("deletionTimestamp")
                ]
            ),
        )
    finally:
        op.proc.terminate()
        try:
            op.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            op.proc.kill()
        print(op.log.read_text()[-5000:])


def _try(fn: Any) -> Any:
    try:
        return fn() or True
    except OSError:
        return None


@pytest.fixture(scope="module")
def proxy_nodes(lab: Lab, operator: Operator) -> Iterator[list[str]]:
    """One ProxyNode per lab node (an agent's, or made here reporting nothing applied yet)."""
    existing = set(lab.kubectl("get", "proxynodes", "-o", "name").split())
    made = [n for n in lab.nodes if f"proxynode.svcproxy.io/{n}" not in existing]
    if len(made) != len(lab.nodes):
        pytest.skip("agents already report in this cluster; these tests write the reports themselves")
    for node in made:
        lab.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyNode", "metadata": {"name": node}}
            ),
        )
    yield lab.nodes
    if made:
        lab.kubectl("delete", "proxynodes", *made, "--ignore-not-found", check=False)


def report(lab: Lab, node: str, status: dict[str, Any]) -> None:
    lab.kubectl(
        "patch",
        "proxynode",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": {"nodeName": node, **status}}),
    )


def policy(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ServiceProxyPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def deploy_web(lab: Lab, namespace: str, replicas: int) -> None:
    lab.kubectl("create", "deployment", "web", f"--image={ECHO}", f"--replicas={replicas}", "-n", namespace)
    lab.kubectl("expose", "deployment", "web", "--port=80", "-n", namespace)


def pvs(lab: Lab, namespace: str, name: str = "web") -> dict[str, Any] | None:
    out = lab.kubectl("get", "pvs", name, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def real_server_ips(obj: dict[str, Any] | None) -> set[str]:
    if not obj:
        return set()
    return {rs["address"] for vs in obj["spec"]["virtualServers"] for rs in vs["realServers"]}


def condition(lab: Lab, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
    obj = lab.kubectl_json("get", "spp", name, "-n", namespace)
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), None)


def pod_ips(lab: Lab, namespace: str, count: int) -> set[str] | None:
    pods = [p for p in lab.pods(namespace, "app=web") if not p["metadata"].get("deletionTimestamp")]
    ready = [
        p
        for p in pods
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in p.get("status", {}).get("conditions") or []
        )
    ]
    return {p["status"]["podIP"] for p in ready} if len(ready) == count == len(pods) else None


def test_program_follows_pods_scale_and_scheduler(lab: Lab, namespace: str, operator: Operator) -> None:
    deploy_web(lab, namespace, 2)
    ips = lab.wait_until("2 ready web Pods", lambda: pod_ips(lab, namespace, 2))
    lab.apply(policy("web", {"services": ["web"], "ipvs": {"scheduler": "rr"}}), namespace)
    lab.wait_until(
        "a ProxyVirtualServer with the Pods' IPs", lambda: real_server_ips(pvs(lab, namespace)) == ips
    )
    obj = pvs(lab, namespace)
    assert obj is not None
    svc = lab.kubectl_json("get", "service", "web", "-n", namespace)
    assert obj["metadata"]["ownerReferences"][0]["uid"] == svc["metadata"]["uid"]
    (vs,) = obj["spec"]["virtualServers"]
    assert (vs["address"], vs["port"], vs["protocol"], vs["scheduler"]) == (
        svc["spec"]["clusterIP"],
        80,
        "TCP",
        "rr",
    )
    assert {rs["port"] for rs in vs["realServers"]} == {80}
    assert obj["spec"]["policy"]["name"] == "web"

    lab.kubectl("scale", "deployment", "web", "--replicas=3", "-n", namespace)
    three = lab.wait_until("3 ready web Pods", lambda: pod_ips(lab, namespace, 3))
    lab.wait_until("the program to list 3 Pods", lambda: real_server_ips(pvs(lab, namespace)) == three)

    lab.kubectl(
        "patch",
        "spp",
        "web",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"ipvs": {"scheduler": "wrr"}}}),
    )
    lab.wait_until(
        "the scheduler to follow",
        lambda: (pvs(lab, namespace) or {}).get("spec", {}).get("scheduler") == "wrr",
    )
    accepted = condition(lab, namespace, "web", "Accepted")
    assert accepted and accepted["status"] == "True"
    text = lab.kubectl("get", "pvs", "-n", namespace)
    assert svc["spec"]["clusterIP"] + ":80/TCP" in text and "3/3" in text
    metrics = operator.http(operator.metrics_port, "/metrics")
    assert 'svcproxy_operator_program_writes_total{op="create"}' in metrics

    # Nothing is rewritten when nothing changed: poke the namespace, wait for the operator
    # to have reconciled it again, and find the program and the policy untouched.
    lab.wait_until("status to settle", lambda: condition(lab, namespace, "web", "Accepted"))
    before = {
        k: lab.kubectl_json("get", k, "web", "-n", namespace)["metadata"]["resourceVersion"]
        for k in ("pvs", "spp")
    }
    seen = operator.reconciles()
    lab.kubectl("annotate", "service", "web", "-n", namespace, "e2e/poke=1")
    lab.wait_until("another reconcile", lambda: operator.reconciles() > seen)
    after = {
        k: lab.kubectl_json("get", k, "web", "-n", namespace)["metadata"]["resourceVersion"]
        for k in ("pvs", "spp")
    }
    assert after == before


def test_node_reports_drive_programmed_and_handover_then_delete_hands_back(
    lab: Lab, namespace: str, operator: Operator, proxy_nodes: list[str]
) -> None:
    deploy_web(lab, namespace, 2)
    lab.wait_until("2 ready web Pods", lambda: pod_ips(lab, namespace, 2))
    lab.apply(
        policy("web", {"services": ["web"], "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port"]}}),
        namespace,
    )
    obj = lab.wait_until(
        "a program with 2 endpoints",
        lambda: len(real_server_ips(pvs(lab, namespace))) == 2 and pvs(lab, namespace),
    )
    key = f"{namespace}/web"

    def reported(nodes: list[str], extra: dict[str, Any] | None = None) -> str:
        """Report the program's current content from ``nodes``, as their agents would."""
        digest: str = (pvs(lab, namespace) or obj)["spec"]["contentHash"]
        for node in nodes:
            report(lab, node, {"applied": {key: digest}, **(extra or {})})
        return digest

    expected = f"{len(proxy_nodes) - 1}/{len(proxy_nodes)}"
    try:
        lab.wait_until(
            "Programmed N-1/N",
            lambda: (
                reported(proxy_nodes[:-1])
                and lab.kubectl_json("get", "spp", "web", "-n", namespace).get("status", {}).get("programmed")
                == expected
            ),
        )
    except pytest.fail.Exception:
        print(lab.kubectl("get", "spp", "web", "-n", namespace, "-o", "yaml"))
        print(lab.kubectl("get", "proxynodes", "-o", "yaml"))
        raise
    assert condition(lab, namespace, "web", "Programmed")["status"] == "False"  # type: ignore[index]
    svc = lab.kubectl_json("get", "service", "web", "-n", namespace)
    assert HANDOVER not in svc["metadata"].get("labels", {}), "labelled before every node programmed it"

    fallback = {"modes": [{"requested": "ipvs", "effective": "iptables", "reason": "no IPVS"}]}
    lab.wait_until(
        "every node reporting the current program",
        lambda: (
            reported(proxy_nodes[-1:], fallback)
            and reported(proxy_nodes[:-1])
            and (condition(lab, namespace, "web", "Programmed") or {}).get("status") == "True"
        ),
    )
    lab.kubectl("wait", "--for=condition=Programmed", "spp/web", "-n", namespace, "--timeout=60s")
    lab.wait_until(
        "the handover label",
        lambda: (
            lab.kubectl_json("get", "service", "web", "-n", namespace)["metadata"]
            .get("labels", {})
            .get(HANDOVER)
            == "svcproxy"
        ),
    )
    degraded = lab.wait_until(
        "Degraded naming the node",
        lambda: (
            (condition(lab, namespace, "web", "Degraded") or {}).get("status") == "True"
            and condition(lab, namespace, "web", "Degraded")
        ),
    )
    assert proxy_nodes[-1] in degraded["message"] and "iptables" in degraded["message"]
    assert f"{len(proxy_nodes)}/{len(proxy_nodes)}" in lab.kubectl("get", "spp", "web", "-n", namespace)
    shown = subprocess.run(
        svcproxy_cli("status", "--kubeconfig", str(lab.kubeconfig), "-n", namespace),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert [
        namespace,
        "web",
        "ipvs",
        "sh",
        "True",
        "True",
        "False",
        "True",
        f"{len(proxy_nodes)}/{len(proxy_nodes)}",
    ] in rows
    assert any(r[:4] == [namespace, "web", "web", "Programmed"] for r in rows)
    assert any(r[:1] == [proxy_nodes[-1]] for r in rows)

    # Delete: the label goes first, the program only after the handover delay, then the policy.
    lab.kubectl("delete", "spp", "web", "-n", namespace, "--wait=false")
    seen: list[tuple[bool, bool]] = []

    def handed_back() -> bool:
        labels = lab.kubectl_json("get", "service", "web", "-n", namespace)["metadata"].get("labels", {})
        state = (HANDOVER in labels, pvs(lab, namespace) is not None)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == (False, False)

    lab.wait_until("label removed, then program deleted", handed_back)
    assert seen[0] in ((True, True), (False, True)) and (False, True) in seen, seen
    assert (True, False) not in seen, f"program deleted while still labelled: {seen}"
    lab.wait_until("the policy to go", lambda: not lab.kubectl("get", "spp", "-n", namespace, "-o", "name"))


def test_conflicting_policies_report_status_and_event(lab: Lab, namespace: str, operator: Operator) -> None:
    deploy_web(lab, namespace, 1)
    lab.apply(policy("first", {"services": ["web"], "ipvs": {"scheduler": "rr"}}), namespace)
    lab.wait_until(
        "the first policy's program",
        lambda: (pvs(lab, namespace) or {}).get("spec", {}).get("policy", {}).get("name") == "first",
    )
    lab.apply(
        policy("second", {"serviceSelector": {"matchLabels": {"app": "web"}}, "ipvs": {"scheduler": "lc"}}),
        namespace,
    )
    cond = lab.wait_until(
        "second to be Conflicted",
        lambda: (
            (condition(lab, namespace, "second", "Conflicted") or {}).get("status") == "True"
            and condition(lab, namespace, "second", "Conflicted")
        ),
    )
    # creationTimestamp has 1 s resolution: within one second the name decides (first < second).
    assert cond["message"] in (
        "Service web: policy first wins (same priority, older policy)",
        "Service web: policy first wins (same priority and age, name sorts first)",
    )
    assert (condition(lab, namespace, "first", "Conflicted") or {}).get("status") == "False"
    assert (pvs(lab, namespace) or {})["spec"]["scheduler"] == "rr"

    def event() -> list[dict[str, Any]]:
        items = lab.kubectl_json(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=second"
        )["items"]
        return [e for e in items if e["reason"] == "OtherPolicyWins"]

    ev = lab.wait_until("a Warning Event on the loser", event)[0]
    assert ev["type"] == "Warning" and "policy first wins" in ev["message"]

    lab.kubectl("patch", "spp", "second", "-n", namespace, "--type=merge", "-p", '{"spec": {"priority": 10}}')
    lab.wait_until(
        "second to win", lambda: (pvs(lab, namespace) or {}).get("spec", {}).get("scheduler") == "lc"
    )
    lab.wait_until(
        "first to be Conflicted",
        lambda: (
            "higher priority (10 > 0)"
            in ((condition(lab, namespace, "first", "Conflicted") or {}).get("message") or "")
        ),
    )


def test_garbage_gets_status_messages_not_a_crash(lab: Lab, namespace: str, operator: Operator) -> None:
    lab.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "ext", "labels": {"g": "1"}},
                "spec": {"type": "ExternalName", "externalName": "example.invalid"},
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "headless", "labels": {"g": "1"}},
                "spec": {"clusterIP": "None", "selector": {"app": "none"}},
            },
        ],
        namespace,
    )
    lab.apply(policy("garbage", {"serviceSelector": {"matchLabels": {"g": "1"}}}), namespace)
    lab.apply(
        policy("huge", {"serviceSelector": {"matchLabels": {f"k{i}": "v" for i in range(64)}}}), namespace
    )

    def rows() -> dict[str, Any] | None:
        status = lab.kubectl_json("get", "spp", "garbage", "-n", namespace).get("status") or {}
        got = {r["name"]: r for r in status.get("services", [])}
        return got if len(got) == 2 else None

    got = lab.wait_until("a row per Service", rows)
    assert got["ext"]["state"] == "NotProxied" and "DNS" in got["ext"]["message"]
    assert got["headless"]["state"] == "NotProxied" and "headless" in got["headless"]["message"]
    assert (condition(lab, namespace, "garbage", "Programmed") or {}).get("reason") == "NothingToProgram"
    lab.wait_until(
        "huge: no Services found",
        lambda: (condition(lab, namespace, "huge", "Accepted") or {}).get("reason") == "NoServicesFound",
    )
    assert not lab.kubectl("get", "pvs", "-n", namespace, "-o", "name")

    # A program edited by hand is put back.
    deploy_web(lab, namespace, 1)
    lab.apply(policy("web", {"services": ["web"]}), namespace)
    lab.wait_until("web's program", lambda: pvs(lab, namespace))
    lab.kubectl("patch", "pvs", "web", "-n", namespace, "--type=merge", "-p", '{"spec": {"scheduler": "lc"}}')
    lab.wait_until(
        "the edit to be undone", lambda: (pvs(lab, namespace) or {}).get("spec", {}).get("scheduler") == "rr"
    )
    assert operator.alive()


def _pod(name: str, labels: dict[str, str], drain: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": drain,
            "containers": [
                {
                    "name": "echo",
                    "image": ECHO,
                    "ports": [{"containerPort": 80}],
                    "env": [{"name": "SVCPROXY_ECHO_DRAIN_SECONDS", "value": str(drain)}],
                }
            ],
        },
    }


def weights_by_ip(obj: dict[str, Any] | None) -> dict[str, tuple[int, bool]]:
    if not obj:
        return {}
    return {
        rs["address"]: (rs["weight"], rs.get("terminating", False))
        for vs in obj["spec"]["virtualServers"]
        for rs in vs["realServers"]
    }


def test_weights_by_pod_labels_and_terminating_pods_drain(
    lab: Lab, namespace: str, operator: Operator
) -> None:
    deploy_web(lab, namespace, 1)
    lab.apply(_pod("canary", {"app": "web", "track": "canary"}, 60), namespace)
    lab.wait_until("2 ready Pods", lambda: pod_ips(lab, namespace, 2))
    canary_ip = lab.kubectl_json("get", "pod", "canary", "-n", namespace)["status"]["podIP"]
    weights = [{"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 5}]
    lab.apply(
        policy("web", {"services": ["web"], "ipvs": {"scheduler": "wrr"}, "weights": weights}), namespace
    )
    got = lab.wait_until(
        "canary weighing 5, the rest 1",
        lambda: (
            (w := weights_by_ip(pvs(lab, namespace))) and len(w) == 2 and w[canary_ip] == (5, False) and w
        ),
    )
    assert sorted(got.values()) == [(1, False), (5, False)]

    lab.kubectl("delete", "pod", "canary", "-n", namespace, "--wait=false")
    lab.wait_until(
        "the terminating canary kept with its weight (agents drain it: another Pod is ready)",
        lambda: weights_by_ip(pvs(lab, namespace)).get(canary_ip) == (5, True),
    )
    lab.kubectl("delete", "pod", "canary", "-n", namespace, "--grace-period=0", "--force", check=False)
    lab.wait_until(
        "the canary gone from the program",
        lambda: (w := weights_by_ip(pvs(lab, namespace))) and canary_ip not in w,
    )


def test_plan_prints_the_program_without_writing(
    lab: Lab, namespace: str, operator: Operator, tmp_path: Path
) -> None:
    deploy_web(lab, namespace, 2)
    ips = lab.wait_until("2 ready web Pods", lambda: pod_ips(lab, namespace, 2))
    lab.wait_until("the EndpointSlice", lambda: lab.endpoint_addresses(namespace, "web") == ips)
    doc = policy(
        "what-if",
        {
            "services": ["web"],
            "ipvs": {"scheduler": "mh", "schedulerFlags": ["sh-port"]},
            "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 60},
        },
    )
    doc["metadata"]["namespace"] = namespace
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(doc))
    proc = subprocess.run(
        svcproxy_cli("plan", "-f", str(path), "--kubeconfig", str(lab.kubeconfig)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    svc_ip = lab.kubectl_json("get", "service", "web", "-n", namespace)["spec"]["clusterIP"]
    assert f"TCP  {svc_ip}:80 mh (sh-port) persistent 60" in proc.stdout
    for ip in ips:
        assert any(line.split()[:3] == ["->", f"{ip}:80", "Masq"] for line in proc.stdout.splitlines()), ip
    assert not lab.kubectl("get", "spp,pvs", "-n", namespace, "-o", "name"), "plan wrote something"

    doc["spec"]["ipvs"]["scheduler"] = "rr"  # sh-port without sh/mh: refused before reading the cluster
    path.write_text(json.dumps(doc))
    bad = subprocess.run(
        svcproxy_cli("plan", "-f", str(path), "--kubeconfig", str(lab.kubeconfig)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "schedulerFlags are valid only with scheduler sh or mh" in bad.stderr


# A Node with no agent report: made here with no kubelet behind it, tainted and
# unschedulable so no Pod of another test lands on it, deleted at the end.
@pytest.fixture
def ghost_node(lab: Lab) -> Iterator[str]:
    name = f"ghost-{uuid.uuid4().hex[:6]}"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"e2e/ghost": "true"}},
        "spec": {
            "unschedulable": True,
            "taints": [{"key": "e2e/ghost", "value": "true", "effect": "NoSchedule"}],
        },
    }
    lab.kubectl("create", "-f", "-", input=json.dumps(node))
    try:
        yield name
    finally:
        lab.kubectl("delete", "node", name, "--ignore-not-found", check=False)


def _programmed(lab: Lab, namespace: str) -> tuple[str, str, str]:
    obj = lab.kubectl_json("get", "spp", "web", "-n", namespace)
    cond = condition(lab, namespace, "web", "Programmed") or {}
    return (
        str(cond.get("status")),
        str(cond.get("message")),
        str((obj.get("status") or {}).get("programmed")),
    )


def test_a_ready_node_without_an_agent_report_holds_programmed(
    lab: Lab, namespace: str, operator: Operator, proxy_nodes: list[str], ghost_node: str
) -> None:
    deploy_web(lab, namespace, 1)
    lab.wait_until("1 ready web Pod", lambda: pod_ips(lab, namespace, 1))
    lab.apply(policy("web", {"services": ["web"], "ipvs": {"scheduler": "rr"}}), namespace)
    key = f"{namespace}/web"

    def all_report() -> bool:
        digest: Any = ((pvs(lab, namespace) or {}).get("spec") or {}).get("contentHash")
        if not digest:
            return False
        for node in proxy_nodes:
            report(lab, node, {"applied": {key: digest}})
        return True

    n = len(proxy_nodes)
    lab.wait_until(
        f"Programmed {n}/{n} before the new Node is Ready",
        lambda: all_report() and _programmed(lab, namespace)[::2] == ("True", f"{n}/{n}"),
    )
    # The Node turns Ready as a kubelet would say it; nobody reports a program for it.
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}
    lab.kubectl("patch", "node", ghost_node, "--subresource=status", "--type=merge", "-p", json.dumps(ready))
    _, message, count = lab.wait_until(
        "Programmed False naming the silent node",
        lambda: _programmed(lab, namespace)[0] == "False" and _programmed(lab, namespace),
    )
    assert f"no agent report from {ghost_node}" in message
    assert count == f"{n}/{n + 1}"

    lab.kubectl("delete", "node", ghost_node)
    lab.wait_until(
        "Programmed True again once the Node is gone",
        lambda: _programmed(lab, namespace)[::2] == ("True", f"{n}/{n}"),
    )
