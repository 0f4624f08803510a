"""Host-side plumbing of the lab: bridge, blackhole routes, node and client namespaces.

Called by ``cluster.py`` (bridge, blackholes, teardown sweep), by
``node.NetnsNode`` (its namespace) and by ``cli.py`` (client namespaces). It
drives the ``ip`` and ``sysctl`` tools, because only the dataplane's kernel
adapters may import pyroute2. No namespace made here gets a default route
(network safety rule): traffic can only reach the lab's own addresses.

Address plan: bridge ``svcpbr0`` 172.29.0.1/24 in the root namespace; node i
is namespace ``svcp-node-i`` with ``eth0`` 172.29.0.(10+i)/24 and Pod CIDR
10.244.i.0/24, whose ``.1`` is the node's gateway address on every pod and
client veth; the client namespace ``svcp-node-i-client`` has 10.244.i.254/32 (its
default source) and 10.244.i.251-253/32 beside it, so that one node has several
distinct clients (a source-hash scheduler pins each of them, see ``probe.py --source``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence

BRIDGE = "svcpbr0"
BRIDGE_IP = "172.29.0.1"
BRIDGE_CIDR = f"{BRIDGE_IP}/24"
LAB_SUBNET = "172.29.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_POD_CIDR = "10.244.0.0/16"
BLACKHOLES = (SERVICE_CIDR, CLUSTER_POD_CIDR)
# Only these names are the lab's: other svcp-* namespaces (dataplane tests) are left alone.
LAB_NETNS = re.compile(r"^svcp-(node-\d+(-client)?|p\d+-[0-9a-f-]+)$")
LAB_LINK = re.compile(r"^(svcpbr0|svcp-n\d+)$")


class NetworkError(RuntimeError):
    """An ``ip`` command failed; the message names the command and its error."""


def sh(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run in ``netns`` (network namespace only, see ``node.NetnsNode``)."""
    return ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]


def netns_list() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_exists(name: str, netns: str | None = None) -> bool:
    argv = ["ip", "link", "show", "dev", name]
    if netns:
        argv[1:1] = ["-n", netns]
    return sh(argv, check=False).returncode == 0


def client_netns(index: int) -> str:
    return f"svcp-node-{index}-client"


def host_veth(index: int) -> str:
    return f"svcp-n{index}"  # <= 15 characters for any sane node count


# --- root namespace -----------------------------------------------------------


def ensure_bridge() -> None:
    """Bridge with the API server's address, and blackholes for the cluster's CIDRs."""
    if not link_exists(BRIDGE):
        sh(["ip", "link", "add", BRIDGE, "type", "bridge"])
    if BRIDGE_IP not in sh(["ip", "-br", "addr", "show", "dev", BRIDGE]).stdout:
        sh(["ip", "addr", "add", BRIDGE_CIDR, "dev", BRIDGE])
    sh(["ip", "link", "set", BRIDGE, "up"])
    # Traffic to a ClusterIP or Pod IP from the root namespace must go nowhere,
    # rather than out of the default route to the real network.
    for cidr in BLACKHOLES:
        sh(["ip", "route", "replace", "blackhole", cidr])


def remove_bridge() -> None:
    for cidr in BLACKHOLES:
        sh(["ip", "route", "del", "blackhole", cidr], check=False)
    if link_exists(BRIDGE):
        sh(["ip", "link", "del", BRIDGE])


# --- node namespaces ------------------------------------------------------------


def _sysctl(netns: str, setting: str) -> None:
    sh(in_netns(netns, ["sysctl", "-q", "-w", setting]))


def create_node_netns(netns: str, index: int, node_count: int) -> None:
    """Namespace ``netns`` for node ``index`` wired to the bridge; idempotent."""
    address = f"172.29.0.{10 + index}"
    if netns not in netns_list():
        sh(["ip", "netns", "add", netns])
    veth = host_veth(index)
    if not link_exists("eth0", netns):
        if link_exists(veth):
            sh(["ip", "link", "del", veth])  # half of an earlier, broken attempt
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    sh(["ip", "link", "set", veth, "master", BRIDGE, "up"])
    sh(["ip", "-n", netns, "link", "set", "lo", "up"])
    if address not in sh(["ip", "-n", netns, "-br", "addr", "show", "dev", "eth0"]).stdout:
        sh(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0"])
    sh(["ip", "-n", netns, "link", "set", "eth0", "up"])
    _sysctl(netns, "net.ipv4.ip_forward=1")
    # Asymmetric paths (client -> service on node A -> pod on node B) are normal here.
    _sysctl(netns, "net.ipv4.conf.all.rp_filter=0")
    _sysctl(netns, "net.ipv4.conf.default.rp_filter=0")
    # Node-local clients of a ClusterIP need a route before kube-proxy's OUTPUT DNAT (or
    # the agent's) runs; real nodes use their default route. Via the bridge it ends in
    # the root namespace's blackhole if nothing translated it.
    sh(["ip", "-n", netns, "route", "replace", SERVICE_CIDR, "via", BRIDGE_IP, "dev", "eth0"])
    for other in range(1, node_count + 1):
        if other != index:
            sh(["ip", "-n", netns, "route", "replace", f"10.244.{other}.0/24",
                "via", f"172.29.0.{10 + other}", "dev", "eth0"])


def kill_netns_processes(netns: str) -> None:
    """SIGKILL whatever still runs in ``netns`` (a namespace with a process outlives deletion)."""
    out = sh(["ip", "netns", "pids", netns], check=False).stdout
    for pid in out.split():
        sh(["kill", "-9", pid], check=False)


def delete_netns(netns: str) -> None:
    if netns in netns_list():
        kill_netns_processes(netns)
        sh(["ip", "netns", "del", netns], check=False)


def destroy_node_netns(netns: str, index: int) -> None:
    """Remove node ``index``: its pods' namespaces, its client namespace, itself."""
    for name in netns_list():
        if name.startswith(f"svcp-p{index}-"):
            delete_netns(name)
    delete_netns(client_netns(index))
    delete_netns(netns)
    if link_exists(host_veth(index)):
        sh(["ip", "link", "del", host_veth(index)], check=False)


# --- client namespaces ----------------------------------------------------------


CLIENT_SOURCES = 4  # addresses per client namespace: .254 down to .251 (Pods get .2-.250)


def client_address(index: int) -> str:
    """The client namespace's default source address."""
    return f"10.244.{index}.254"


def client_addresses(index: int) -> list[str]:
    """Every source address of the client namespace behind node ``index``, default first."""
    return [f"10.244.{index}.{254 - k}" for k in range(CLIENT_SOURCES)]


def ensure_client_netns(index: int) -> str:
    """Client namespace behind node ``index``: ``10.244.i.251-254/32``, lab routes only."""
    node_ns = f"svcp-node-{index}"
    if node_ns not in netns_list():
        raise NetworkError(f"node namespace {node_ns} does not exist: run `svcproxy lab up` first")
    name = client_netns(index)
    gateway = f"10.244.{index}.1"
    address = client_address(index)
    if name not in netns_list():
        sh(["ip", "netns", "add", name])
    if not link_exists("eth0", name):
        if link_exists("client0", node_ns):
            sh(["ip", "-n", node_ns, "link", "del", "client0"])
        sh(["ip", "-n", node_ns, "link", "add", "client0", "type", "veth",
            "peer", "name", "eth0", "netns", name])
    if gateway not in sh(["ip", "-n", node_ns, "-br", "addr", "show", "dev", "client0"]).stdout:
        sh(["ip", "-n", node_ns, "addr", "add", f"{gateway}/32", "dev", "client0"])
    sh(["ip", "-n", node_ns, "link", "set", "client0", "up"])
    sh(["ip", "-n", name, "link", "set", "lo", "up"])
    present = sh(["ip", "-n", name, "-br", "addr", "show", "dev", "eth0"]).stdout.split()
    for source in client_addresses(index):
        sh(["ip", "-n", node_ns, "route", "replace", f"{source}/32", "dev", "client0",
            "scope", "link", "src", gateway])
        if f"{source}/32" not in present:
            sh(["ip", "-n", name, "addr", "add", f"{source}/32", "dev", "eth0"])
    sh(["ip", "-n", name, "link", "set", "eth0", "up"])
    sh(["ip", "-n", name, "route", "replace", gateway, "dev", "eth0", "scope", "link"])
    for cidr in (SERVICE_CIDR, CLUSTER_POD_CIDR, LAB_SUBNET):
        sh(["ip", "-n", name, "route", "replace", cidr, "via", gateway, "dev", "eth0",
            "src", address])
    return name


# --- sweep ------------------------------------------------------------------------


def leftovers() -> list[str]:
    """Everything of a lab still present: namespaces, links, routes (empty when clean)."""
    found = [f"netns {n}" for n in netns_list() if LAB_NETNS.match(n)]
    found += [f"link {name}" for name in _links() if LAB_LINK.match(name)]
    routes = sh(["ip", "route", "show"], check=False).stdout
    for line in routes.splitlines():
        if any(c in line for c in (*BLACKHOLES, "172.29.0.")):
            found.append(f"route {line.strip()}")
    return found


def sweep() -> None:
    """Remove every lab namespace, link and route, whichever lab made them."""
    for name in netns_list():
        if LAB_NETNS.match(name):
            delete_netns(name)
    for name in _links():
        if LAB_LINK.match(name) and name != BRIDGE:
            sh(["ip", "link", "del", name], check=False)
    remove_bridge()


def _links() -> list[str]:
    out = sh(["ip", "-br", "link"], check=False).stdout
    return [line.split()[0].split("@")[0] for line in out.splitlines() if line.strip()]
