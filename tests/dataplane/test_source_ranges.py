"""loadBalancerSourceRanges on the host kernel, iptables and userspace modes: real
traffic from the client netns (10.99.0.2, no default route). The load-balancer IPs are
addresses of the node (a VIP-like load balancer's), so what the firewall leaves alone
would be refused by the node (ECONNREFUSED) and what it drops times out instead. A
range holding the client lets it through; a range that does not drops it while the node
itself still gets in; no endpoint at all refuses everyone; IPv6 in ip6tables."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from test_userspace import Driver

from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy_lab.topology import CLIENT, Topology, in_ns

OPEN, CLOSED, EMPTY = "10.96.7.1", "10.96.7.2", "10.96.7.3"  # routed via the node by the client
OPEN6, CLOSED6 = "fd00:96::71", "fd00:96::72"  # in the client's route, fd00:96::/112
NAMES = {"be0", "be1", "be2"}


def servers(topo: Topology) -> list[dict[str, Any]]:
    """The load-balancer IPs' virtual servers, as us_driver.py takes them."""
    v6 = topo.enable_ipv6()

    def lb(address: str, ranges: list[str], backends: list[str], owner: str) -> dict[str, Any]:
        return {"protocol": "TCP", "address": address, "port": 80, "scheduler": "rr", "persistence": 0,
                "owner": owner, "source_ranges": ranges, "reals": [[a, 8080, 1] for a in backends]}

    return [lb(OPEN, ["10.99.0.0/24", "203.0.113.0/24"], topo.backends, "ns/open"),
            lb(CLOSED, ["192.0.2.0/24"], topo.backends, "ns/closed"),
            lb(EMPTY, ["10.99.0.0/24"], [], "ns/empty"),
            lb(OPEN6, ["fd00:99::/64"], v6, "ns/open6"),
            lb(CLOSED6, ["2001:db8::/32"], v6, "ns/closed6")]


def table(topo: Topology) -> dict[Any, VirtualServer]:
    return make_table(VirtualServer.create(
        d["protocol"], d["address"], d["port"], [RealServer(*r) for r in d["reals"]], owner=d["owner"],
        source_ranges=tuple(d["source_ranges"])) for d in servers(topo))


@pytest.fixture(scope="module")
def lb_ips(topo: Topology) -> None:
    for address in (OPEN, CLOSED, EMPTY):
        in_ns(topo.node, "ip", "addr", "add", f"{address}/32", "dev", "lo")
    for address in (OPEN6, CLOSED6):
        in_ns(topo.node, "ip", "-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")


def from_node(topo: Topology, address: str, count: int) -> list[str]:
    return in_ns(topo.node, sys.executable, "-m", CLIENT, address, "80", str(count), "tcp").stdout.split()


def check_the_firewall(topo: Topology) -> None:
    """30 connections where every backend must answer: iptables picks at random."""
    assert set(topo.ask(OPEN, 80, 30)) == NAMES  # the client's range
    assert topo.connect_error(CLOSED, 80) == "TimeoutError"  # dropped, not refused
    assert set(from_node(topo, CLOSED, 30)) == NAMES  # the node itself always gets in
    assert topo.connect_error(EMPTY, 80) == "ECONNREFUSED"  # no endpoint: refused
    assert set(topo.ask(OPEN6, 80, 30)) == NAMES
    assert topo.connect_error(CLOSED6, 80) == "TimeoutError"


@pytest.mark.usefixtures("lb_ips")
def test_iptables_takes_only_the_ranges_and_the_node(topo: Topology) -> None:
    p = IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))
    desired = table(topo)
    assert asyncio.run(p.sync(desired)).ok
    try:
        check_the_firewall(topo)
        assert asyncio.run(p.sync(desired)).ok and p.last_full.restores == 0  # read back as written
    finally:
        asyncio.run(p.cleanup())
    assert topo.connect_error(CLOSED, 80) == "ECONNREFUSED"  # nothing of ours left: the node refuses


@pytest.mark.usefixtures("lb_ips")
def test_userspace_takes_only_the_ranges_and_the_node(topo: Topology) -> None:
    driver = Driver(topo)
    try:
        driver.sync(*servers(topo))
        check_the_firewall(topo)
        # A partial sync lifts the filter of one and closes the other.
        rows = servers(topo)
        rows[0]["source_ranges"], rows[1]["source_ranges"] = ["192.0.2.0/24"], ["0.0.0.0/1", "10.0.0.0/8"]
        driver.sync(*rows, only=["ns/open", "ns/closed"])
        assert topo.connect_error(OPEN, 80) == "TimeoutError"
        assert set(topo.ask(CLOSED, 80, 6)) == NAMES
    finally:
        driver.stop()
    assert topo.connect_error(CLOSED, 80) == "ECONNREFUSED"
    assert "SVCPROXY" not in in_ns(topo.node, "iptables-save", "-t", "filter").stdout
