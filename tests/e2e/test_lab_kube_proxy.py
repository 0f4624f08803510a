"""The real kube-proxy runs in the lab's nodes and carries ClusterIP traffic to echo Pods.

kube-proxy is the peer of svcproxy's handover tests and of the benchmarks, so
the lab must run it for real: this starts it on every node of the session
lab, sends traffic to a ClusterIP from a client namespace, then stops it and
checks ``kube-proxy --cleanup`` took its Service rules away again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from svcproxy_lab import traffic
from svcproxy_lab.cluster import Lab as LabCluster

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab


def _service_rules(cluster: LabCluster, mode: str) -> list[str]:
    """kube-proxy's per-Service rules on every node, read back from the kernel."""
    state = cluster.load()
    assert state is not None
    found = []
    for node in cluster.nodes(state):
        if mode == "iptables":
            out = node.run(["iptables-save", "-t", "nat"]).stdout.decode()
            found += [f"{node.name}: {ln}" for ln in out.splitlines() if "KUBE-SVC-" in ln]
        else:
            out = node.run(["nft", "list", "tables"]).stdout.decode()
            found += [f"{node.name}: {ln}" for ln in out.splitlines() if "kube-proxy" in ln]
    return found


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_kube_proxy_balances_a_cluster_ip_over_echo_pods(
    lab: Lab, namespace: str, mode: str
) -> None:
    lab.require_local()
    assert lab.state_dir is not None
    cluster = LabCluster(lab.state_dir)
    lab.kubectl("create", "deployment", "web", "--image=svcproxy.io/echo", "--replicas=3",
                "-n", namespace)
    lab.kubectl("expose", "deployment", "web", "--port=80", "-n", namespace)

    def ready_pods() -> set[str] | None:
        pods: list[dict[str, Any]] = lab.pods(namespace, "app=web")
        names = {p["metadata"]["name"] for p in pods
                 if any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p["status"].get("conditions") or [])}
        return names if len(names) == 3 else None

    pods = lab.wait_until("3 Ready web Pods", ready_pods)
    cluster_ip = lab.kubectl("get", "service", "web", "-n", namespace,
                             "-o", "jsonpath={.spec.clusterIP}")
    cluster.start_kube_proxy(mode)
    try:
        def answer() -> str | None:
            try:
                return traffic.answered_by(lab.request("node-1", cluster_ip, 80, timeout=1))
            except traffic.TrafficError:
                return None

        lab.wait_until(f"kube-proxy ({mode}) to carry {cluster_ip}:80", answer)
        seen = [traffic.answered_by(lab.request("node-2", cluster_ip, 80)) for _ in range(30)]
        assert set(seen) <= pods, f"answers from Pods outside the Service: {set(seen) - pods}"
        assert len(set(seen)) >= 2, f"30 connections all went to {set(seen)}"
        assert _service_rules(cluster, mode), "no kube-proxy rules in the nodes' kernels"
    finally:
        cluster.stop_kube_proxy()
    assert _service_rules(cluster, mode) == []
    with pytest.raises(traffic.TrafficError):
        lab.request("node-1", cluster_ip, 80, timeout=1)
