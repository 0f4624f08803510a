"""iptables mode on the host kernel, traffic policies Local: real traffic from the client
netns (no default route, outside the cluster CIDRs). be0 counts as this node's endpoint,
be1 and be2 as other nodes' (all sit on the node's bridge, so only the rules decide):
an externalTrafficPolicy Local node port answers only from be0, which sees the client's
own address; with no local endpoint it answers nothing; internalTrafficPolicy Local
ClusterIPs likewise. Then the health-check server, run in the node netns, answered
across the client's link."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import LocalPolicy, RealServer, VirtualServer, make_table
from svcproxy_lab.topology import CLIENT, ECHO, Topology, in_ns

NODE_IP = "10.99.0.1"  # the node's address on the client's link
CLIENT_IP = "10.99.0.2"
ADDRESS_PORT = 8081  # be0's second echo server: answers "<name> <client-ip>:<client-port>"


def server(topo: Topology, address: str, port: int, policy: LocalPolicy, *, local: tuple[int, ...] = (0,),
           target: int = 8080, owner: str = "ns/web", only: tuple[int, ...] | None = None) -> VirtualServer:
    reals = [RealServer(a, target, local=i in local) for i, a in enumerate(topo.backends)
             if only is None or i in only]
    return VirtualServer.create("TCP", address, port, reals, owner=owner, local_policy=policy)


def first_line(topo: Topology, ns: str, address: str, port: int) -> str:
    """What the first server line says to one TCP connection from ``ns`` (sends nothing)."""
    script = (f"import socket; s = socket.create_connection(({address!r}, {port}), timeout=5);"
              " print(s.makefile().readline().strip())")
    return in_ns(ns, sys.executable, "-c", script).stdout.strip()


def test_local_policies_reach_only_this_nodes_endpoints_and_keep_the_client(topo: Topology) -> None:
    echo = subprocess.Popen(["ip", "netns", "exec", topo.backend_ns(0), sys.executable, "-m", ECHO,
                             "--name", "be0", f"--port={ADDRESS_PORT}"], stdout=subprocess.PIPE)
    assert echo.stdout is not None and b"serving" in echo.stdout.readline()
    p = IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node))
    table = make_table([
        server(topo, "0.0.0.0", 30080, "external"),
        server(topo, "0.0.0.0", 30081, "external", target=ADDRESS_PORT, owner="ns/address"),
        server(topo, "0.0.0.0", 30082, "", target=ADDRESS_PORT, owner="ns/cluster", only=(0,)),
        server(topo, "0.0.0.0", 30083, "external", local=(), owner="ns/elsewhere"),
        server(topo, "10.96.5.20", 80, "internal", local=(1,), owner="ns/itp"),
        server(topo, "10.96.5.21", 80, "internal", local=(), owner="ns/itp-elsewhere"),
    ])
    result = asyncio.run(p.sync(table))
    assert result.ok, result.errors
    try:
        assert set(topo.ask(NODE_IP, 30080, 30)) == {"be0"}
        name, source = first_line(topo, topo.client, NODE_IP, 30081).split()
        assert name == "be0" and source.split(":")[0] == CLIENT_IP, source  # the client address kept
        # The same backend under the Cluster policy sees the node's address instead.
        assert first_line(topo, topo.client, NODE_IP, 30082).split()[1].split(":")[0] != CLIENT_IP
        # The node itself reaches every endpoint (masqueraded), as through kube-proxy.
        out = in_ns(topo.node, sys.executable, "-m", CLIENT, NODE_IP, "30080", "45", "tcp").stdout
        assert set(out.split()) == {"be0", "be1", "be2"}, out
        # No endpoint on this node: dropped, not refused (endpoints exist elsewhere).
        assert topo.connect_error(NODE_IP, 30083) == "TimeoutError"
        assert set(topo.ask("10.96.5.20", 80, 30)) == {"be1"}
        assert topo.ask("10.96.5.21", 80, 2) == ["-", "-"]
        assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 0  # read back as written
    finally:
        asyncio.run(p.cleanup())
        echo.kill()
        echo.wait()
    assert topo.connect_error(NODE_IP, 30080) == "ECONNREFUSED"


HEALTH_SERVER = textwrap.dedent("""
    import asyncio
    from svcproxy.agent.healthcheck import HealthServer

    async def main():
        server = HealthServer()  # every address of the node netns
        await server.update({"ns/web": (32100, 2), "ns/none": (32101, 0)})
        print("serving", flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
""")
GET = textwrap.dedent("""
    import json, socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: lb\\r\\n\\r\\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    print(json.dumps(data.decode()))  # as JSON: the CRLFs survive a text-mode pipe
""")


def test_health_check_node_ports_answer_across_the_node_link(topo: Topology) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", topo.node, sys.executable, "-c", HEALTH_SERVER],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and b"serving" in proc.stdout.readline()
        answers = {}
        for port in (32100, 32101):
            raw = json.loads(in_ns(topo.client, sys.executable, "-c", GET, NODE_IP, str(port)).stdout)
            head, _, body = raw.partition("\r\n\r\n")
            answers[port] = (head.split("\r\n"), json.loads(body))
        head, body = answers[32100]
        assert head[0] == "HTTP/1.1 200 OK" and "X-Content-Type-Options: nosniff" in head
        assert body == {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2,
                        "serviceProxyHealthy": True}
        head, body = answers[32101]
        assert head[0] == "HTTP/1.1 503 Service Unavailable" and body["localEndpoints"] == 0
        assert "::" in in_ns(topo.node, "ss", "-Htln", "sport = :32100").stdout  # IPv6 too
    finally:
        proc.kill()
        proc.wait()
