"""iptables mode on the host kernel, serving-terminating endpoints (kube-proxy's rule),
through the agent's own conversion of compiled real servers: real traffic from the
client netns (no default route). Every endpoint terminating but serving: new connections
are answered by them; one ready again: only it gets new connections. Under an
externalTrafficPolicy Local, this node's terminating endpoint answers outside clients
while the node's own traffic goes to the ready endpoint of another node."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any

from svcproxy.agent.convert import virtual_server
from svcproxy.api.program import RealServerSpec, VirtualServerSpec
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import VirtualServer, make_table
from svcproxy_lab.topology import CLIENT, Topology, in_ns

VIP = "10.96.5.30"
NODE_IP = "10.99.0.1"  # the node's address on the client's link
READY = {"ready": True, "serving": True, "terminating": False}
TERMINATING = {"ready": False, "serving": True, "terminating": True}


def converted(topo: Topology, states: list[dict[str, bool]], **spec: Any) -> VirtualServer:
    """The agent's virtual server (node-1) from compiled endpoints be0.. in ``states``;
    be0 runs on node-1, the others elsewhere."""
    reals = [RealServerSpec(address=a, port=8080, node_name="node-1" if i == 0 else "node-2", **s)
             for i, (a, s) in enumerate(zip(topo.backends, states, strict=False))]
    fields: dict[str, Any] = {"address": VIP, "port": 80, "mode": "iptables", **spec}
    return virtual_server(VirtualServerSpec(real_servers=reals, **fields), "ns/web", "node-1")


def test_all_terminating_answer_then_only_the_ready_one(topo: Topology) -> None:
    p = IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))
    try:
        result = asyncio.run(p.sync(make_table([converted(topo, [TERMINATING] * 3)])))
        assert result.ok, result.errors
        counts = Counter(topo.ask(VIP, 80, 60))
        assert set(counts) == {"be0", "be1", "be2"}, counts  # answered, not refused
        again = converted(topo, [TERMINATING, READY, TERMINATING])
        assert asyncio.run(p.sync(make_table([again]))).ok
        counts = Counter(topo.ask(VIP, 80, 40))
        assert counts == {"be1": 40}, counts
    finally:
        asyncio.run(p.cleanup())


def test_external_local_terminating_local_endpoint_serves_outside_clients(topo: Topology) -> None:
    p = IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))
    vs = converted(topo, [TERMINATING, READY, READY], address="0.0.0.0", port=30090,
                   address_type="NodePort", traffic_policy="Local")
    try:
        result = asyncio.run(p.sync(make_table([vs])))
        assert result.ok, result.errors
        # Outside clients: this node's endpoints only; none ready, so the terminating one.
        assert set(topo.ask(NODE_IP, 30090, 20)) == {"be0"}
        # The node itself: every endpoint's scope, which has ready ones: not be0.
        out = in_ns(topo.node, sys.executable, "-m", CLIENT, NODE_IP, "30090", "30", "tcp").stdout
        assert set(out.split()) == {"be1", "be2"}, out
    finally:
        asyncio.run(p.cleanup())
