"""The agent on lab nodes: ProxyVirtualServers written by hand, real traffic, real ProxyNodes.

The operator is not needed: each test writes ProxyVirtualServers pointing at
echo Pods (the Service exists only to hand out a ClusterIP; no kube-proxy
runs). Agents run inside the netns nodes (host kernel, no IPVS), started by
the ``agents`` fixture unless the lab already runs them. Traffic goes from
the client namespace behind a node to the VIP; the kernel state checked is
``iptables-save`` inside the node's namespace.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import REPO, Lab, svcproxy_cli, wait_until

from svcproxy_lab import traffic
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import LabNode

pytestmark = [pytest.mark.lab, pytest.mark.root]
ECHO = "svcproxy.io/echo"
FOREIGN_CHAIN = "E2E-FOREIGN"


class _Steady:
    """Requests to ``vip`` from node-1's client, one after another, each failure kept."""

    def __init__(self, lab: Lab, vip: str) -> None:
        self.lab, self.vip = lab, vip
        self.sent = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.worker = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.lab.request("node-1", self.vip, 80, timeout=2)
            except traffic.TrafficError as err:
                self.failures.append(str(err))
            self.sent += 1

    def wait_for_more(self, what: str, since: int | None = None) -> None:
        """Until three more requests went out (after ``since``, default now)."""
        mark = self.sent if since is None else since
        wait_until(what, lambda: self.sent >= mark + 3)

    def assert_no_failure(self) -> None:
        failed = self.failures
        assert failed == [], f"{len(failed)} of {self.sent} requests failed: {failed[:3]}"


@contextlib.contextmanager
def _steady_traffic(lab: Lab, vip: str) -> Iterator[_Steady]:
    steady = _Steady(lab, vip)
    steady.worker.start()
    try:
        yield steady
    finally:
        steady.stop.set()
        steady.worker.join(timeout=30)

def _nodes(lab: Lab) -> list[LabNode]:
    assert lab.state_dir is not None
    cluster = LabCluster(lab.state_dir)
    state = cluster.load()
    assert state is not None, f"no lab state in {lab.state_dir}"
    return [n for n in cluster.nodes(state) if not n.has_ipvs]


def _agent_argv(lab: Lab, node: LabNode, *extra: str) -> list[str]:
    assert lab.state_dir is not None
    kubeconfig = lab.state_dir / "pki" / "admin-node.kubeconfig"
    if not kubeconfig.exists():
        kubeconfig = lab.state_dir / "pki" / "admin.kubeconfig"
    return svcproxy_cli("agent", "--kubeconfig", str(kubeconfig), "--node-name", node.name,
                        *(extra or ("--full-sync-interval", "5")))


def _alive(node: LabNode) -> bool:
    alive = getattr(node, "process_alive", None)
    return bool(alive and alive("agent"))


@pytest.fixture(scope="module")
def agents(lab: Lab) -> Iterator[dict[str, LabNode]]:
    """CRDs applied and one agent per netns node (started here unless already running)."""
    lab.require_local()
    for mode in ("iptables", "userspace"):
        try:
            __import__(f"svcproxy.dataplane.{mode}.proxier")
        except ImportError:
            pytest.skip(f"the {mode} proxier (svcproxy.dataplane.{mode}) is not there yet")
    lab.kubectl("apply", "-f", str(REPO / "crds"))
    lab.wait_until("the ProxyVirtualServer CRD to be served",
                   lambda: lab.kubectl("get", "pvs", "-A", check=False) is not None
                   and "error" not in lab.kubectl("get", "pvs", "-A", check=False).lower())
    nodes = {n.name: n for n in _nodes(lab)}
    started = []
    for node in nodes.values():
        if not _alive(node):
            node.start_process("agent", _agent_argv(lab, node))
            started.append(node)
    for name in nodes:
        wait_until(f"the ProxyNode of {name} to be Ready", lambda n=name: _ready(lab, n), timeout=60)
    yield nodes
    for node in started:
        node.stop_process("agent")
        node.run(_agent_argv(lab, node, "--cleanup"), timeout=60)


def _proxynode(lab: Lab, node: str) -> dict[str, Any] | None:
    out = lab.kubectl("get", "proxynode", node, "-o", "json", check=False)
    if not out:
        return None
    obj: dict[str, Any] = json.loads(out)
    return obj


def _ready(lab: Lab, node: str) -> bool:
    pn = _proxynode(lab, node)
    conds = ((pn or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _echo_pods(lab: Lab, namespace: str, app: str, count: int) -> list[dict[str, Any]]:
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{app}-{i}", "labels": {"app": app}},
             "spec": {"nodeName": f"node-{i % 3 + 1}",
                      "containers": [{"name": "echo", "image": ECHO,
                                      "ports": [{"containerPort": 80}],
                                      "readinessProbe": {"tcpSocket": {"port": 80},
                                                         "periodSeconds": 1}}]}}
            for i in range(count)]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
           "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 80}]}}
    lab.apply([*pods, svc], namespace)

    def all_running() -> list[dict[str, Any]] | None:
        items = lab.pods(namespace, f"app={app}")
        ok = [p for p in items if p.get("status", {}).get("podIP")
              and any(c["type"] == "Ready" and c["status"] == "True"
                      for c in p["status"].get("conditions") or [])]
        return ok if len(ok) == count else None

    return wait_until(f"{count} {app} Pods Ready", all_running, timeout=90)


def _pvs(lab: Lab, namespace: str, app: str, mode: str, pods: list[dict[str, Any]], *,
         scheduler: str | None = "rr", content_hash: str | None = None) -> str:
    vip = lab.kubectl("get", "service", app, "-n", namespace, "-o", "jsonpath={.spec.clusterIP}")
    reals = sorted(({"address": p["status"]["podIP"], "port": 80, "podName": p["metadata"]["name"],
                     "nodeName": p["spec"]["nodeName"]} for p in pods), key=lambda r: r["address"])
    h = content_hash or uuid.uuid4().hex[:16]
    lab.apply({"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
               "metadata": {"name": app},
               "spec": {"service": {"name": app}, "policy": {"name": "e2e"}, "mode": mode,
                        "scheduler": scheduler, "contentHash": h,
                        "virtualServers": [{"address": vip, "port": 80, "protocol": "TCP",
                                            "mode": mode, "scheduler": scheduler,
                                            "realServers": reals}]}}, namespace)
    return vip


def _applied(lab: Lab, node: str, owner: str) -> str | None:
    pn = _proxynode(lab, node) or {}
    return ((pn.get("status") or {}).get("applied") or {}).get(owner)


def _wait_applied(lab: Lab, nodes: list[str], owner: str, content_hash: str) -> None:
    for node in nodes:
        wait_until(f"{owner} applied as {content_hash} on {node}",
                   lambda n=node: _applied(lab, n, owner) == content_hash, timeout=30)


def _answers(lab: Lab, vip: str, n: int, node: str = "node-1") -> set[str]:
    return {traffic.answered_by(lab.request(node, vip, 80)) for _ in range(n)}


def _owned_rules(node: LabNode) -> list[str]:
    out = node.run(["iptables-save", "-t", "nat"]).stdout.decode()
    return sorted(line for line in out.splitlines() if "SVCPROXY" in line and not line.startswith("#"))


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_pvs_carries_traffic_and_is_reported_applied(
    lab: Lab, agents: dict[str, LabNode], namespace: str, mode: str
) -> None:
    pods = _echo_pods(lab, namespace, "web", 2)
    vip = _pvs(lab, namespace, "web", mode, pods, content_hash="hash-one")
    _wait_applied(lab, list(agents), f"{namespace}/web", "hash-one")
    want = {p["metadata"]["name"] for p in pods}
    assert wait_until(f"both backends to answer on {vip} ({mode})",
                      lambda: _answers(lab, vip, 12) == want or None, timeout=30)
    # A new program replaces the applied hash; deletion removes the owner from the report.
    _pvs(lab, namespace, "web", mode, pods[:1], content_hash="hash-two")
    _wait_applied(lab, list(agents), f"{namespace}/web", "hash-two")
    assert _answers(lab, vip, 6) == {pods[0]["metadata"]["name"]}
    lab.kubectl("delete", "pvs", "web", "-n", namespace)
    for node in agents:
        wait_until(f"{namespace}/web gone from {node}'s report",
                   lambda n=node: _applied(lab, n, f"{namespace}/web") is None or None, timeout=30)
    with pytest.raises(traffic.TrafficError):
        lab.request("node-1", vip, 80, timeout=1)


def test_ipvs_service_on_a_node_without_ipvs_runs_in_iptables_and_says_so(
    lab: Lab, agents: dict[str, LabNode], namespace: str
) -> None:
    pods = _echo_pods(lab, namespace, "fast", 2)
    vip = _pvs(lab, namespace, "fast", "ipvs", pods, content_hash="ipvs-hash")
    _wait_applied(lab, list(agents), f"{namespace}/fast", "ipvs-hash")
    assert wait_until("both backends to answer through the fallback",
                      lambda: _answers(lab, vip, 12) == {p["metadata"]["name"] for p in pods} or None)
    for node in agents:
        status = (_proxynode(lab, node) or {})["status"]
        assert status["capabilities"]["ipvs"] is False
        fallback = [m for m in status["modes"] if m["requested"] == "ipvs"]
        assert fallback and fallback[0]["effective"] == "iptables" and fallback[0]["reason"]
        assert "iptables(ipvs)" in status["modesSummary"]
    assert any(vip in line for line in _owned_rules(agents["node-1"]))


def test_health_and_metrics_endpoints(agents: dict[str, LabNode]) -> None:
    node = agents["node-1"]
    script = ("import urllib.request as u;"
              "print(u.urlopen('http://127.0.0.1:9102/healthz').status);"
              "print(u.urlopen('http://127.0.0.1:9101/metrics').read().decode())")
    out = node.run([sys.executable, "-c", script]).stdout.decode()
    assert out.startswith("200")
    assert "svcproxy_network_programming_duration_seconds_bucket" in out
    assert "svcproxy_sync_duration_seconds_count" in out


def test_kill_9_and_restart_under_traffic_loses_nothing_and_keeps_foreign_rules(
    lab: Lab, agents: dict[str, LabNode], namespace: str
) -> None:
    node = agents["node-1"]
    if not hasattr(node, "process_alive"):
        pytest.skip("needs a node the test can restart the agent in")
    node.run(["iptables", "-t", "nat", "-N", FOREIGN_CHAIN])
    node.run(["iptables", "-t", "nat", "-A", FOREIGN_CHAIN, "-d", "10.96.250.250/32", "-j", "RETURN"])
    try:
        pods = _echo_pods(lab, namespace, "steady", 2)
        vip = _pvs(lab, namespace, "steady", "iptables", pods, content_hash="steady-1")
        _wait_applied(lab, ["node-1"], f"{namespace}/steady", "steady-1")
        wait_until("traffic on the VIP", lambda: _answers(lab, vip, 2) or None)
        rules_before = _owned_rules(node)
        with _steady_traffic(lab, vip) as steady:
            steady.wait_for_more("some traffic before the kill")
            node.stop_process("agent", signal.SIGKILL)
            assert not _alive(node)
            assert _owned_rules(node) == rules_before  # a dead agent leaves its rules in place
            steady.wait_for_more("traffic while the agent is down")
            node.start_process("agent", _agent_argv(lab, node))
            last = ((_proxynode(lab, "node-1") or {}).get("status") or {}).get("lastSyncTime")
            wait_until("the restarted agent's first sync to be reported",
                       lambda: ((_proxynode(lab, "node-1") or {}).get("status") or {})
                       .get("lastSyncTime") not in (None, last) and _ready(lab, "node-1"), timeout=60)
            steady.wait_for_more("traffic after the restart")
        steady.assert_no_failure()
        assert _owned_rules(node) == rules_before
        saved = node.run(["iptables-save", "-t", "nat"]).stdout.decode()
        assert f"-A {FOREIGN_CHAIN} -d 10.96.250.250/32 -j RETURN" in saved
    finally:
        node.run(["iptables", "-t", "nat", "-F", FOREIGN_CHAIN])
        node.run(["iptables", "-t", "nat", "-X", FOREIGN_CHAIN])


def test_cleanup_removes_only_owned_rules(lab: Lab, agents: dict[str, LabNode], namespace: str) -> None:
    node = agents["node-2"]
    if not hasattr(node, "process_alive"):
        pytest.skip("needs a node the test can restart the agent in")
    pods = _echo_pods(lab, namespace, "gone", 1)
    _pvs(lab, namespace, "gone", "iptables", pods, content_hash="gone-1")
    _wait_applied(lab, ["node-2"], f"{namespace}/gone", "gone-1")
    node.run(["iptables", "-t", "nat", "-N", FOREIGN_CHAIN])
    try:
        node.stop_process("agent")
        assert _owned_rules(node)
        proc = node.run(_agent_argv(lab, node, "--cleanup"), timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        assert _owned_rules(node) == []
        assert f":{FOREIGN_CHAIN}" in node.run(["iptables-save", "-t", "nat"]).stdout.decode()
    finally:
        node.run(["iptables", "-t", "nat", "-X", FOREIGN_CHAIN])
        node.start_process("agent", _agent_argv(lab, node))
        wait_until("node-2's agent back", lambda: _ready(lab, "node-2"), timeout=60)


def test_mode_change_of_a_live_service_under_traffic_loses_nothing(
    lab: Lab, agents: dict[str, LabNode], namespace: str
) -> None:
    pods = _echo_pods(lab, namespace, "moving", 2)
    vip = _pvs(lab, namespace, "moving", "iptables", pods, content_hash="move-1")
    _wait_applied(lab, list(agents), f"{namespace}/moving", "move-1")
    wait_until("traffic on the VIP", lambda: _answers(lab, vip, 2) or None)
    with _steady_traffic(lab, vip) as steady:
        for mode, h in (("userspace", "move-2"), ("iptables", "move-3"), ("userspace", "move-4")):
            mark = steady.sent
            _pvs(lab, namespace, "moving", mode, pods, content_hash=h)
            _wait_applied(lab, ["node-1"], f"{namespace}/moving", h)
            steady.wait_for_more(f"traffic after the switch to {mode}", since=mark)
            rules = _owned_rules(agents["node-1"])
            # Exactly one mode holds the VIP once the change is applied.
            in_portals = any(vip in r and "REDIRECT" in r for r in rules)
            assert in_portals == (mode == "userspace"), rules
    steady.assert_no_failure()
