"""The agent's reading of traffic policies Local: one compiled program, and each node
marks its own endpoints local; the health check's count; other modes refuse them."""

from __future__ import annotations

from typing import Any

from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.agent.convert import to_program
from svcproxy.api import ProxyVirtualServer, ProxyVirtualServerSpec
from svcproxy.compile.program import compile_program

PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}
SLICES = [endpoint_slice([
    endpoint("10.244.1.2", node="node-1"), endpoint("10.244.1.3", node="node-1", ready=False),
    endpoint("10.244.1.4", node="node-1", ready=False, serving=True, terminating=True),
    endpoint("10.244.2.2", node="node-2"),
])]


def program(**spec: Any) -> ProxyVirtualServer:
    svc = service(type_="LoadBalancer", ports=[PORT])
    svc["spec"].update({"ipFamilies": ["IPv4"], **spec})
    compiled = compile_program(policy(spec={"services": ["web"], "mode": "iptables"}), svc, SLICES)
    assert isinstance(compiled, ProxyVirtualServerSpec), compiled
    return ProxyVirtualServer.parse({"metadata": {"name": "web", "namespace": "ns"}, "spec": compiled.wire()})


def _locals(pvs: ProxyVirtualServer, node: str) -> dict[str, tuple[str, list[str]]]:
    prog = to_program(pvs, node)
    assert not prog.error, prog.error
    return {vs.address: (vs.local_policy, [r.address for r in vs.real_servers if r.local])
            for vs in prog.by_mode["iptables"]}


def test_each_node_marks_its_own_endpoints_under_external_local() -> None:
    pvs = program(externalTrafficPolicy="Local", healthCheckNodePort=32100)
    assert _locals(pvs, "node-1") == {"0.0.0.0": ("external", ["10.244.1.2", "10.244.1.4"]),
                                      "10.96.0.10": ("", [])}
    assert _locals(pvs, "node-2") == {"0.0.0.0": ("external", ["10.244.2.2"]), "10.96.0.10": ("", [])}
    assert _locals(pvs, "node-3") == {"0.0.0.0": ("external", []), "10.96.0.10": ("", [])}
    # Every real server stays (the node's own traffic reaches all of them).
    assert len(to_program(pvs, "node-3").by_mode["iptables"][0].real_servers) == 3
    # The terminating one is draining: weight 0, local but no new connections.
    assert [r.weight for r in to_program(pvs, "node-1").by_mode["iptables"][0].real_servers] == [1, 0, 1]
    one, two, three = (to_program(pvs, n) for n in ("node-1", "node-2", "node-3"))
    assert (one.health_check_port, one.local_endpoints) == (32100, 1)  # ready only
    assert (two.local_endpoints, three.local_endpoints) == (1, 0)


def test_internal_local_marks_the_cluster_ip_only() -> None:
    pvs = program(internalTrafficPolicy="Local")
    assert _locals(pvs, "node-2") == {"0.0.0.0": ("", []), "10.96.0.10": ("internal", ["10.244.2.2"])}
    assert to_program(pvs, "node-2").health_check_port is None


def test_cluster_policies_mark_nothing_local() -> None:
    pvs = program()
    assert _locals(pvs, "node-1") == {"0.0.0.0": ("", []), "10.96.0.10": ("", [])}


def test_a_hand_written_local_policy_in_another_mode_is_an_error() -> None:
    wire = program(externalTrafficPolicy="Local").model_dump(by_alias=True, mode="json")
    wire["spec"]["virtualServers"][0]["mode"] = "ipvs"
    prog = to_program(ProxyVirtualServer.parse(wire), "node-1")
    assert prog.by_mode == {} and "iptables and userspace modes only, not ipvs" in prog.error
