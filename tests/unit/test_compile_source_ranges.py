"""compile_program for spec.loadBalancerSourceRanges: carried, normalised, on the
load-balancer IPs' virtual servers only (iptables and userspace modes), refused under
ipvs naming what it lacks, refused when an entry is no CIDR; the API model's rules."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.api import ProxyVirtualServer, ProxyVirtualServerSpec
from svcproxy.api.program import VirtualServerSpec
from svcproxy.compile.program import NotProxied, compile_program

PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}
SLICES = [endpoint_slice([endpoint("10.244.1.2")], ports=[{"name": "http", "port": 8080, "protocol": "TCP"}])]
RANGES = ["203.0.113.9/24", " 2001:db8:0::/32 ", "203.0.113.0/24", "10.0.0.0/8"]


def _service(ranges: list[Any] | None = RANGES, type_: str = "LoadBalancer") -> dict[str, Any]:
    svc = service(type_=type_, ports=[PORT])
    svc["spec"]["ipFamilies"] = ["IPv4"]
    svc["spec"]["externalIPs"] = ["192.0.2.7"]
    if ranges is not None:
        svc["spec"]["loadBalancerSourceRanges"] = ranges
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.3"}, {"ip": "2001:db8::3"}]}}
    return svc


def _compiled(svc: dict[str, Any], mode: str = "iptables") -> ProxyVirtualServerSpec:
    prog = compile_program(policy(spec={"services": ["web"], "mode": mode}), svc, SLICES)
    assert isinstance(prog, ProxyVirtualServerSpec), prog
    return prog


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_ranges_travel_normalised_on_the_load_balancer_ips_only(mode: str) -> None:
    prog = _compiled(_service(), mode)
    ranges = {vs.address: vs.load_balancer_source_ranges for vs in prog.virtual_servers}
    every = ["203.0.113.0/24", "2001:db8::/32", "10.0.0.0/8"]  # each family: the agent picks
    assert ranges == {"0.0.0.0": None, "10.96.0.10": None, "192.0.2.7": None,
                      "198.51.100.3": every, "2001:db8::3": every}
    again = ProxyVirtualServer.parse({"metadata": {"name": "web", "namespace": "ns"}, "spec": prog.wire()})
    assert again.spec == prog  # the wire form passes the model's rules, as an agent reads it


def test_ranges_count_in_the_hash_only_when_set() -> None:
    bare = _compiled(_service(None))
    assert "loadBalancerSourceRanges" not in str(bare.wire())
    assert _compiled(_service([])).content_hash == bare.content_hash  # [] sets none
    filtered = _compiled(_service(["203.0.113.0/24"]))
    assert filtered.content_hash != bare.content_hash
    assert _compiled(_service(["203.0.113.0/25"])).content_hash != filtered.content_hash
    # The same networks spelled another way compile to the same program.
    assert _compiled(_service([" 203.0.113.7/24"])).content_hash == filtered.content_hash


def test_ranges_of_a_service_of_another_type_are_not_read() -> None:
    prog = _compiled(_service(["not a cidr"], type_="NodePort"))
    assert all(vs.load_balancer_source_ranges is None for vs in prog.virtual_servers)


def test_ipvs_refuses_naming_every_field_it_lacks() -> None:
    why = compile_program(policy(spec={"services": ["web"], "mode": "ipvs"}), _service(), SLICES)
    assert isinstance(why, NotProxied) and why.reason == "Unsupported"
    only = "(served in iptables and userspace modes only)"
    assert f"type LoadBalancer and spec.externalIPs {only}" in why.message
    assert f"spec.loadBalancerSourceRanges {only}" in why.message
    assert "mode is ipvs" in why.message and "kube-proxy keeps" in why.message


def test_an_entry_that_is_no_cidr_leaves_the_service_to_kube_proxy() -> None:
    why = compile_program(policy(spec={"services": ["web"], "mode": "iptables"}),
                          _service(["203.0.113.0/24", "010.0.0.0/8"]), SLICES)
    assert isinstance(why, NotProxied) and why.reason == "Unsupported"
    assert "spec.loadBalancerSourceRanges[1] '010.0.0.0/8' is not a CIDR" in why.message
    assert "kube-proxy keeps" in why.message


@pytest.mark.parametrize(
    ("kind", "ranges", "error"),
    [("LoadBalancerIP", ["203.0.113.0/24", "2001:db8::/32"], None),
     ("LoadBalancerIP", ["203.0.113.9/24"], None),  # host bits: as the API server's format: cidr
     ("ExternalIP", ["203.0.113.0/24"], "goes with addressType LoadBalancerIP only"),
     ("ClusterIP", ["203.0.113.0/24"], "goes with addressType LoadBalancerIP only"),
     ("LoadBalancerIP", ["203.0.113.0"], "is not a CIDR"),
     ("LoadBalancerIP", ["a.b.c.d/8"], "is not a CIDR"),
     ("LoadBalancerIP", [], "at least 1 item"),
     ("LoadBalancerIP", ["10.0.0.0/8", "10.0.0.0/8"], "duplicate value")],
)
def test_the_model_takes_cidrs_on_load_balancer_ips_only(kind: str, ranges: list[str], error: str | None
                                                          ) -> None:
    raw = {"address": "198.51.100.3", "addressType": kind, "port": 80, "loadBalancerSourceRanges": ranges}
    if error is None:
        assert VirtualServerSpec.model_validate(raw).load_balancer_source_ranges == ranges
    else:
        with pytest.raises(ValidationError, match=error):
            VirtualServerSpec.model_validate(raw)
