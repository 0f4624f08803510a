"""The netfilter rules of the ``userspace`` mode's portals, as iptables-restore text; pure.

Called by ``svcproxy.dataplane.userspace.proxier``. Each virtual server (a portal) has
one listener; its rules in the nat chain ``SVCPROXY-PORTALS`` (a VIP, by ``-d``) or
``SVCPROXY-PORTALS-NODEPORTS`` (a node port, by protocol and port) REDIRECT new
connections there (:func:`portal_rules`), or to the refusing port while the portal has
no usable endpoint. Source ranges (a load-balancer IP's, ``VirtualServer.source_ranges``)
are matched here, before the agent sees a connection, as kube-proxy's KUBE-FW chain
does: one REDIRECT per range and one for the node itself (``-m addrtype --src-type
LOCAL``); what no rule takes is left with the VIP as its destination, and a DROP in the
filter chain ``SVCPROXY-PORTALS-FIREWALL`` (jumped to from INPUT, FORWARD and OUTPUT)
matches only such packets: a redirected one is addressed to the node's listener port.
With no usable endpoint at all every client is refused, as in the iptables mode.

Traffic policies Local (``VirtualServer.local_policy``) with the iptables mode's
meaning, chosen by source here too (:func:`scopes` gives each listener's endpoints):
"internal" (a ClusterIP) has one listener choosing among this node's endpoints only;
"external" (node port, external or LB IP) a second one for them: connections from the
cluster CIDRs (Pods) and from the node itself go to the portal's listener, which
chooses among every endpoint, all others to the local one. With endpoints but none on
this node the traffic the local scope would take is dropped. Unlike the iptables mode
the backend never sees the client's address: the agent itself connects to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from svcproxy.base import IPFamily
from svcproxy.dataplane.nfkernel import Jump
from svcproxy.dataplane.table import VirtualServer

CHAIN = "SVCPROXY-PORTALS"
NODEPORTS = "SVCPROXY-PORTALS-NODEPORTS"  # under CHAIN's name: cleanup's prefix removes both
FIREWALL = "SVCPROXY-PORTALS-FIREWALL"  # filter table: what the nat rules left at a VIP
# The portal chain's last rule, always present: into the node ports, for local destinations.
NODEPORTS_JUMP = (
    f"-A {CHAIN} -m comment --comment svcproxy-portals-nodeports -m addrtype --dst-type LOCAL"
    f" -j {NODEPORTS}"
)
JUMPS = (
    Jump("nat", "PREROUTING", f"-m comment --comment svcproxy-portals -j {CHAIN}"),
    Jump("nat", "OUTPUT", f"-m comment --comment svcproxy-portals -j {CHAIN}"),
)
FILTER_JUMPS = tuple(
    Jump("filter", chain, f"-m comment --comment svcproxy-portals-firewall -j {FIREWALL}")
    for chain in ("INPUT", "FORWARD", "OUTPUT")
)


@dataclass(frozen=True)
class PortalRules:
    """One portal's rules: nat lines in order ("-A CHAIN ..."), and its filter DROP ("" none)."""

    nat: tuple[str, ...]
    drop: str = ""


def _usable(vs: VirtualServer) -> bool:
    return any(r.weight > 0 for r in vs.real_servers)


def _local_usable(vs: VirtualServer) -> bool:
    return any(r.weight > 0 and r.local for r in vs.real_servers)


def scopes(vs: VirtualServer) -> tuple[VirtualServer, VirtualServer | None]:
    """The endpoints each listener of ``vs`` chooses among, as virtual servers for their
    balancers: (the portal's listener, the local listener of an "external" policy or
    None). "internal": this node's only; "external": every endpoint for the first (but
    ``cluster_drain`` ones drained), this node's for the second."""
    if vs.local_policy == "internal":
        return vs.with_reals(r for r in vs.real_servers if r.local), None
    if vs.local_policy == "external":
        cluster = vs.with_reals(replace(r, weight=0) if r.cluster_drain else r for r in vs.real_servers)
        return cluster, vs.with_reals(r for r in vs.real_servers if r.local)
    return vs, None


def _within(source: str, cidr: str) -> str | None:
    """Where the source match ``source`` ("" every client) and ``cidr`` meet: the smaller
    network (two networks either nest or are disjoint), or None."""
    if not source:
        return cidr
    a, b = ipaddress.ip_network(source), ipaddress.ip_network(cidr)
    if a.version != b.version or not a.overlaps(b):
        return None
    return source if a.prefixlen >= b.prefixlen else cidr


def _head(vs: VirtualServer, chain: str, *, src: str = "", match: str = "") -> str:
    """``-A <chain> [-s SRC] [-d VIP] -p <proto> -m comment ... [MATCH]``, in the order
    iptables-save prints a rule's parts."""
    proto = vs.protocol.lower()
    source = f" -s {src}" if src else ""
    dst = "" if vs.is_node_port else f" -d {vs.address}/{IPFamily.of(vs.address).host_prefix}"
    extra = f" {match}" if match else ""
    return f"-A {chain}{source}{dst} -p {proto} -m comment --comment {vs.owner or '-'}{extra}"


def _redirect(vs: VirtualServer, port: int, *, src: str = "", match: str = "") -> str:
    proto = vs.protocol.lower()
    chain = NODEPORTS if vs.is_node_port else CHAIN
    return (f"{_head(vs, chain, src=src, match=match)} -m {proto} --dport {vs.port}"
            f" -j REDIRECT --to-ports {port}")


def _drop(vs: VirtualServer) -> str:
    """The filter rule dropping what no nat rule of ``vs`` redirected."""
    proto = vs.protocol.lower()
    local = "-m addrtype --dst-type LOCAL" if vs.is_node_port else ""
    return f"{_head(vs, FIREWALL, match=local)} -m {proto} --dport {vs.port} -j DROP"


_LOCAL = "-m addrtype --src-type LOCAL"


Source = tuple[str, str]  # a rule's source: (-s network or "", match or "")


def portal_rules(vs: VirtualServer, port: int, refuse_port: Callable[[], int], *,
                 local_port: int | None = None, cluster_cidrs: Sequence[str] = ()) -> PortalRules:
    """The rules of ``vs``, listening on ``port`` (and, under an "external" policy, on
    ``local_port`` for outside clients; Pods are told by ``cluster_cidrs``);
    ``refuse_port()`` is the port that refuses (asked for only when needed: the proxier
    binds it on first use)."""
    if not _usable(vs):
        return PortalRules((_redirect(vs, refuse_port()),))
    allowed: list[Source] = [("", "")]  # every client
    if vs.source_ranges is not None:
        allowed = [(cidr, "") for cidr in vs.source_ranges] + [("", _LOCAL)]
    firewall = _drop(vs) if vs.source_ranges is not None else ""
    if vs.local_policy == "internal" and not _local_usable(vs):
        return PortalRules((), _drop(vs))
    if vs.local_policy != "external":
        return PortalRules(tuple(_redirect(vs, port, src=s, match=m) for s, m in allowed), firewall)
    family = IPFamily.of(vs.address)
    # Pods (the allowed part of the cluster CIDRs) and the node go to every endpoint.
    cluster: list[Source] = []
    for src, match in allowed:
        for cidr in cluster_cidrs if not match else ():
            if IPFamily.of(cidr) is family and (both := _within(src, cidr)) is not None:
                cluster.append((both, ""))
    cluster = list(dict.fromkeys([*cluster, ("", _LOCAL)]))
    nat = [_redirect(vs, port, src=s, match=m) for s, m in cluster]
    if local_port is None or not _local_usable(vs):
        return PortalRules(tuple(nat), _drop(vs))  # outside clients: none here
    nat += [_redirect(vs, local_port, src=s) for s, m in allowed if not m]
    return PortalRules(tuple(nat), firewall)


def added(rule: str) -> list[str]:
    """How a partial sync adds one rule: VIP rules at the top of the portal chain (ahead of
    its last rule, the jump into the node ports), node-port and filter rules appended."""
    head = f"-A {CHAIN} "
    return [f"-I {CHAIN} 1 {rule[len(head):]}"] if rule.startswith(head) else [rule]


Change = tuple[PortalRules | None, PortalRules | None]


def changed_lines(pairs: Sequence[Change]) -> tuple[list[str], list[str]]:
    """A partial sync's restore lines (nat, filter) for portals whose rules went from the
    first of each pair to the second (None: no portal, or none written yet)."""
    nat: list[str] = []
    drops: list[str] = []
    for old, new in pairs:
        if old == new:
            continue
        before = old or PortalRules(())
        after = new or PortalRules(())
        if before.nat != after.nat:
            nat += ["-D" + r[2:] for r in before.nat]
            # Inserted at the top one by one, the VIP rules are added last first.
            vips = [r for r in after.nat if r.startswith(f"-A {CHAIN} ")]
            nat += [line for r in reversed(vips) for line in added(r)]
            nat += [r for r in after.nat if not r.startswith(f"-A {CHAIN} ")]
        if before.drop != after.drop:
            drops += (["-D" + before.drop[2:]] if before.drop else []) + ([after.drop] if after.drop else [])
    return nat, drops


def full_chains(rules: list[str]) -> str:
    """The nat restore input rewriting both chains: VIP rules, the node-port jump last,
    then the node-port rules."""
    vips = [r for r in rules if r.startswith(f"-A {CHAIN} ")]
    ports = [r for r in rules if not r.startswith(f"-A {CHAIN} ")]
    lines = [f":{CHAIN} - [0:0]", f":{NODEPORTS} - [0:0]", *vips, NODEPORTS_JUMP, *ports]
    return "*nat\n" + "\n".join(lines) + "\nCOMMIT\n"


def full_filter(drops: list[str]) -> str:
    """The filter restore input rewriting the firewall chain."""
    return "*filter\n" + "\n".join([f":{FIREWALL} - [0:0]", *drops]) + "\nCOMMIT\n"
