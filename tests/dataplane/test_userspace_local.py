"""userspace mode on the host kernel, traffic policies Local: the proxier runs in the node
netns, real traffic from the client netns (10.99.0.2: outside the cluster CIDRs, no
default route) and from a backend netns (a Pod, inside them). be0 counts as this node's
endpoint, be1 and be2 as other nodes'. An externalTrafficPolicy Local node port answers
outside clients from be0 only, and be0 sees the node's address, not the client's (the
agent connects to it: the userspace mode cannot keep the client address); a Pod and the
node itself reach every endpoint; with no local endpoint outside clients time out;
internalTrafficPolicy Local ClusterIPs reach the local endpoint only."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from test_iptables_local import ADDRESS_PORT, CLIENT_IP, NODE_IP, first_line
from test_userspace import Driver

from svcproxy_lab.topology import CLIENT, ECHO, Topology, in_ns

NAMES = {"be0", "be1", "be2"}


def server(topo: Topology, address: str, port: int, policy: str, *, local: tuple[int, ...] = (0,),
           target: int = 8080, owner: str = "ns/web") -> dict[str, Any]:
    """A virtual server for us_driver.py: every backend, those in ``local`` on this node."""
    return {"protocol": "TCP", "address": address, "port": port, "scheduler": "rr", "persistence": 0,
            "owner": owner, "local_policy": policy,
            "reals": [[a, target, 1, "masq", i in local] for i, a in enumerate(topo.backends)]}


def test_local_policies_reach_only_this_nodes_endpoints(topo: Topology) -> None:
    echo = subprocess.Popen(["ip", "netns", "exec", topo.backend_ns(0), sys.executable, "-m", ECHO,
                             "--name", "be0", f"--port={ADDRESS_PORT}"], stdout=subprocess.PIPE)
    assert echo.stdout is not None and b"serving" in echo.stdout.readline()
    driver = Driver(topo)
    try:
        driver.sync(
            server(topo, "0.0.0.0", 30080, "external"),
            server(topo, "0.0.0.0", 30081, "external", target=ADDRESS_PORT, owner="ns/address"),
            server(topo, "0.0.0.0", 30083, "external", local=(), owner="ns/elsewhere"),
            server(topo, "10.96.5.20", 80, "internal", local=(1,), owner="ns/itp"),
            server(topo, "10.96.5.21", 80, "internal", local=(), owner="ns/itp-elsewhere"),
        )
        assert set(topo.ask(NODE_IP, 30080, 30)) == {"be0"}
        name, source = first_line(topo, topo.client, NODE_IP, 30081).split()
        assert name == "be0" and source.split(":")[0] != CLIENT_IP, source  # the agent's address
        # A Pod (be1, in the cluster CIDR) and the node itself reach every endpoint.
        pod = in_ns(topo.backend_ns(1), sys.executable, "-m", CLIENT, NODE_IP, "30080", "30", "tcp").stdout
        assert set(pod.split()) == NAMES, pod
        node = in_ns(topo.node, sys.executable, "-m", CLIENT, NODE_IP, "30080", "30", "tcp").stdout
        assert set(node.split()) == NAMES, node
        # No endpoint on this node: outside clients are dropped (endpoints exist elsewhere).
        assert topo.connect_error(NODE_IP, 30083) == "TimeoutError"
        pod = in_ns(topo.backend_ns(1), sys.executable, "-m", CLIENT, NODE_IP, "30083", "6", "tcp").stdout
        assert set(pod.split()) == NAMES, pod
        assert set(topo.ask("10.96.5.20", 80, 30)) == {"be1"}
        assert topo.ask("10.96.5.21", 80, 2) == ["-", "-"]
        # A partial sync moves the local endpoint: outside clients follow.
        driver.sync(server(topo, "0.0.0.0", 30083, "external", local=(2,), owner="ns/elsewhere"),
                    only=["ns/elsewhere"])
        assert set(topo.ask(NODE_IP, 30083, 6)) == {"be2"}
    finally:
        driver.stop()
        echo.kill()
        echo.wait()
    assert topo.connect_error(NODE_IP, 30080) == "ECONNREFUSED"
