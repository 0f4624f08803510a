"""iptables mode on the host kernel, beyond ClusterIPs: real traffic from the client netns
(no default route) to a node port on the node's own address, to an external IP and to a
load-balancer IP, answered by the backends; and from the node itself to its node port."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy_lab.topology import CLIENT, Topology, in_ns

NODE_IP = "10.99.0.1"  # the node's address on the client's link
EXTERNAL_IP = "192.0.2.7"  # TEST-NET-1: routed via the node inside the client netns only
LB_IP = "198.51.100.3"  # TEST-NET-2, likewise
NAMES = {"be0", "be1", "be2"}


def proxier(topo: Topology) -> IptablesProxier:
    return IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))


def server(topo: Topology, address: str, port: int, *, protocol: str = "TCP",
           backends: list[str] | None = None) -> VirtualServer:
    reals = [RealServer(a, 8080) for a in (backends if backends is not None else topo.backends)]
    return VirtualServer.create(protocol, address, port, reals, owner="ns/web")  # type: ignore[arg-type]


def test_node_port_external_and_load_balancer_ips_reach_the_backends(topo: Topology) -> None:
    for net in (f"{EXTERNAL_IP}/32", f"{LB_IP}/32"):
        in_ns(topo.client, "ip", "route", "replace", net, "via", NODE_IP)
    p = proxier(topo)
    table = make_table([
        server(topo, "10.96.5.10", 80),
        server(topo, EXTERNAL_IP, 80),
        server(topo, LB_IP, 80),
        server(topo, "0.0.0.0", 30080),
        server(topo, "0.0.0.0", 30053, protocol="UDP"),
    ])
    result = asyncio.run(p.sync(table))
    assert result.ok, result.errors
    try:
        counts = Counter(topo.ask(NODE_IP, 30080, 90))
        assert set(counts) == NAMES, counts  # every backend answers through the node port
        assert set(topo.ask(NODE_IP, 30053, 45, udp=True)) == NAMES
        assert set(topo.ask(EXTERNAL_IP, 80, 45)) == NAMES
        assert set(topo.ask(LB_IP, 80, 45)) == NAMES
        assert topo.connect_error(NODE_IP, 80) == "ECONNREFUSED"  # only the node port is taken
        # From the node itself (nat OUTPUT), to its own address.
        out = in_ns(topo.node, sys.executable, "-m", CLIENT, NODE_IP, "30080", "30", "tcp").stdout
        assert set(out.split()) == NAMES, out
        # A full sync of the same table reads the node-port chain back as written.
        assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 0
        nodeports = [line for line in in_ns(topo.node, "iptables-save", "-t", "nat").stdout.splitlines()
                     if rules.NODEPORTS in line]
        assert sum(line.startswith(f"-A {rules.NODEPORTS} ") for line in nodeports) == 2, nodeports
    finally:
        asyncio.run(p.cleanup())
    assert rules.NODEPORTS not in in_ns(topo.node, "iptables-save").stdout
    assert topo.connect_error(NODE_IP, 30080) == "ECONNREFUSED"


def test_ipv6_node_port_reaches_the_backends(topo: Topology) -> None:
    v6_backends = topo.enable_ipv6()
    p = proxier(topo)
    result = asyncio.run(p.sync(make_table([server(topo, "::", 30080, backends=v6_backends)])))
    assert result.ok, result.errors
    try:
        assert set(topo.ask("fd00:99::1", 30080, 45)) == NAMES
    finally:
        asyncio.run(p.cleanup())
    assert rules.NODEPORTS not in in_ns(topo.node, "ip6tables-save").stdout
