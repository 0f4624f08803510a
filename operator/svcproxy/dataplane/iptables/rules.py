"""NAT rules of the ``iptables`` mode, as iptables-restore text; pure.

Called by ``svcproxy.dataplane.iptables.proxier``. kube-proxy's semantics
in the project's own chains: ``SVCPROXY-SERVICES`` (jumped to from nat
PREROUTING and OUTPUT) matches VIP:port/protocol and jumps to one
``SVCPROXY-SVC-<hash>`` chain per virtual server, which picks one ready
endpoint (weight > 0) with ``-m statistic --mode random --probability``
(weight-proportional: equal weights give kube-proxy's even choice) and
jumps to a ``SVCPROXY-SEP-<hash>`` chain that DNATs. ClientIP affinity uses
``-m recent`` per endpoint with the persistence timeout. Traffic from
outside the cluster CIDRs, and hairpin traffic, is marked and masqueraded
in ``SVCPROXY-POSTROUTING``. Draining endpoints (weight 0) get no new
connections; established ones continue through conntrack.

A node-port virtual server (address 0.0.0.0 or ::, see ``VirtualServer.is_node_port``) is
matched in ``SVCPROXY-NODEPORTS`` instead, by protocol and port only; that chain
is jumped to from nat PREROUTING and OUTPUT for destinations local to the node
(``-m addrtype --dst-type LOCAL``, as kube-proxy's KUBE-NODEPORTS), and its
traffic is always marked for masquerade, so replies come back through this node.
External and load-balancer IPs are plain VIPs in ``SVCPROXY-SERVICES``.

Traffic policies Local (``VirtualServer.local_policy``, real servers marked ``local``):
"internal" (a ClusterIP) picks among the node's own endpoints only, masquerading as
for any ClusterIP. "external" (node port, external or LB IP) picks among the node's
own endpoints without the masquerade mark, so the backend sees the client's address;
traffic from the cluster CIDRs (Pods) and from the node itself is first sent to a
``SVCPROXY-CLU-<hash>`` chain choosing among every endpoint, the node's own traffic
marked for masquerade (as kube-proxy's KUBE-EXT chain does). With ready endpoints but
none on this node, the filter chain drops the traffic (REJECT is for no endpoints).
Which endpoints take new connections in each scope (ready ones, else serving-terminating
ones) is decided by the agent's conversion: weight 0 drains, and ``cluster_drain`` keeps
a local endpoint out of the cluster chain only.

Source ranges (``VirtualServer.source_ranges``, a load-balancer IP's
loadBalancerSourceRanges), as kube-proxy's KUBE-FW chain: the IP's jump in
``SVCPROXY-SERVICES`` leads to a ``SVCPROXY-FWL-<hash>`` chain that sends only
connections from those networks, and from the node itself (``-m addrtype --src-type
LOCAL``), on to the service chain; the others leave it without DNAT and meet a DROP in
``SVCPROXY-NO-ENDPOINTS``, which only packets still addressed to the VIP reach. With no
endpoint at all that rule is the REJECT, for every client (as kube-proxy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from svcproxy.base import IPFamily
from svcproxy.dataplane.nfkernel import Jump
from svcproxy.dataplane.table import RealServer, VirtualServer, VSKey

PREFIX = "SVCPROXY-"
SERVICES = "SVCPROXY-SERVICES"
NODEPORTS = "SVCPROXY-NODEPORTS"
MARK_MASQ = "SVCPROXY-MARK-MASQ"
POSTROUTING = "SVCPROXY-POSTROUTING"
MASQ_MARK = "0x4000"
BASE_CHAINS = (SERVICES, NODEPORTS, MARK_MASQ, POSTROUTING)
# The chains holding one jump per virtual server: never flushed, repaired rule by rule.
JUMP_CHAINS = (SERVICES, NODEPORTS)
# Chains this mode owns (the userspace mode owns SVCPROXY-PORTALS, ipvs SVCPROXY-IPVS-*).
OWNED_PREFIXES = (
    "SVCPROXY-SERVICES", NODEPORTS, "SVCPROXY-SVC-", "SVCPROXY-CLU-", "SVCPROXY-FWL-", "SVCPROXY-SEP-",
    MARK_MASQ, POSTROUTING,
)
# ensure_jumps inserts each missing jump at the top, in this order: the node ports end
# up after the services (as kube-proxy's KUBE-NODEPORTS comes last).
_NODEPORTS_JUMP = f"-m comment --comment svcproxy-nodeports -m addrtype --dst-type LOCAL -j {NODEPORTS}"
JUMPS = (
    Jump("nat", "PREROUTING", _NODEPORTS_JUMP),
    Jump("nat", "OUTPUT", _NODEPORTS_JUMP),
    Jump("nat", "PREROUTING", f"-m comment --comment svcproxy-services -j {SERVICES}"),
    Jump("nat", "OUTPUT", f"-m comment --comment svcproxy-services -j {SERVICES}"),
    Jump("nat", "POSTROUTING", f"-m comment --comment svcproxy-postrouting -j {POSTROUTING}"),
)

# filter table: VIP:port of services with no ready endpoint get REJECT (ICMP port
# unreachable: a TCP client's connect fails at once with ECONNREFUSED) instead of
# silence, as kube-proxy does. Hooked where the packet still has the VIP as destination.
NO_ENDPOINTS = "SVCPROXY-NO-ENDPOINTS"
FILTER_JUMPS = tuple(
    Jump("filter", chain, f"-m comment --comment svcproxy-no-endpoints -j {NO_ENDPOINTS}")
    for chain in ("INPUT", "FORWARD", "OUTPUT")
)


def owned_chain(name: str) -> bool:
    return name.startswith(OWNED_PREFIXES)


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)  # 10 bits -> two characters


def _hash(text: str) -> str:
    """The first 15 base32 characters of sha256(text) (chain names are limited to 28).

    Same value as ``base64.b32encode(digest)[:15]`` (the names chains already carry in
    running kernels), computed from the first 10 bytes, two characters per lookup:
    base64's pure-Python encoder of the whole digest is too slow for a full sync. Not
    cached: a cache of every chain name would hold the longest strings the agent keeps.
    """
    b = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")  # 80 bits
    p = _B32_PAIRS
    return (p[b >> 70] + p[(b >> 60) & 1023] + p[(b >> 50) & 1023] + p[(b >> 40) & 1023]
            + p[(b >> 30) & 1023] + p[(b >> 20) & 1023] + p[(b >> 10) & 1023] + p[b & 1023][0])


def service_chain(key: VSKey) -> str:
    return f"SVCPROXY-SVC-{_hash(str(key))}"


def cluster_chain(key: VSKey) -> str:
    """The chain choosing among every endpoint of an "external" local-policy server."""
    return f"SVCPROXY-CLU-{_hash(str(key))}"


def firewall_chain(key: VSKey) -> str:
    """The chain letting only a load-balancer IP's source ranges (and the node) through."""
    return f"SVCPROXY-FWL-{_hash(str(key))}"


def _entry(vs: VirtualServer) -> str:
    """The chain ``vs``'s jump leads to: its firewall chain when it has source ranges."""
    return firewall_chain(vs.key) if vs.source_ranges is not None else service_chain(vs.key)


def endpoint_chain(key: VSKey, real: RealServer) -> str:
    return f"SVCPROXY-SEP-{_hash(f'{key}>{real.address}:{real.port}')}"


def _host(address: str) -> str:
    return f"{address}/{IPFamily.of(address).host_prefix}"


def _dest(real: RealServer) -> str:
    return f"{IPFamily.bracketed(real.address)}:{real.port}"


def base_rules() -> list[str]:
    return [
        f"-A {MARK_MASQ} -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}",
        f"-A {POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A {POSTROUTING} -j MARK --set-xmark {MASQ_MARK}/0x0",
        f"-A {POSTROUTING} -j MASQUERADE",
    ]


def service_jump(vs: VirtualServer) -> str:
    """The one rule sending ``vs``'s traffic to its service chain, in SVCPROXY-SERVICES
    (by VIP) or, for a node port, SVCPROXY-NODEPORTS (by port)."""
    proto = vs.protocol.lower()
    if vs.is_node_port:
        return (
            f"-A {NODEPORTS} -p {proto} -m comment --comment {vs.owner or '-'}"
            f" -m {proto} --dport {vs.port} -j {service_chain(vs.key)}"
        )
    return (
        f"-A {SERVICES} -d {_host(vs.address)} -p {proto} -m comment --comment {vs.owner or '-'}"
        f" -m {proto} --dport {vs.port} -j {_entry(vs)}"
    )


def same_rule(line: str) -> str:
    """A rule line as compared with iptables-save output, which quotes some comments
    ("ns/name") but not others; our rules hold no other quotes."""
    return line.replace('"', "")


def _ready(vs: VirtualServer) -> list[RealServer]:
    """The real servers new connections from outside go to: ready ones, and under a
    traffic policy Local only this node's."""
    if vs.local_policy:
        return [r for r in vs.real_servers if r.weight > 0 and r.local]
    return [r for r in vs.real_servers if r.weight > 0]


def _chained(vs: VirtualServer) -> Sequence[RealServer]:
    """The real servers with an endpoint chain: all, except under "internal" (local only)."""
    if vs.local_policy == "internal":
        return [r for r in vs.real_servers if r.local]
    return vs.real_servers  # no copy: this runs for every service of a full sync


def reject_rule(vs: VirtualServer) -> str | None:
    """The filter rule refusing ``vs`` while it has no ready endpoint (REJECT) or, under
    a traffic policy Local, none on this node (DROP, as kube-proxy), or dropping what its
    source ranges kept from DNAT (DROP), else None; spelled as iptables-save prints it."""
    if _ready(vs) and vs.source_ranges is None:
        return None
    proto = vs.protocol.lower()
    icmp = "icmp6-port-unreachable" if IPFamily.is_v6(vs.address) else "icmp-port-unreachable"
    target = f"REJECT --reject-with {icmp}"
    if any(r.weight > 0 for r in vs.real_servers):
        target = "DROP"
    if vs.is_node_port:
        return (
            f"-A {NO_ENDPOINTS} -p {proto} -m comment --comment {vs.owner or '-'} -m addrtype"
            f" --dst-type LOCAL -m {proto} --dport {vs.port} -j {target}"
        )
    return (
        f"-A {NO_ENDPOINTS} -d {_host(vs.address)} -p {proto} -m comment --comment {vs.owner or '-'}"
        f" -m {proto} --dport {vs.port} -j {target}"
    )


def chains_of(vs: VirtualServer) -> list[str]:
    """The per-service and per-endpoint chains ``vs`` uses."""
    cluster = [cluster_chain(vs.key)] if vs.local_policy == "external" else []
    firewall = [firewall_chain(vs.key)] if vs.source_ranges is not None else []
    return [service_chain(vs.key), *firewall, *cluster, *(endpoint_chain(vs.key, r) for r in _chained(vs))]


def _pick(chain: str, vs: VirtualServer, ready: list[RealServer], seps: dict[tuple[str, int], str],
          mask: str) -> list[str]:
    """Rules of ``chain`` choosing one of ``ready`` (affinity first, then weighted random)."""
    rules: list[str] = []
    if vs.persistence:
        for real in ready:
            sep = seps[real.key]
            rules.append(
                f"-A {chain} -m recent --rcheck --seconds {vs.persistence} --reap --name {sep}"
                f" --mask {mask} --rsource -j {sep}"
            )
    remaining = sum(r.weight for r in ready)
    for index, real in enumerate(ready):
        sep = seps[real.key]
        if index == len(ready) - 1:
            rules.append(f"-A {chain} -j {sep}")
        else:
            probability = real.weight / remaining
            rules.append(f"-A {chain} -m statistic --mode random --probability {probability:.11f} -j {sep}")
        remaining -= real.weight
    return rules


def service_rules(vs: VirtualServer, cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> list[str]:
    """Rules of the service chain and its endpoint chains (the chains are declared by the caller)."""
    svc = service_chain(vs.key)
    proto = vs.protocol.lower()
    node_port = vs.is_node_port
    match = f"-p {proto} -m {proto} --dport {vs.port}"
    if not node_port:
        match = f"-d {_host(vs.address)} {match}"
    rules: list[str] = []
    v6 = IPFamily.is_v6(vs.address)
    mask = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if v6 else "255.255.255.255"
    cidrs = [c for c in cluster_cidrs if IPFamily.is_v6(c) == v6]
    seps = {r.key: endpoint_chain(vs.key, r) for r in _chained(vs)}
    if vs.source_ranges is not None:
        # Only the ranges and the node itself reach the service chain (kube-proxy lets the
        # node in when a range holds its IP; here always: its own traffic is trusted).
        fw = firewall_chain(vs.key)
        rules += [f"-A {fw} -s {cidr} -j {svc}" for cidr in vs.source_ranges]
        rules.append(f"-A {fw} -m addrtype --src-type LOCAL -j {svc}")
    if vs.local_policy == "external":
        # Pods and the node itself reach every endpoint (the node's traffic masqueraded);
        # everyone else only this node's endpoints, unmasqueraded: the client address stays.
        cluster = cluster_chain(vs.key)
        rules += [f"-A {svc} -s {cidr} -j {cluster}" for cidr in cidrs]
        rules += [f"-A {svc} -m addrtype --src-type LOCAL -j {MARK_MASQ}",
                  f"-A {svc} -m addrtype --src-type LOCAL -j {cluster}"]
        rules += _pick(svc, vs, _ready(vs), seps, mask)
        rules += _pick(cluster, vs, [r for r in vs.real_servers if r.weight > 0 and not r.cluster_drain],
                       seps, mask)
    else:
        if masquerade_all or not cidrs or node_port:  # node ports: replies must come back here
            rules.append(f"-A {svc} {match} -j {MARK_MASQ}")
        else:
            rules += [f"-A {svc} ! -s {cidr} {match} -j {MARK_MASQ}" for cidr in cidrs[:1]]
        rules += _pick(svc, vs, _ready(vs), seps, mask)
    for real in _chained(vs):
        sep = seps[real.key]
        rules.append(f"-A {sep} -s {_host(real.address)} -j {MARK_MASQ}")  # hairpin
        recent = f" -m recent --set --name {sep} --mask {mask} --rsource" if vs.persistence else ""
        rules.append(f"-A {sep} -p {proto}{recent} -m {proto} -j DNAT --to-destination {_dest(real)}")
    return rules


def rule_count(vs: VirtualServer, cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> int:
    """How many rules ``vs`` owns (its jump + :func:`service_rules`), without writing them."""
    if vs.local_policy or vs.source_ranges is not None:  # rare: counted by writing them
        return 1 + (reject_rule(vs) is not None) + len(service_rules(vs, cluster_cidrs, masquerade_all))
    del cluster_cidrs, masquerade_all  # one masquerade rule either way (see service_rules)
    ready = sum(1 for r in vs.real_servers if r.weight > 0)
    reject = 0 if ready else 1  # reject_rule
    return 2 + reject + ready * (2 if vs.persistence else 1) + 2 * len(vs.real_servers)
