"""Agents on lab nodes refuse ProxyVirtualServers they must not trust (issue #18).

The programs are written by hand as cluster admin (the lab has no admission policy
that keeps everyone but the operator out), against the real API server, with real
agents in the netns nodes (started by ``agents`` of test_agent.py). One program uses
a virtual IP that is not its Service's, another points a Service at a real server
outside every Pod CIDR and node address; a good Service is programmed beside them.
Checked: the refusal with its reason in every node's ProxyNode, no kernel state for
the refused programs (``iptables-save`` in the node netns), traffic from a client
netns to the good Service, none to the refused ones, and the refusal clearing when
the program is fixed. And a Node that goes and comes back: its ProxyNode (owned by the
Node) goes with it and is not recreated while the Node is gone; the re-registered Node
(a restarted lab kubelet) gets a new ProxyNode, owned by the new Node, with every program.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from conftest import Lab, wait_until
from test_agent import _answers, _echo_pods, _owned_rules, _proxynode, _pvs, _wait_applied, agents

from svcproxy_lab import traffic
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import LabNode

pytestmark = [pytest.mark.lab, pytest.mark.root]
__all__ = ["agents"]  # the fixture, shared with test_agent.py
FOREIGN_VIP = "10.96.250.8"  # in the service range, but no Service's address
OUTSIDE = "10.250.0.9"  # in no Pod CIDR (10.244.N.0/24) and no node address (172.29.0.N)


def _write(lab: Lab, namespace: str, name: str, *, vip: str, reals: list[str], h: str) -> None:
    lab.apply({"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
               "metadata": {"name": name},
               "spec": {"service": {"name": name}, "policy": {"name": "e2e"}, "mode": "iptables",
                        "contentHash": h,
                        "virtualServers": [{"address": vip, "port": 80, "protocol": "TCP",
                                            "mode": "iptables",
                                            "realServers": [{"address": a, "port": 80} for a in reals]}]}},
              namespace)


def _refusal(lab: Lab, node: str, owner: str) -> dict[str, Any] | None:
    errors = ((_proxynode(lab, node) or {}).get("status") or {}).get("errors") or []
    found = [e for e in errors if e.get("service") == owner and e.get("reason")]
    return found[0] if found else None


def _wait_refused(lab: Lab, nodes: list[str], owner: str, reason: str, address: str) -> None:
    for node in nodes:
        err = wait_until(f"{owner} refused ({reason}) on {node}",
                         lambda n=node: (e := _refusal(lab, n, owner)) and e["reason"] == reason and e,
                         timeout=30)
        assert address in err["message"], err


def _unreachable(lab: Lab, vip: str) -> None:
    with pytest.raises(traffic.TrafficError):
        lab.request("node-1", vip, 80, timeout=1)


def test_foreign_vip_and_foreign_real_server_are_refused_while_the_rest_is_programmed(
    lab: Lab, agents: dict[str, LabNode], namespace: str
) -> None:
    nodes = list(agents)
    good = _echo_pods(lab, namespace, "good", 2)
    good_vip = _pvs(lab, namespace, "good", "iptables", good, content_hash="good-1")
    _wait_applied(lab, nodes, f"{namespace}/good", "good-1")
    want = {p["metadata"]["name"] for p in good}

    # A program of a real Service, but with a virtual IP that is not the Service's.
    (evil_pod,) = _echo_pods(lab, namespace, "evil", 1)
    _write(lab, namespace, "evil", vip=FOREIGN_VIP, reals=[evil_pod["status"]["podIP"]],
           h=f"e-{uuid.uuid4().hex[:6]}")
    _wait_refused(lab, nodes, f"{namespace}/evil", "ForeignVIP", FOREIGN_VIP)

    # A Service programmed honestly first, then pointed at an address outside the Pods.
    (mine_pod,) = _echo_pods(lab, namespace, "mine", 1)
    mine_vip = _pvs(lab, namespace, "mine", "iptables", [mine_pod], content_hash="mine-1")
    _wait_applied(lab, nodes, f"{namespace}/mine", "mine-1")
    assert wait_until("mine answers", lambda: _answers(lab, mine_vip, 2) or None) == {"mine-0"}
    _write(lab, namespace, "mine", vip=mine_vip, reals=[OUTSIDE], h="mine-bad")
    _wait_refused(lab, nodes, f"{namespace}/mine", "ForeignRealServer", OUTSIDE)
    for node in nodes:
        wait_until(f"mine withdrawn from {node}'s report",
                   lambda n=node: f"{namespace}/mine" not in
                   (((_proxynode(lab, n) or {}).get("status") or {}).get("applied") or {}) or None)

    # The refused programs hold nothing in any node's kernel; the good one is there.
    for name, lab_node in agents.items():
        rules = "\n".join(_owned_rules(lab_node))
        assert FOREIGN_VIP not in rules and OUTSIDE not in rules and mine_vip not in rules, (name, rules)
        assert good_vip in rules, name
        assert f"{namespace}/evil" not in rules and f"{namespace}/mine" not in rules, (name, rules)
    assert wait_until("both good backends answer", lambda: _answers(lab, good_vip, 12) == want or None)
    _unreachable(lab, FOREIGN_VIP)
    _unreachable(lab, mine_vip)

    # Fixed, the program is trusted again and the refusal clears.
    _pvs(lab, namespace, "mine", "iptables", [mine_pod], content_hash="mine-2")
    _wait_applied(lab, nodes, f"{namespace}/mine", "mine-2")
    for node in nodes:
        assert _refusal(lab, node, f"{namespace}/mine") is None
    assert wait_until("mine answers again", lambda: _answers(lab, mine_vip, 2) or None) == {"mine-0"}
    assert _answers(lab, good_vip, 6) <= want


def _node_uid(lab: Lab, name: str) -> str | None:
    out = lab.kubectl("get", "node", name, "-o", "jsonpath={.metadata.uid}", check=False)
    return out.strip() or None


def _restart_kubelet(lab: Lab, name: str) -> None:
    """The lab kubelet registers its Node when it starts (a deleted Node stays deleted)."""
    assert lab.state_dir is not None
    cluster = LabCluster(lab.state_dir)
    state = cluster.load()
    assert state is not None
    (node,) = [n for n in cluster.nodes(state) if n.name == name]
    node.start_process("kubelet", cluster.kubelet_argv(cluster.context(state), node))


def test_a_deleted_node_takes_its_proxynode_and_back_gets_every_program(
    lab: Lab, agents: dict[str, LabNode], namespace: str
) -> None:
    lab.require_owned()  # deletes a Node of the lab
    name = "node-3"
    pods = _echo_pods(lab, namespace, "stay", 2)
    _pvs(lab, namespace, "stay", "iptables", pods, content_hash="stay-1")
    _wait_applied(lab, list(agents), f"{namespace}/stay", "stay-1")
    uid = _node_uid(lab, name)
    refs = (_proxynode(lab, name) or {})["metadata"].get("ownerReferences")
    assert refs == [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}]
    try:
        lab.kubectl("delete", "node", name)
        wait_until(f"the garbage collector to remove {name}'s ProxyNode",
                   lambda: _proxynode(lab, name) is None or None, timeout=60)
        # The agent still runs there, but leaves no ProxyNode that nothing owns.
        time.sleep(12)  # the report loop retries every 10 s
        assert _proxynode(lab, name) is None
        # A program changed while the Node is away: the Node gets it when it is back.
        _pvs(lab, namespace, "stay", "iptables", pods[:1], content_hash="stay-2")
    finally:
        _restart_kubelet(lab, name)
    new_uid = wait_until(f"{name} registered again", lambda: _node_uid(lab, name), timeout=60)
    assert new_uid != uid
    _wait_applied(lab, [name], f"{namespace}/stay", "stay-2")  # every program, as it is now
    refs = (_proxynode(lab, name) or {})["metadata"].get("ownerReferences")
    assert refs == [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": new_uid}]
    # Deleted while the agent runs (and its Node is there): it comes back at once.
    lab.kubectl("delete", "proxynode", name)
    wait_until(f"{name}'s ProxyNode recreated", lambda: _proxynode(lab, name), timeout=30)
    _wait_applied(lab, [name], f"{namespace}/stay", "stay-2")
