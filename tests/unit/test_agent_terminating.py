"""Serving-terminating endpoints used when no endpoint is ready, per traffic scope, as
kube-proxy's CategorizeEndpoints does: the agent's choice (usable_endpoints and the
conversion), and what the iptables rules and the userspace balancer make of it."""

from __future__ import annotations

from typing import Any

from svcproxy.agent.convert import virtual_server
from svcproxy.api.program import RealServerSpec, VirtualServerSpec, usable_endpoints
from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.table import VirtualServer
from svcproxy.dataplane.userspace.balancer import Balancer

READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}
GONE = {"ready": False, "serving": False, "terminating": True}  # terminating, not serving
STARTING = {"ready": False, "serving": False, "terminating": False}


def rs(address: str, state: dict[str, bool], node: str = "node-2", weight: int = 1) -> RealServerSpec:
    return RealServerSpec(address=address, port=8080, weight=weight, node_name=node, **state)


def vs_spec(*reals: RealServerSpec, **extra: Any) -> VirtualServerSpec:
    fields: dict[str, Any] = {"address": "10.96.0.10", "port": 80, "mode": "iptables", **extra}
    return VirtualServerSpec(real_servers=list(reals), **fields)


def weights(vs: VirtualServer) -> dict[str, int]:
    return {r.address: r.weight for r in vs.real_servers}


def keys(*addresses: str) -> frozenset[tuple[str, int]]:
    return frozenset((a, 8080) for a in addresses)


def test_ready_endpoints_take_new_connections_terminating_ones_drain() -> None:
    reals = [rs("10.244.1.2", READY), rs("10.244.1.3", TERMINATING)]
    assert usable_endpoints(reals, [False, False]) == (keys("10.244.1.2"), frozenset())
    assert weights(virtual_server(vs_spec(*reals), "ns/web")) == {"10.244.1.2": 1, "10.244.1.3": 0}


def test_none_ready_the_serving_terminating_ones_take_their_compiled_weight() -> None:
    reals = [rs("10.244.1.2", TERMINATING, weight=3), rs("10.244.1.3", TERMINATING),
             rs("10.244.1.4", GONE), rs("10.244.1.5", STARTING)]
    assert usable_endpoints(reals, [False] * 4)[0] == keys("10.244.1.2", "10.244.1.3")
    vs = virtual_server(vs_spec(*reals), "ns/web")
    assert weights(vs) == {"10.244.1.2": 3, "10.244.1.3": 1}  # the unserving ones are left out
    assert not any(r.cluster_drain for r in vs.real_servers)


def test_none_at_all() -> None:
    reals = [rs("10.244.1.4", GONE), rs("10.244.1.5", STARTING)]
    assert usable_endpoints(reals, [False, False]) == (frozenset(), frozenset())
    assert usable_endpoints([], []) == (frozenset(), frozenset())
    vs = virtual_server(vs_spec(*reals), "ns/web")
    assert vs.real_servers == ()
    assert rules.reject_rule(vs) is not None  # refused, as before


def test_a_ready_endpoint_listed_twice_beside_its_terminating_copy_is_ready() -> None:
    reals = [rs("10.244.1.2", TERMINATING), rs("10.244.1.2", READY), rs("10.244.1.3", TERMINATING)]
    assert weights(virtual_server(vs_spec(*reals), "ns/web")) == {"10.244.1.2": 1, "10.244.1.3": 0}


def test_ready_again_takes_new_connections_alone() -> None:
    reals = [rs("10.244.1.2", TERMINATING), rs("10.244.1.3", READY)]
    assert weights(virtual_server(vs_spec(*reals), "ns/web")) == {"10.244.1.2": 0, "10.244.1.3": 1}


# Traffic policy Local: the node's own endpoints form their own scope.

LOCAL_T = rs("10.244.1.4", TERMINATING, node="node-1")
REMOTE_R = rs("10.244.2.2", READY, node="node-2")


def test_local_scope_uses_its_terminating_endpoint_though_a_remote_one_is_ready() -> None:
    # kube-proxy: no local endpoint ready -> the local serving-terminating ones, whatever
    # other nodes have; the cluster scope has a ready endpoint, so it skips the local one.
    cluster, local = usable_endpoints([LOCAL_T, REMOTE_R], [True, False])
    assert (cluster, local) == (keys("10.244.2.2"), keys("10.244.1.4"))


def test_external_local_outside_clients_get_the_terminating_local_pods_get_the_ready() -> None:
    vs = virtual_server(vs_spec(LOCAL_T, REMOTE_R, address="0.0.0.0", port=30080, address_type="NodePort",
                                traffic_policy="Local"), "ns/web", "node-1")
    local, remote = vs.real_servers
    assert [(r.address, r.weight, r.local, r.cluster_drain) for r in (local, remote)] == [
        ("10.244.1.4", 1, True, True), ("10.244.2.2", 1, False, False)]
    text = rules.service_rules(vs, ("10.244.0.0/16",), False)
    svc, clu = rules.service_chain(vs.key), rules.cluster_chain(vs.key)
    sep_local, sep_remote = (rules.endpoint_chain(vs.key, r) for r in (local, remote))
    assert f"-A {svc} -j {sep_local}" in text  # outside clients: this node's endpoint
    assert f"-A {clu} -j {sep_remote}" in text  # Pods and the node: the ready one only
    assert not any(line.startswith(f"-A {clu}") and sep_local in line for line in text)
    assert rules.reject_rule(vs) is None
    # Another node sees a remote terminating endpoint: drained there (its scopes have a
    # ready one, or no local one at all).
    other = virtual_server(vs_spec(LOCAL_T, REMOTE_R, address="0.0.0.0", port=30080,
                                   address_type="NodePort", traffic_policy="Local"), "ns/web", "node-2")
    assert weights(other) == {"10.244.1.4": 0, "10.244.2.2": 1}


def test_internal_local_uses_the_terminating_local_endpoint() -> None:
    vs = virtual_server(vs_spec(LOCAL_T, REMOTE_R, traffic_policy="Local"), "ns/web", "node-1")
    assert vs.local_policy == "internal"
    assert weights(vs) == {"10.244.1.4": 1, "10.244.2.2": 1}
    sep = rules.endpoint_chain(vs.key, vs.real_servers[0])
    assert f"-A {rules.service_chain(vs.key)} -j {sep}" in rules.service_rules(vs, ("10.244.0.0/16",), False)


def test_local_ready_endpoint_keeps_the_local_terminating_one_drained() -> None:
    local_r = rs("10.244.1.2", READY, node="node-1")
    vs = virtual_server(vs_spec(local_r, LOCAL_T, REMOTE_R, traffic_policy="Local"), "ns/web", "node-1")
    assert weights(vs) == {"10.244.1.2": 1, "10.244.1.4": 0, "10.244.2.2": 1}


def test_local_all_terminating_both_scopes_use_them() -> None:
    remote_t = rs("10.244.2.3", TERMINATING, node="node-2")
    vs = virtual_server(vs_spec(LOCAL_T, remote_t, address="0.0.0.0", port=30080, address_type="NodePort",
                                traffic_policy="Local"), "ns/web", "node-1")
    assert weights(vs) == {"10.244.1.4": 1, "10.244.2.3": 1}
    assert not any(r.cluster_drain for r in vs.real_servers)  # the cluster chain has both


def test_local_nothing_here_drops_while_terminating_ones_serve_elsewhere() -> None:
    remote_t = rs("10.244.2.3", TERMINATING, node="node-2")
    vs = virtual_server(vs_spec(remote_t, traffic_policy="Local"), "ns/web", "node-1")
    reject = rules.reject_rule(vs)
    assert reject is not None and reject.endswith("-j DROP")  # kube-proxy: endpoints exist elsewhere


def test_userspace_balancer_picks_the_serving_terminating_ones_when_none_is_ready() -> None:
    reals = [rs("10.244.1.2", TERMINATING), rs("10.244.1.3", GONE)]
    vs = virtual_server(vs_spec(*reals, mode="userspace"), "ns/web")
    assert Balancer(vs).candidates("10.0.0.1") == [("10.244.1.2", 8080)]
    reals = [rs("10.244.1.2", TERMINATING), rs("10.244.1.5", READY)]
    vs = virtual_server(vs_spec(*reals, mode="userspace"), "ns/web")
    assert Balancer(vs).candidates("10.0.0.1") == [("10.244.1.5", 8080)]
