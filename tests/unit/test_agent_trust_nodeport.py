"""The agent's trust check for node ports, external and load-balancer IPs
(svcproxy.agent.trust): a node port is trusted only as its Service's nodePort, inside
the node-port range, on 0.0.0.0 / :: with addressType NodePort."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import pytest
from pydantic import ValidationError
from test_agent_sync import pvs
from test_agent_trust import NODE, SPACE

from svcproxy.agent import main
from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.trust import (
    FOREIGN_NODE_PORT,
    FOREIGN_VIP,
    AddressBook,
    health_check_key,
    node_networks,
    node_port_key,
    port_range,
    refusal_of,
    service_addresses,
)

SERVICE = {
    "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
             "externalIPs": ["192.0.2.7", "127.0.0.1"],
             "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080},
                       {"port": 53, "protocol": "UDP", "nodePort": 30053}]},
    "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.3"}]}},
}
ADDRESSES = service_addresses(SERVICE)
REALS = [{"address": "10.244.1.5", "port": 8080}]


def _with(address: str, port: int, *, kind: str = "NodePort", protocol: str = "TCP",
          mode: str = "iptables") -> DesiredProgram:
    extra: dict[str, Any] = {"address": address, "addressType": kind, "port": port, "protocol": protocol,
                             "mode": mode, "realServers": REALS}
    return pvs("web", reals=REALS, extra_vs=[extra])


def test_service_addresses_hold_its_node_ports_and_no_special_addresses() -> None:
    want = {"10.96.0.10", "192.0.2.7", "198.51.100.3", node_port_key("TCP", 30080),
            node_port_key("UDP", 30053)}
    assert want == ADDRESSES


@pytest.mark.parametrize(
    ("address", "port", "kind", "protocol"),
    [("0.0.0.0", 30080, "NodePort", "TCP"), ("::", 30053, "NodePort", "UDP"),
     ("192.0.2.7", 80, "ExternalIP", "TCP"), ("198.51.100.3", 80, "LoadBalancerIP", "TCP")],
)
def test_the_services_own_node_ports_and_external_ips_are_trusted(
    address: str, port: int, kind: str, protocol: str
) -> None:
    assert refusal_of(_with(address, port, kind=kind, protocol=protocol), ADDRESSES, SPACE) is None


@pytest.mark.parametrize(
    ("port", "protocol", "words"),
    [(30081, "TCP", "is not a nodePort of the Service default/web"),
     (30080, "UDP", "is not a nodePort"),
     (8080, "TCP", "outside this agent's node-port range 30000-32767")],
)
def test_a_foreign_node_port_is_refused_and_named(port: int, protocol: str, words: str) -> None:
    refusal = refusal_of(_with("0.0.0.0", port, protocol=protocol), ADDRESSES, SPACE)
    assert refusal is not None and refusal.reason == FOREIGN_NODE_PORT
    assert f"node port {port}/{protocol}" in refusal.message and words in refusal.message


def test_the_node_port_range_is_the_agents_setting() -> None:
    services = service_addresses({"spec": {"clusterIP": "10.96.0.10", "type": "NodePort",
                                           "ports": [{"port": 80, "nodePort": 8080}]}})
    program = _with("0.0.0.0", 8080)
    assert refusal_of(program, services, SPACE, port_range("8000-9000")) is None
    book = AddressBook(node_ports=port_range("30000-32767"))
    book.set_node("node-1", node_networks(NODE))
    book.set_service("default/web", services)
    refusal = book.check(program)
    assert refusal is not None and refusal.reason == FOREIGN_NODE_PORT
    parser = argparse.ArgumentParser()
    main.configure(parser)
    args = parser.parse_args(["--node-name", "n1", "--node-port-range", "8000-9000"])
    assert port_range(args.node_port_range) == range(8000, 9001)


@pytest.mark.parametrize("text", ["30000", "32767-30000", "0-100", "a-b", "1-70000"])
def test_a_bad_node_port_range_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not FIRST-LAST"):
        port_range(text)


def test_loopback_is_never_a_trusted_virtual_ip() -> None:
    refusal = refusal_of(_with("127.0.0.1", 80, kind="ExternalIP"), ADDRESSES, SPACE)
    assert refusal is not None and refusal.reason == FOREIGN_VIP
    assert "loopback, link-local and multicast never are" in refusal.message


@pytest.mark.parametrize(("address", "kind"), [("0.0.0.0", "ClusterIP"), ("10.96.0.10", "NodePort")])
def test_a_node_port_address_without_its_type_never_reaches_the_check(address: str, kind: str) -> None:
    with pytest.raises(ValidationError, match="goes with addressType NodePort"):
        _with(address, 30080, kind=kind)


def test_a_node_port_in_ipvs_mode_is_refused() -> None:
    refusal = refusal_of(_with("0.0.0.0", 30080, mode="ipvs"), ADDRESSES, SPACE)
    assert refusal is not None and refusal.reason == FOREIGN_NODE_PORT
    assert "asks for mode ipvs" in refusal.message
    assert "iptables and userspace modes only" in refusal.message


@pytest.mark.parametrize(("address", "port", "kind"), [
    ("0.0.0.0", 30080, "NodePort"), ("::", 30080, "NodePort"),
    ("192.0.2.7", 80, "ExternalIP"), ("198.51.100.3", 80, "LoadBalancerIP")])
def test_userspace_node_ports_and_external_ips_are_trusted(address: str, port: int, kind: str) -> None:
    assert refusal_of(_with(address, port, kind=kind, mode="userspace"), ADDRESSES, SPACE) is None


def test_userspace_node_ports_are_checked_like_iptables_ones() -> None:
    other = refusal_of(_with("0.0.0.0", 30081, mode="userspace"), ADDRESSES, SPACE)
    assert other is not None and other.reason == FOREIGN_NODE_PORT and "is not a nodePort" in other.message
    low = refusal_of(_with("0.0.0.0", 30080, mode="userspace"), ADDRESSES, SPACE, range(31000, 32000))
    assert low is not None and low.reason == FOREIGN_NODE_PORT and "outside" in low.message


def test_a_health_check_port_is_trusted_only_as_the_services_own() -> None:
    service = {**SERVICE, "spec": {**SERVICE["spec"], "healthCheckNodePort": 32100}}
    addresses = service_addresses(service)
    assert health_check_key(32100) in addresses and health_check_key(32100) not in ADDRESSES
    program = pvs("web", reals=REALS)
    assert refusal_of(replace(program, health_check_port=32100), addresses, SPACE) is None
    for port, have in ((32101, addresses), (32100, ADDRESSES)):
        refusal = refusal_of(replace(program, health_check_port=port), have, SPACE)
        assert refusal is not None and refusal.reason == FOREIGN_NODE_PORT
        assert f"health-check port {port}" in refusal.message
    # The Service's own, but outside the agent's node-port range.
    refusal = refusal_of(replace(program, health_check_port=32100), addresses, SPACE, range(30000, 31000))
    assert refusal is not None and refusal.reason == FOREIGN_NODE_PORT
