"""The lab behaves like a cluster: real API and controllers, nodes, pods, probes, traffic.

Every assertion reads real API objects or real answers from echo servers, sent
from a client network namespace (never the root namespace).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from svcproxy_lab import traffic

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab

ECHO = "svcproxy.io/echo"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")


def _ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def _index(node_name: str) -> int:
    return int(node_name.rsplit("-", 1)[1])


def echo_pod(name: str, *, probe: dict[str, Any] | None = None,
             env: dict[str, str] | None = None, grace: int | None = None,
             labels: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "echo", "image": ECHO,
        "ports": [{"containerPort": 80}, {"containerPort": 80, "protocol": "UDP"}],
    }
    if probe:
        container["readinessProbe"] = probe
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    spec: dict[str, Any] = {"containers": [container]}
    if grace is not None:
        spec["terminationGracePeriodSeconds"] = grace
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {"app": name}}, "spec": spec}


def service(name: str, selector: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": selector, "ports": [{"port": 80, "targetPort": 80}]}}


def test_server_version_is_pinned(lab: Lab) -> None:
    lab.require_local()  # another cluster runs whatever version it runs
    version = lab.kubectl_json("version")
    assert version["serverVersion"]["gitVersion"] == "v1.36.3"
    assert version["clientVersion"]["gitVersion"] == "v1.36.3"


def test_nodes_are_ready_with_their_pod_cidrs(lab: Lab) -> None:
    nodes = {n["metadata"]["name"]: n for n in lab.kubectl_json("get", "nodes")["items"]}
    assert set(lab.nodes) <= set(nodes)
    if lab.local:
        for name in lab.nodes:
            assert nodes[name]["spec"]["podCIDR"] == f"10.244.{_index(name)}.0/24"
            addresses = {a["type"]: a["address"] for a in nodes[name]["status"]["addresses"]}
            assert addresses["InternalIP"] == f"172.29.0.{10 + _index(name)}"


def test_deployment_pods_endpointslice_and_scale_down(lab: Lab, namespace: str) -> None:
    lab.kubectl("create", "deployment", "web", f"--image={ECHO}", "--replicas=3", "-n", namespace)
    lab.kubectl("expose", "deployment", "web", "--port=80", "-n", namespace)

    def three_ready() -> list[dict[str, Any]] | None:
        pods = [p for p in lab.pods(namespace, "app=web")
                if not p["metadata"].get("deletionTimestamp")]
        return pods if len(pods) == 3 and all(_ready(p) for p in pods) else None

    pods = lab.wait_until("3 Ready web Pods", three_ready)
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 3, f"Pod IPs are not distinct: {ips}"
    assert len({p["spec"]["nodeName"] for p in pods}) >= 2, "the scheduler did not spread Pods"
    if lab.local:
        for p in pods:
            ip = ipaddress.ip_address(p["status"]["podIP"])
            assert ip in ipaddress.ip_network(f"10.244.{_index(p['spec']['nodeName'])}.0/24")
    lab.wait_until("the EndpointSlice to list exactly the Pod IPs",
               lambda: lab.endpoint_addresses(namespace, "web") == ips)
    assert lab.endpoint_addresses(namespace, "web", ready=False) <= ips

    lab.kubectl("scale", "deployment", "web", "--replicas=1", "-n", namespace)

    def one_left() -> set[str] | None:
        pods = lab.pods(namespace, "app=web")
        return {p["status"]["podIP"] for p in pods} if len(pods) == 1 else None

    left = lab.wait_until("scale-down to one Pod", one_left, timeout=120)
    assert left <= ips
    lab.wait_until("the EndpointSlice to list only the remaining Pod",
               lambda: lab.endpoint_addresses(namespace, "web", ready=None) == left)


def test_failing_readiness_probe_is_not_ready(lab: Lab, namespace: str) -> None:
    # Port 81 has no listener: every probe fails, so the Pod never becomes Ready.
    probe = {"httpGet": {"path": "/healthz", "port": 81}, "periodSeconds": 1}
    lab.apply([echo_pod("sick", probe=probe), service("sick", {"app": "sick"})], namespace)

    def listed_unready() -> dict[str, Any] | None:
        pod = lab.kubectl_json("get", "pod", "sick", "-n", namespace)
        running = pod["status"].get("phase") == "Running" and pod["status"].get("podIP")
        listed = lab.endpoint_addresses(namespace, "sick", ready=False)
        return pod if running and pod["status"]["podIP"] in listed else None

    pod = lab.wait_until("the sick Pod to run and be listed as not ready", listed_unready)
    assert not _ready(pod)
    assert pod["status"]["containerStatuses"][0]["ready"] is False
    assert lab.endpoint_addresses(namespace, "sick", ready=True) == set()


def test_pod_can_be_made_unready_and_ready_at_runtime(lab: Lab, namespace: str) -> None:
    lab.require_local()
    probe = {"httpGet": {"path": "/healthz", "port": 80}, "periodSeconds": 1,
             "failureThreshold": 1}
    lab.apply([echo_pod("flip", probe=probe), service("flip", {"app": "flip"})], namespace)
    pod = lab.wait_until("the flip Pod to be Ready",
                     lambda: (p := lab.kubectl_json("get", "pod", "flip", "-n", namespace))
                     and _ready(p) and p)
    ip, node = pod["status"]["podIP"], pod["spec"]["nodeName"]
    lab.wait_until("flip listed ready", lambda: lab.endpoint_addresses(namespace, "flip") == {ip})
    lab.set_ready(node, ip, 80, False)
    lab.wait_until("flip listed not ready",
               lambda: lab.endpoint_addresses(namespace, "flip", ready=False) == {ip})
    lab.set_ready(node, ip, 80, True)
    lab.wait_until("flip listed ready again",
               lambda: lab.endpoint_addresses(namespace, "flip") == {ip})


def test_traffic_from_a_client_namespace_reaches_a_pod_on_another_node(
    lab: Lab, namespace: str
) -> None:
    lab.require_local()
    lab.apply(echo_pod("far"), namespace)
    pod = lab.wait_until("the far Pod to be Ready",
                     lambda: (p := lab.kubectl_json("get", "pod", "far", "-n", namespace))
                     and _ready(p) and p)
    ip, pod_node = pod["status"]["podIP"], pod["spec"]["nodeName"]
    client_node = next(n for n in lab.nodes if n != pod_node)
    client_ip = f"10.244.{_index(client_node)}.254"
    for proto in ("tcp", "udp"):
        answer = lab.request(client_node, ip, 80, proto)
        name, peer = answer.split()
        assert name == "far", f"{proto} answer {answer!r} is not from the far Pod"
        assert peer.split(":")[0] == client_ip, f"the Pod saw {peer}, not the client address"
    http = lab.request(client_node, ip, 80, "http")
    assert http.startswith("200 far ")
    assert traffic.answered_by(http) == "far"


def test_other_images_wait_with_a_clear_reason(lab: Lab, namespace: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nginx"},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}}
    lab.apply(manifest, namespace)

    def waiting() -> dict[str, Any] | None:
        status = lab.kubectl_json("get", "pod", "nginx", "-n", namespace)["status"]
        states = status.get("containerStatuses") or [{}]
        return states[0].get("state", {}).get("waiting")

    state = lab.wait_until("the nginx Pod's waiting reason", waiting)
    assert state["reason"] == "ImageNotSupported"
    assert ECHO in state["message"]
    status = lab.kubectl_json("get", "pod", "nginx", "-n", namespace)["status"]
    assert status["phase"] == "Pending"


def test_deleted_pod_serves_through_its_grace_period_then_goes(lab: Lab, namespace: str) -> None:
    lab.require_local()
    assert lab.state_dir is not None
    # The echo keeps serving after SIGTERM for longer than this test waits; it ends when
    # the test kills the echo process, which must end the Pod's termination at once.
    pod = echo_pod("slow", env={"SVCPROXY_ECHO_DRAIN_SECONDS": "300"}, grace=300)
    lab.apply(pod, namespace)
    ready = lab.wait_until("the slow Pod to be Ready",
                           lambda: (p := lab.kubectl_json("get", "pod", "slow", "-n", namespace))
                           and _ready(p) and p)
    ip, node, uid = ready["status"]["podIP"], ready["spec"]["nodeName"], ready["metadata"]["uid"]
    lab.kubectl("delete", "pod", "slow", "-n", namespace, "--wait=false")
    terminating = lab.kubectl_json("get", "pod", "slow", "-n", namespace)
    assert terminating["metadata"].get("deletionTimestamp"), "the Pod vanished at once"
    assert lab.request(node, ip, 80).split()[0] == "slow", "a terminating Pod stopped serving"
    lab.wait_until("the slow endpoint's echo to have had SIGTERM",
                   lambda: "SIGTERM" in _pod_log(lab.state_dir, node, uid))
    assert lab.request(node, ip, 80).split()[0] == "slow", "the draining echo stopped serving"
    assert lab.kubectl("get", "pod", "slow", "-n", namespace, "--ignore-not-found")

    record = json.loads((lab.state_dir / "nodes" / node / "pods" / f"{uid}.json").read_text())
    os.kill(record["pid"], signal.SIGKILL)
    lab.wait_until("the slow Pod to be gone once its echo exited",
                   lambda: not lab.kubectl("get", "pod", "slow", "-n", namespace,
                                           "--ignore-not-found"))
    with pytest.raises(traffic.TrafficError):
        lab.request(node, ip, 80, timeout=1)


def _pod_log(state_dir: Path, node: str, uid: str) -> str:
    try:
        return (state_dir / "nodes" / node / "pods" / f"{uid}.log").read_text()
    except OSError:
        return ""


def test_kubelet_restart_adopts_running_pods(lab: Lab, namespace: str) -> None:
    lab.require_local()
    from svcproxy_lab.cluster import Lab as LabCluster

    lab.apply(echo_pod("keep"), namespace)
    before = lab.wait_until("the keep Pod to be Ready",
                        lambda: (p := lab.kubectl_json("get", "pod", "keep", "-n", namespace))
                        and _ready(p) and p)
    node_name = before["spec"]["nodeName"]
    assert lab.state_dir is not None
    cluster = LabCluster(lab.state_dir)
    state = cluster.load()
    assert state is not None
    node = next(n for n in cluster.nodes(state) if n.name == node_name)
    node.start_process("kubelet", cluster.kubelet_argv(cluster.context(state), node))
    answer_before = lab.request(node_name, before["status"]["podIP"], 80)
    after = lab.kubectl_json("get", "pod", "keep", "-n", namespace)
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["status"]["podIP"] == before["status"]["podIP"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert answer_before.split()[0] == "keep"
    # The restarted kubelet still manages the Pod: deleting it is carried out.
    lab.kubectl("delete", "pod", "keep", "-n", namespace, "--wait=false")
    lab.wait_until("the keep Pod to be gone after the kubelet restart",
               lambda: not lab.kubectl("get", "pod", "keep", "-n", namespace,
                                       "--ignore-not-found"))
