"""The throw-away network-namespace topologies of the data-plane tests and the data-path benchmark.

node netns (the proxier programs it), a client netns with no default route
(10.99.0.2, reaches 10.96.0.0/16 via the node), and backend netns on a
bridge in the node (10.244.9.2, .3, ...) each running an echo server that
answers with its name over TCP and UDP (``Topology``); or client, node and one
backend on veth pairs for the data-path benchmark (``PathTopology``). No traffic
ever leaves these namespaces; the root netns is never a source or a destination.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

ECHO = "svcproxy_lab.echo"  # --bare: answers its name only
CLIENT = "svcproxy_lab.burst"

# The data-path benchmark's addresses (PathTopology).
POD_CIDR = "10.244.0.0/16"
CLIENT_IP, NODE_CLIENT_SIDE = "10.244.8.2", "10.244.8.1"
# The client sends to the VIP from a second address of the same interface (chosen by the
# route's src): a direct connection that reuses the ports of an IPVS connection in
# TIME_WAIT would have its SYN-ACK rewritten to come from the VIP and fail.
CLIENT_VIP_IP = "10.244.8.3"
BACKEND_IP, NODE_BACKEND_SIDE = "10.244.9.2", "10.244.9.1"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    backends: list[str] = field(default_factory=list)  # backend addresses
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    ipv6: list[str] = field(default_factory=list)  # the backends' IPv6 addresses, once enabled

    @property
    def node(self) -> str:
        return f"svcpt-{self.tag}-node"

    @property
    def client(self) -> str:
        return f"svcpt-{self.tag}-client"

    def backend_ns(self, i: int) -> str:
        return f"svcpt-{self.tag}-be{i}"

    def create(self, n_backends: int, ports: tuple[int, ...] = (8080,)) -> None:
        sh("ip", "netns", "add", self.node)
        in_ns(self.node, "ip", "link", "set", "lo", "up")
        in_ns(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sh("ip", "netns", "add", self.client)
        in_ns(self.client, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", f"c{self.tag}", "netns", self.client, "type", "veth",
           "peer", "name", f"n{self.tag}", "netns", self.node)
        in_ns(self.client, "ip", "addr", "add", "10.99.0.2/24", "dev", f"c{self.tag}")
        in_ns(self.client, "ip", "link", "set", f"c{self.tag}", "up")
        in_ns(self.client, "ip", "route", "add", "10.96.0.0/16", "via", "10.99.0.1")
        in_ns(self.node, "ip", "addr", "add", "10.99.0.1/24", "dev", f"n{self.tag}")
        in_ns(self.node, "ip", "link", "set", f"n{self.tag}", "up")
        in_ns(self.node, "ip", "link", "add", "br0", "type", "bridge")
        in_ns(self.node, "ip", "addr", "add", "10.244.9.1/24", "dev", "br0")
        in_ns(self.node, "ip", "link", "set", "br0", "up")
        for i in range(n_backends):
            ns, addr = self.backend_ns(i), f"10.244.9.{i + 2}"
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
               f"b{self.tag}{i}", "netns", self.node)
            in_ns(ns, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            in_ns(ns, "ip", "link", "set", "eth0", "up")
            in_ns(ns, "ip", "route", "add", "10.99.0.0/24", "via", "10.244.9.1")
            in_ns(self.node, "ip", "link", "set", f"b{self.tag}{i}", "master", "br0", "up")
            self.backends.append(addr)
            self.start_echo(i, ports)

    def start_echo(self, i: int, ports: tuple[int, ...] = (8080,)) -> None:
        ns = self.backend_ns(i)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", ECHO, "--name", f"be{i}", "--bare",
             "--dual-stack", *(f"--port={p}" for p in ports)],
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert b"serving" in proc.stdout.readline(), f"echo server in {ns} did not start"
        self.procs.append(proc)

    def stop_echo(self, i: int) -> None:
        ns = self.backend_ns(i)
        for proc in self.procs:
            if proc.args[3] == ns and proc.poll() is None:  # type: ignore[index]
                proc.kill()
                proc.wait()

    def ask(self, vip: str, port: int, count: int, *, udp: bool = False,
            source_ports: bool = True) -> list[str]:
        """Names that answered ``count`` fresh connections from the client netns."""
        out = in_ns(self.client, sys.executable, "-m", CLIENT, vip, str(port), str(count),
                    "udp" if udp else "tcp").stdout
        return out.split()

    def enable_ipv6(self) -> list[str]:
        """IPv6 beside IPv4: client fd00:99::2 reaches fd00:96::/112 via the node
        (fd00:99::1), backends fd00:244:9::2, ::3, ... on the node's bridge; returns the
        backends' IPv6 addresses (same order as ``backends``). Once per topology: later
        calls return the same addresses."""
        if self.ipv6:
            return list(self.ipv6)
        in_ns(self.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        in_ns(self.client, "ip", "-6", "addr", "add", "fd00:99::2/64", "dev", f"c{self.tag}", "nodad")
        in_ns(self.client, "ip", "-6", "route", "add", "fd00:96::/112", "via", "fd00:99::1")
        in_ns(self.node, "ip", "-6", "addr", "add", "fd00:99::1/64", "dev", f"n{self.tag}", "nodad")
        in_ns(self.node, "ip", "-6", "addr", "add", "fd00:244:9::1/64", "dev", "br0", "nodad")
        out = []
        for i in range(len(self.backends)):
            addr = f"fd00:244:9::{i + 2}"
            in_ns(self.backend_ns(i), "ip", "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad")
            in_ns(self.backend_ns(i), "ip", "-6", "route", "add", "fd00:99::/64", "via", "fd00:244:9::1")
            out.append(addr)
        self.ipv6 = out
        return list(out)

    def connect_error(self, vip: str, port: int, *, udp: bool = False) -> str:
        """How one TCP connect (or UDP request) from the client netns ends (see burst.py)."""
        return in_ns(self.client, sys.executable, "-m", CLIENT, vip, str(port), "1",
                     "udp-error" if udp else "tcp-error").stdout.strip()

    def route_services_nowhere(self) -> None:
        """Give the node a route for the service CIDR into a dummy link, like a real
        node's default route: a VIP that nothing DNATs is then silently lost (a hang),
        not refused by the routing table."""
        # A veth whose peer drops every frame: the next hop's MAC is nobody's.
        in_ns(self.node, "ip", "link", "add", "nowhere0", "type", "veth", "peer", "name", "nowhere1")
        in_ns(self.node, "ip", "link", "set", "nowhere1", "up")
        in_ns(self.node, "ip", "addr", "add", "10.98.0.1/24", "dev", "nowhere0")
        in_ns(self.node, "ip", "link", "set", "nowhere0", "up")
        in_ns(self.node, "ip", "neigh", "add", "10.98.0.2", "lladdr", "02:00:00:00:00:02", "dev",
              "nowhere0", "nud", "permanent")
        in_ns(self.node, "ip", "route", "add", "10.96.0.0/16", "via", "10.98.0.2", "dev", "nowhere0")

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for ns in [self.client, *(self.backend_ns(i) for i in range(len(self.backends))),
                   self.node]:
            sh("ip", "netns", "del", ns, check=False)


@dataclass
class PathTopology:
    """client netns <-veth-> node netns <-veth-> backend netns, for the data-path benchmark;
    ``argv(*args)`` is the command line a role's process runs inside its namespace."""

    argv: Callable[..., list[str]]

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"svcpdp-{self.tag}-{role}"

    def create(self) -> None:
        node, cli, be = self.ns("node"), self.ns("cli"), self.ns("be")
        for name in (node, cli, be):
            sh("ip", "netns", "add", name)
        cmds = [f"-n {n} link set lo up" for n in (node, cli, be)]
        for name, peer, addr, gw in ((cli, "cl0", CLIENT_IP, NODE_CLIENT_SIDE),
                                     (be, "be0", BACKEND_IP, NODE_BACKEND_SIDE)):
            cmds += [f"link add eth0 netns {name} type veth peer name {peer} netns {node}",
                     f"-n {name} addr add {addr}/24 dev eth0", f"-n {name} link set eth0 up",
                     f"-n {node} addr add {gw}/24 dev {peer}", f"-n {node} link set {peer} up",
                     f"-n {name} route add {POD_CIDR} via {gw}"]  # via the node; no default route
        cmds += [f"-n {cli} addr add {CLIENT_VIP_IP}/24 dev eth0",
                 f"-n {cli} route add 10.96.0.0/16 via {NODE_CLIENT_SIDE} src {CLIENT_VIP_IP}"]
        for cmd in cmds:
            sh("ip", *cmd.split())
        sh("ip", "netns", "exec", node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # New-connection rounds open tens of thousands of connections to one address:
        # a wide port range and TIME_WAIT reuse keep the client from running out of ports.
        sh("ip", "netns", "exec", cli, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535",
           "net.ipv4.tcp_tw_reuse=1")

    def start(self, role: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), *self.argv(*args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                if proc.stdin:
                    proc.stdin.close()  # lets --program clean up its rules
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for role in ("cli", "be", "node"):
            subprocess.run(["ip", "netns", "del", self.ns(role)], capture_output=True, check=False)


def require_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates network namespaces and programs netfilter"
    if sh("ip", "netns", "list", check=False).returncode != 0:
        return "`ip netns` does not work here"
    return None


def wait_for(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return True
        time.sleep(0.05)
    return False
