"""compile_program for what a Service offers beyond its ClusterIPs: external IPs,
load-balancer ingress IPs and node ports (iptables and userspace modes), and what stays
refused (ipvs mode, and the fields no mode serves yet)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.api import ProxyVirtualServer, ProxyVirtualServerSpec
from svcproxy.api.program import VirtualServerSpec
from svcproxy.compile.program import NotProxied, compile_program
from svcproxy.controller.cache import service_summary

IPTABLES = {"services": ["web"], "mode": "iptables"}
PORTS = [
    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353, "nodePort": 30053},
]
SLICES = [
    endpoint_slice(
        [endpoint("10.244.1.2")],
        ports=[{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "dns", "port": 5353, "protocol": "UDP"}],
    ),
    endpoint_slice([endpoint("fd00:244::2")], ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
                   address_type="IPv6", name="web-v6"),
]


def _rows(result: ProxyVirtualServerSpec | NotProxied) -> list[tuple[str, str, int, str, list[str]]]:
    assert isinstance(result, ProxyVirtualServerSpec), result
    return [
        (vs.address_type, vs.address, vs.port, vs.protocol,
         [f"{r.address}:{r.port}" for r in vs.real_servers])
        for vs in result.virtual_servers
    ]


def _load_balancer(ingress: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    svc = service(type_="LoadBalancer", ports=[PORTS[0]])
    svc["spec"].update(spec)
    svc["status"] = {"loadBalancer": {"ingress": ingress}}
    return svc


def test_node_port_service_gets_node_port_virtual_servers_per_port() -> None:
    svc = service(type_="NodePort", ports=PORTS)
    svc["spec"]["ipFamilies"] = ["IPv4"]
    assert _rows(compile_program(policy(spec=IPTABLES), svc, SLICES)) == [
        ("NodePort", "0.0.0.0", 30053, "UDP", ["10.244.1.2:5353"]),
        ("NodePort", "0.0.0.0", 30080, "TCP", ["10.244.1.2:8080"]),
        ("ClusterIP", "10.96.0.10", 53, "UDP", ["10.244.1.2:5353"]),
        ("ClusterIP", "10.96.0.10", 80, "TCP", ["10.244.1.2:8080"]),
    ]


def test_dual_stack_node_port_listens_on_both_families() -> None:
    svc = service(type_="NodePort", ports=[PORTS[0]], cluster_ips=["10.96.0.10", "fd00::10"])
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    rows = _rows(compile_program(policy(spec=IPTABLES), svc, SLICES))
    assert ("NodePort", "0.0.0.0", 30080, "TCP", ["10.244.1.2:8080"]) in rows
    assert ("NodePort", "::", 30080, "TCP", ["fd00:244::2:8080"]) in rows
    # Without ipFamilies the ClusterIPs' families decide.
    del svc["spec"]["ipFamilies"]
    rows = _rows(compile_program(policy(spec=IPTABLES), svc, SLICES))
    assert {r[1] for r in rows if r[0] == "NodePort"} == {"0.0.0.0", "::"}


def test_external_ips_are_virtual_servers_like_the_cluster_ip() -> None:
    svc = service(ports=[PORTS[0] | {"nodePort": None}])
    svc["spec"]["externalIPs"] = ["192.0.2.7", "2001:db8:0::7", "192.0.2.7", "10.96.0.10", "127.0.0.1"]
    assert _rows(compile_program(policy(spec=IPTABLES), svc, SLICES)) == [
        ("ClusterIP", "10.96.0.10", 80, "TCP", ["10.244.1.2:8080"]),
        ("ExternalIP", "192.0.2.7", 80, "TCP", ["10.244.1.2:8080"]),
        ("ExternalIP", "2001:db8::7", 80, "TCP", ["fd00:244::2:8080"]),
    ]


def test_load_balancer_ingress_ips_in_vip_mode_only() -> None:
    svc = _load_balancer([{"ip": "198.51.100.3"}, {"ip": "198.51.100.4", "ipMode": "VIP"},
                          {"ip": "198.51.100.5", "ipMode": "Proxy"}, {"hostname": "lb.example"}])
    rows = _rows(compile_program(policy(spec=IPTABLES), svc, SLICES))
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("NodePort", "0.0.0.0", 30080),
        ("ClusterIP", "10.96.0.10", 80),
        ("LoadBalancerIP", "198.51.100.3", 80),
        ("LoadBalancerIP", "198.51.100.4", 80),
    ]
    # Ingress IPs count only for type LoadBalancer; a port without nodePort gets none.
    svc["spec"]["type"] = "ClusterIP"
    svc["spec"]["ports"] = [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
    assert [r[0] for r in _rows(compile_program(policy(spec=IPTABLES), svc, SLICES))] == ["ClusterIP"]


def test_compiled_node_port_program_passes_the_api_models_rules() -> None:
    svc = _load_balancer([{"ip": "198.51.100.3"}])
    svc["spec"]["externalIPs"] = ["192.0.2.7"]
    prog = compile_program(policy(spec=IPTABLES), svc, SLICES)
    assert isinstance(prog, ProxyVirtualServerSpec)
    obj = {"metadata": {"name": "web", "namespace": "ns"}, "spec": prog.wire()}
    again = ProxyVirtualServer.parse(obj)  # validates every CEL rule, as an agent does
    assert [vs.address_type for vs in again.spec.virtual_servers] == [
        "NodePort", "ClusterIP", "ExternalIP", "LoadBalancerIP"]


@pytest.mark.parametrize(
    ("kind", "external", "words"),
    [("NodePort", None, "type NodePort"), ("LoadBalancer", None, "type LoadBalancer"),
     ("ClusterIP", ["192.0.2.7"], "spec.externalIPs")],
)
def test_ipvs_mode_leaves_external_surfaces_to_kube_proxy(
    kind: str, external: list[str] | None, words: str
) -> None:
    svc = service(type_=kind, ports=[PORTS[0]])
    if external:
        svc["spec"]["externalIPs"] = external
    why = compile_program(policy(spec={"services": ["web"], "mode": "ipvs"}), svc, SLICES)
    assert isinstance(why, NotProxied) and why.reason == "Unsupported"
    assert words in why.message and "mode is ipvs" in why.message and "kube-proxy keeps" in why.message
    assert "iptables and userspace modes only" in why.message


def test_userspace_mode_serves_node_ports_external_and_load_balancer_ips() -> None:
    svc = _load_balancer([{"ip": "198.51.100.3"}], ipFamilies=["IPv4"])
    svc["spec"]["externalIPs"] = ["192.0.2.7"]
    prog = compile_program(policy(spec={"services": ["web"], "mode": "userspace"}), svc, SLICES)
    assert [(r[0], r[1], r[2]) for r in _rows(prog)] == [
        ("NodePort", "0.0.0.0", 30080),
        ("ClusterIP", "10.96.0.10", 80),
        ("ExternalIP", "192.0.2.7", 80),
        ("LoadBalancerIP", "198.51.100.3", 80),
    ]
    assert isinstance(prog, ProxyVirtualServerSpec)
    assert {vs.mode for vs in prog.virtual_servers} == {"userspace"}
    # externalTrafficPolicy Local too: every address but the ClusterIP says so.
    svc["spec"]["externalTrafficPolicy"] = "Local"
    local = compile_program(policy(spec={"services": ["web"], "mode": "userspace"}), svc, SLICES)
    assert isinstance(local, ProxyVirtualServerSpec)
    assert [(vs.address_type, vs.traffic_policy) for vs in local.virtual_servers] == [
        ("NodePort", "Local"), ("ClusterIP", None), ("ExternalIP", "Local"), ("LoadBalancerIP", "Local")]


@pytest.mark.parametrize(
    ("address", "kind", "ok"),
    [("0.0.0.0", "NodePort", True), ("::", "NodePort", True), ("10.96.0.10", "ClusterIP", True),
     ("0.0.0.0", "ClusterIP", False), ("::", "ExternalIP", False), ("10.96.0.10", "NodePort", False)],
)
def test_node_port_address_goes_with_address_type_node_port(address: str, kind: str, ok: bool) -> None:
    raw = {"address": address, "addressType": kind, "port": 30080}
    if ok:
        assert VirtualServerSpec.model_validate(raw).address == address
    else:
        with pytest.raises(ValidationError, match="goes with addressType NodePort"):
            VirtualServerSpec.model_validate(raw)


def test_the_operators_service_cache_keeps_what_compile_serves() -> None:
    svc = _load_balancer([{"ip": "198.51.100.3", "ipMode": "VIP"}], externalIPs=["192.0.2.7"])
    svc["status"]["conditions"] = [{"type": "x"}]
    kept = service_summary(svc)
    assert kept["status"] == {"loadBalancer": {"ingress": [{"ip": "198.51.100.3", "ipMode": "VIP"}]}}
    assert kept["spec"]["externalIPs"] == ["192.0.2.7"] and kept["spec"]["ports"][0]["nodePort"] == 30080
    assert _rows(compile_program(policy(spec=IPTABLES), kept, SLICES)) == _rows(
        compile_program(policy(spec=IPTABLES), svc, SLICES))
    assert "status" not in service_summary(service())
