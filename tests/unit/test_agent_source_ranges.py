"""The agent's reading of loadBalancerSourceRanges: each load-balancer IP keeps the
ranges of its own family (a /0 lifts the filter, none of its family leaves only the
node), other addresses none; a mode without a firewall is a spec error; the trust
check treats ranges as data, never as addresses to trust."""

from __future__ import annotations

from typing import Any

import pytest
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.agent.convert import DesiredProgram, to_program
from svcproxy.agent.trust import FOREIGN_VIP, NetworkSet, network, refusal_of, service_addresses
from svcproxy.api import ProxyVirtualServer, ProxyVirtualServerSpec
from svcproxy.compile.program import compile_program
from svcproxy.dataplane.table import VirtualServer

PORT = {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080}
SLICES = [endpoint_slice([endpoint("10.244.1.2", node="node-1")],
                         ports=[{"name": "http", "port": 8080, "protocol": "TCP"}]),
          endpoint_slice([endpoint("fd00:244::2", node="node-1")],
                         ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
                         address_type="IPv6", name="web-v6")]
INGRESS = [{"ip": "198.51.100.3"}, {"ip": "2001:db8::3"}]


def _service(ranges: list[str]) -> dict[str, Any]:
    svc = service(type_="LoadBalancer", ports=[PORT], cluster_ips=["10.96.0.10", "fd00:96::10"])
    svc["spec"].update({"ipFamilies": ["IPv4", "IPv6"], "loadBalancerSourceRanges": ranges,
                        "externalIPs": ["192.0.2.7"]})
    svc["status"] = {"loadBalancer": {"ingress": INGRESS}}
    return svc


def program(ranges: list[str], mode: str = "iptables") -> ProxyVirtualServer:
    compiled = compile_program(policy(spec={"services": ["web"], "mode": mode}), _service(ranges), SLICES)
    assert isinstance(compiled, ProxyVirtualServerSpec), compiled
    return ProxyVirtualServer.parse({"metadata": {"name": "web", "namespace": "ns"}, "spec": compiled.wire()})


def _ranges(pvs: ProxyVirtualServer, mode: str = "iptables") -> dict[str, tuple[str, ...] | None]:
    prog = to_program(pvs, "node-1")
    assert not prog.error, prog.error
    return {vs.address: vs.source_ranges for vs in prog.by_mode[mode]}  # type: ignore[index]


@pytest.mark.parametrize("mode", ["iptables", "userspace"])
def test_each_load_balancer_ip_keeps_the_ranges_of_its_family(mode: str) -> None:
    got = _ranges(program(["203.0.113.0/24", "2001:db8:1::/48", "10.0.0.0/8"], mode), mode)
    assert got == {"0.0.0.0": None, "::": None, "10.96.0.10": None, "fd00:96::10": None, "192.0.2.7": None,
                   "198.51.100.3": ("203.0.113.0/24", "10.0.0.0/8"), "2001:db8::3": ("2001:db8:1::/48",)}


def test_a_zero_prefix_lifts_the_filter_and_no_range_of_the_family_leaves_only_the_node() -> None:
    got = _ranges(program(["0.0.0.0/0", "203.0.113.0/24"]))
    assert got["198.51.100.3"] is None  # every IPv4 client, as kube-proxy
    assert got["2001:db8::3"] == ()  # no IPv6 range: only the node (kube-proxy would leave it open)
    assert _ranges(program(["::/0"]))["2001:db8::3"] is None


def test_source_ranges_in_a_mode_without_a_firewall_are_a_spec_error() -> None:
    pvs = program(["203.0.113.0/24"])
    raw = pvs.model_dump(by_alias=True, mode="json")
    for vs in raw["spec"]["virtualServers"]:
        vs["mode"] = "ipvs"
    prog = to_program(ProxyVirtualServer.model_validate(raw), "node-1")
    assert prog.by_mode == {}
    assert "filtered in iptables and userspace modes only, not ipvs" in prog.error


def test_the_data_plane_value_refuses_ranges_of_the_other_family_and_on_node_ports() -> None:
    assert VirtualServer("TCP", "198.51.100.3", 80, source_ranges=("203.0.113.9/24",)).source_ranges == (
        "203.0.113.0/24",)
    with pytest.raises(ValueError, match="is not IPv4 like the address it filters"):
        VirtualServer("TCP", "198.51.100.3", 80, source_ranges=("2001:db8::/32",))
    with pytest.raises(ValueError, match="never node ports"):
        VirtualServer("TCP", "0.0.0.0", 30080, source_ranges=("203.0.113.0/24",))
    with pytest.raises(ValueError, match="is not a CIDR"):
        VirtualServer("TCP", "198.51.100.3", 80, source_ranges=("nowhere",))


def test_ranges_are_data_to_the_trust_check_never_addresses() -> None:
    svc = _service(["198.51.100.0/24", "10.0.0.0/8"])
    svc["metadata"] = {"name": "web", "namespace": "ns"}
    addresses = service_addresses(svc)
    # A range is no address of the Service: a VIP inside one is still foreign ...
    assert addresses == {"10.96.0.10", "fd00:96::10", "192.0.2.7", "198.51.100.3", "2001:db8::3",
                         "nodePort TCP/30080"}
    space = NetworkSet([network("10.244.0.0/16"), network("fd00:244::/64")])
    pvs = program(["198.51.100.0/24", "10.0.0.0/8"])
    prog = to_program(pvs, "node-1")
    assert refusal_of(prog, addresses, space) is None  # ... and ranges outside the Pod space are fine
    stranger = VirtualServer("TCP", "198.51.100.9", 80, owner="ns/web")
    servers = (*prog.by_mode["iptables"], stranger)
    forged = DesiredProgram(prog.owner, prog.content_hash, {"iptables": servers})
    refusal = refusal_of(forged, addresses, space)
    assert refusal is not None and refusal.reason == FOREIGN_VIP and "198.51.100.9" in refusal.message
