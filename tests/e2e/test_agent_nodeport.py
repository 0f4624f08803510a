"""Node ports through real agents on the lab's netns nodes (iptables and userspace modes,
issue #14).

A Service of type NodePort (the API server allocates the node port) and a program
written by hand as the operator would compile it: its ClusterIP and its node port on
0.0.0.0. Checked: every node's agent trusts and applies it, a client namespace (no
default route) gets answers from both backends on every node's own address at the
node port, a program naming a node port that is not the Service's is refused
(ForeignNodePort) and holds nothing in any kernel, and withdrawing the program
closes the port again.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Lab, wait_until
from test_agent import _answers, _echo_pods, _owned_rules, _proxynode, _wait_applied, agents
from test_agent_refuse import _wait_refused

from svcproxy_lab import traffic
from svcproxy_lab.node import LabNode

pytestmark = [pytest.mark.lab, pytest.mark.root]
__all__ = ["agents"]  # the fixture, shared with test_agent.py


def _node_port_service(lab: Lab, namespace: str, app: str) -> dict[str, Any]:
    lab.apply({"apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
               "spec": {"type": "NodePort", "selector": {"app": app},
                        "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}}, namespace)
    svc: dict[str, Any] = lab.kubectl_json("get", "service", app, "-n", namespace)
    return svc


def _program(lab: Lab, namespace: str, svc: dict[str, Any], pods: list[dict[str, Any]], *,
             node_port: int, h: str, mode: str) -> None:
    app = svc["metadata"]["name"]
    reals = sorted(({"address": p["status"]["podIP"], "port": 80, "podName": p["metadata"]["name"],
                     "nodeName": p["spec"]["nodeName"]} for p in pods), key=lambda r: r["address"])
    common = {"protocol": "TCP", "mode": mode, "realServers": reals}
    lab.apply({"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
               "metadata": {"name": app},
               "spec": {"service": {"name": app}, "policy": {"name": "e2e"}, "mode": mode,
                        "contentHash": h,
                        "virtualServers": [
                            {"address": "0.0.0.0", "addressType": "NodePort", "port": node_port, **common},
                            {"address": svc["spec"]["clusterIP"], "port": 80, **common}]}}, namespace)


def _node_addresses(lab: Lab, names: list[str]) -> list[str]:
    nodes = lab.kubectl_json("get", "nodes")["items"]
    return [a["address"] for n in nodes if n["metadata"]["name"] in names
            for a in n["status"]["addresses"] if a["type"] == "InternalIP"]


def _refused_port(lab: Lab, address: str, port: int) -> bool:
    try:
        lab.request("node-1", address, port, timeout=2)
    except traffic.TrafficError:
        return True
    return False


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_node_port_answers_on_every_nodes_address(
    lab: Lab, agents: dict[str, LabNode], namespace: str, mode: str
) -> None:
    nodes = list(agents)
    pods = _echo_pods(lab, namespace, "np", 2)
    svc = _node_port_service(lab, namespace, "np")
    node_port = int(svc["spec"]["ports"][0]["nodePort"])
    want = {p["metadata"]["name"] for p in pods}
    _program(lab, namespace, svc, pods, node_port=node_port, h="np-1", mode=mode)
    _wait_applied(lab, nodes, f"{namespace}/np", "np-1")
    addresses = _node_addresses(lab, nodes)
    assert len(addresses) == len(nodes), addresses
    for address in addresses:
        got = wait_until(f"both backends on {address}:{node_port}",
                         lambda a=address: _answers_at(lab, a, node_port, 12) == want or None, timeout=30)
        assert got
    assert _answers(lab, svc["spec"]["clusterIP"], 6) <= want

    # Not the Service's node port: refused whole, nothing of it in any kernel.
    other = node_port + 1 if node_port < 32767 else node_port - 1
    _program(lab, namespace, svc, pods, node_port=other, h="np-bad", mode=mode)
    _wait_refused(lab, nodes, f"{namespace}/np", "ForeignNodePort", "is not a nodePort")
    for name, lab_node in agents.items():
        text = "\n".join(_owned_rules(lab_node))
        assert f"{namespace}/np" not in text, (name, text)
    assert wait_until("the node port closed", lambda: _refused_port(lab, addresses[0], node_port) or None)

    # Back to the honest program, then withdrawn: the port closes again.
    _program(lab, namespace, svc, pods, node_port=node_port, h="np-2", mode=mode)
    _wait_applied(lab, nodes, f"{namespace}/np", "np-2")
    assert wait_until("answers again", lambda: _answers_at(lab, addresses[-1], node_port, 6) <= want or None)
    lab.kubectl("delete", "pvs", "np", "-n", namespace)
    for node in nodes:
        wait_until(f"np withdrawn from {node}'s report",
                   lambda n=node: f"{namespace}/np" not in
                   (((_proxynode(lab, n) or {}).get("status") or {}).get("applied") or {}) or None)
    assert wait_until("the node port closed", lambda: _refused_port(lab, addresses[0], node_port) or None)


def _answers_at(lab: Lab, address: str, port: int, n: int) -> set[str]:
    out = set()
    for _ in range(n):
        try:
            out.add(traffic.answered_by(lab.request("node-1", address, port)))
        except traffic.TrafficError as err:
            out.add(f"error: {err}")
    return out
