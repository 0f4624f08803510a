"""The chart's own Pods on real kubelets: the operator Deployment and the agent DaemonSet
run the images hack/images.sh built, and every node's agent reports a ProxyNode."""

from __future__ import annotations

from kindlib import Kind

NS = "svcproxy-system"


def _images(pod_spec: dict) -> set[str]:
    return {c["image"] for c in pod_spec["containers"]}


def test_operator_deployment_ready_with_built_image(kind: Kind) -> None:
    deploy = kind.json("get", "deploy", "-n", NS, "-l", "app.kubernetes.io/component=operator")
    [operator] = deploy["items"]
    assert operator["status"].get("readyReplicas") == operator["spec"]["replicas"] == 2
    built = (kind.kubeconfig.parent / "image-tag").read_text().strip()
    assert _images(operator["spec"]["template"]["spec"]) == {f"svcproxy-operator:{built}"}
    pods = kind.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=operator")
    assert len(pods["items"]) == 2
    for pod in pods["items"]:
        assert all(s["ready"] and "running" in s["state"] for s in pod["status"]["containerStatuses"])


def test_agent_daemonset_on_every_node_reports_proxynode(kind: Kind) -> None:
    nodes = {n["metadata"]["name"] for n in kind.json("get", "nodes")["items"]}
    assert len(nodes) == 3
    [ds] = kind.json("get", "ds", "-n", NS, "-l", "app.kubernetes.io/component=agent")["items"]
    assert ds["status"]["numberReady"] == ds["status"]["desiredNumberScheduled"] == 3
    built = (kind.kubeconfig.parent / "image-tag").read_text().strip()
    assert _images(ds["spec"]["template"]["spec"]) == {f"svcproxy-agent:{built}"}
    pods = kind.json("get", "pods", "-n", NS, "-l", "app.kubernetes.io/component=agent")["items"]
    assert {p["spec"]["nodeName"] for p in pods} == nodes
    kind.wait("a ProxyNode from every node", lambda: nodes <= {
        pn["metadata"]["name"] for pn in kind.json("get", "pn")["items"]
        if pn.get("status", {}).get("lastSyncTime")})
    # Each report has no IPVS: the kind nodes share this host's kernel, which has none.
    for pn in kind.json("get", "pn")["items"]:
        assert pn["status"]["capabilities"]["ipvs"] is False
