"""compile_program for externalTrafficPolicy / internalTrafficPolicy Local: served in
iptables mode with the policy on each virtual server and the nodes on the real servers,
refused (left to kube-proxy) in the other modes."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.api import ProxyVirtualServer, ProxyVirtualServerSpec
from svcproxy.compile.program import NotProxied, compile_program

IPTABLES = {"services": ["web"], "mode": "iptables"}
PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}
SLICES = [endpoint_slice([endpoint("10.244.1.2", node="node-1"), endpoint("10.244.2.2", node="node-2")])]


def _lb(**spec: Any) -> dict[str, Any]:
    svc = service(type_="LoadBalancer", ports=[PORT])
    svc["spec"].update({"ipFamilies": ["IPv4"], "externalIPs": ["192.0.2.7"], **spec})
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.3"}]}}
    return svc


def _policies(prog: ProxyVirtualServerSpec | NotProxied) -> dict[str, str]:
    assert isinstance(prog, ProxyVirtualServerSpec), prog
    return {vs.address_type: vs.traffic_policy or "Cluster" for vs in prog.virtual_servers}


def test_external_local_marks_every_external_virtual_server_and_keeps_nodes() -> None:
    svc = _lb(externalTrafficPolicy="Local", healthCheckNodePort=32100)
    prog = compile_program(policy(spec=IPTABLES), svc, SLICES)
    assert _policies(prog) == {"NodePort": "Local", "ExternalIP": "Local", "LoadBalancerIP": "Local",
                               "ClusterIP": "Cluster"}
    assert isinstance(prog, ProxyVirtualServerSpec)
    assert prog.health_check_node_port == 32100
    # Every node gets the same program: each real server says where it runs.
    assert {(r.address, r.node_name) for r in prog.virtual_servers[0].real_servers} == {
        ("10.244.1.2", "node-1"), ("10.244.2.2", "node-2")}
    wire = prog.wire()
    assert wire["healthCheckNodePort"] == 32100 and wire["virtualServers"][0]["trafficPolicy"] == "Local"
    again = ProxyVirtualServer.parse({"metadata": {"name": "web", "namespace": "ns"}, "spec": wire})
    assert again.spec.virtual_servers == prog.virtual_servers


def test_internal_local_marks_only_the_cluster_ips() -> None:
    prog = compile_program(policy(spec=IPTABLES), _lb(internalTrafficPolicy="Local"), SLICES)
    assert _policies(prog) == {"NodePort": "Cluster", "ExternalIP": "Cluster", "LoadBalancerIP": "Cluster",
                               "ClusterIP": "Local"}
    assert isinstance(prog, ProxyVirtualServerSpec) and prog.health_check_node_port is None


def test_internal_local_on_a_plain_cluster_ip_service() -> None:
    svc = service(ports=[PORT])
    svc["spec"]["internalTrafficPolicy"] = "Local"
    assert _policies(compile_program(policy(spec=IPTABLES), svc, SLICES)) == {"ClusterIP": "Local"}


def test_external_policy_counts_only_for_node_port_and_load_balancer_types() -> None:
    # The API server refuses this; compile reads it as kube-proxy does: no effect.
    svc = service(ports=[PORT])
    svc["spec"].update({"externalIPs": ["192.0.2.7"], "externalTrafficPolicy": "Local",
                        "healthCheckNodePort": 32100})
    prog = compile_program(policy(spec=IPTABLES), svc, SLICES)
    assert _policies(prog) == {"ClusterIP": "Cluster", "ExternalIP": "Cluster"}
    assert isinstance(prog, ProxyVirtualServerSpec) and prog.health_check_node_port is None


def test_cluster_policies_keep_the_hash_they_had_before_the_fields_existed() -> None:
    plain = compile_program(policy(spec=IPTABLES), _lb(), SLICES)
    explicit = compile_program(policy(spec=IPTABLES), _lb(externalTrafficPolicy="Cluster",
                                                          internalTrafficPolicy="Cluster"), SLICES)
    local = compile_program(policy(spec=IPTABLES), _lb(externalTrafficPolicy="Local"), SLICES)
    with_port = compile_program(policy(spec=IPTABLES), _lb(externalTrafficPolicy="Local",
                                                           healthCheckNodePort=32100), SLICES)
    assert isinstance(plain, ProxyVirtualServerSpec) and isinstance(explicit, ProxyVirtualServerSpec)
    assert isinstance(local, ProxyVirtualServerSpec) and isinstance(with_port, ProxyVirtualServerSpec)
    assert plain.content_hash == explicit.content_hash
    # Left out on the wire (no CRD default): an agent that predates the field still
    # takes every program that does not use it.
    assert all("trafficPolicy" not in vs for vs in plain.wire()["virtualServers"])
    assert len({plain.content_hash, local.content_hash, with_port.content_hash}) == 3
    # The hash as computed before the traffic policies (and source ranges) existed.
    old = plain.model_dump(by_alias=True, mode="json", include={
        "mode", "scheduler", "scheduler_flags", "persistence_timeout_seconds", "virtual_servers"})
    for vs in old["virtualServers"]:
        del vs["trafficPolicy"], vs["loadBalancerSourceRanges"]
    text = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert plain.content_hash == hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("mode", ["ipvs"])
@pytest.mark.parametrize(
    ("svc", "words"),
    [(service(ports=[PORT]) | {}, "internalTrafficPolicy: Local"),
     (_lb(externalTrafficPolicy="Local"), "externalTrafficPolicy: Local")],
)
def test_other_modes_leave_traffic_policies_to_kube_proxy(mode: str, svc: dict[str, Any], words: str) -> None:
    if words.startswith("internal"):
        svc["spec"]["internalTrafficPolicy"] = "Local"
    why = compile_program(policy(spec={"services": ["web"], "mode": mode}), svc, SLICES)
    assert isinstance(why, NotProxied) and why.reason == "Unsupported"
    assert words in why.message and f"mode is {mode}" in why.message and "kube-proxy keeps" in why.message
