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

A node-port virtual server (address 0.0.0.0 or ::, see :func:`is_node_port`) is
matched in ``SVCPROXY-NODEPORTS`` instead, by protocol and port only; that chain
is jumped to from nat PREROUTING and OUTPUT for destinations local to the node
(``-m addrtype --dst-type LOCAL``, as kube-proxy's KUBE-NODEPORTS), and its
traffic is always marked for masquerade, so replies come back through this node.
External and load-balancer IPs are plain VIPs in ``SVCPROXY-SERVICES``.
"""

from __future__ import annotations

import hashlib

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
OWNED_PREFIXES = ("SVCPROXY-SERVICES", NODEPORTS, "SVCPROXY-SVC-", "SVCPROXY-SEP-", MARK_MASQ, POSTROUTING)
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


def is_node_port(vs: VirtualServer) -> bool:
    """``vs`` is a node port: served on every local address (0.0.0.0 or ::, normalised)."""
    return vs.address in ("0.0.0.0", "::")


def service_jump(vs: VirtualServer) -> str:
    """The one rule sending ``vs``'s traffic to its service chain, in SVCPROXY-SERVICES
    (by VIP) or, for a node port, SVCPROXY-NODEPORTS (by port)."""
    proto = vs.protocol.lower()
    if is_node_port(vs):
        return (
            f"-A {NODEPORTS} -p {proto} -m comment --comment {vs.owner or '-'}"
            f" -m {proto} --dport {vs.port} -j {service_chain(vs.key)}"
        )
    return (
        f"-A {SERVICES} -d {_host(vs.address)} -p {proto} -m comment --comment {vs.owner or '-'}"
        f" -m {proto} --dport {vs.port} -j {service_chain(vs.key)}"
    )


def same_rule(line: str) -> str:
    """A rule line as compared with iptables-save output, which quotes some comments
    ("ns/name") but not others; our rules hold no other quotes."""
    return line.replace('"', "")


def reject_rule(vs: VirtualServer) -> str | None:
    """The filter rule refusing ``vs`` while it has no ready endpoint (else None), spelled
    as iptables-save prints it."""
    if any(r.weight > 0 for r in vs.real_servers):
        return None
    proto = vs.protocol.lower()
    icmp = "icmp6-port-unreachable" if IPFamily.is_v6(vs.address) else "icmp-port-unreachable"
    if is_node_port(vs):
        return (
            f"-A {NO_ENDPOINTS} -p {proto} -m comment --comment {vs.owner or '-'} -m addrtype"
            f" --dst-type LOCAL -m {proto} --dport {vs.port} -j REJECT --reject-with {icmp}"
        )
    return (
        f"-A {NO_ENDPOINTS} -d {_host(vs.address)} -p {proto} -m comment --comment {vs.owner or '-'}"
        f" -m {proto} --dport {vs.port} -j REJECT --reject-with {icmp}"
    )


def chains_of(vs: VirtualServer) -> list[str]:
    """The per-service and per-endpoint chains ``vs`` uses."""
    return [service_chain(vs.key), *(endpoint_chain(vs.key, r) for r in vs.real_servers)]


def service_rules(vs: VirtualServer, cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> list[str]:
    """Rules of the service chain and its endpoint chains (the chains are declared by the caller)."""
    svc = service_chain(vs.key)
    proto = vs.protocol.lower()
    node_port = is_node_port(vs)
    match = f"-p {proto} -m {proto} --dport {vs.port}"
    if not node_port:
        match = f"-d {_host(vs.address)} {match}"
    rules: list[str] = []
    v6 = IPFamily.is_v6(vs.address)
    cidrs = [c for c in cluster_cidrs if IPFamily.is_v6(c) == v6]
    if masquerade_all or not cidrs or node_port:  # node ports: replies must come back here
        rules.append(f"-A {svc} {match} -j {MARK_MASQ}")
    else:
        rules += [f"-A {svc} ! -s {cidr} {match} -j {MARK_MASQ}" for cidr in cidrs[:1]]
    ready = [r for r in vs.real_servers if r.weight > 0]
    seps = {r.key: endpoint_chain(vs.key, r) for r in vs.real_servers}
    if vs.persistence:
        for real in ready:
            sep = seps[real.key]
            rules.append(
                f"-A {svc} -m recent --rcheck --seconds {vs.persistence} --reap --name {sep}"
                f" --mask {'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff' if v6 else '255.255.255.255'}"
                f" --rsource -j {sep}"
            )
    remaining = sum(r.weight for r in ready)
    for index, real in enumerate(ready):
        sep = seps[real.key]
        if index == len(ready) - 1:
            rules.append(f"-A {svc} -j {sep}")
        else:
            probability = real.weight / remaining
            rules.append(f"-A {svc} -m statistic --mode random --probability {probability:.11f} -j {sep}")
        remaining -= real.weight
    for real in vs.real_servers:
        sep = seps[real.key]
        rules.append(f"-A {sep} -s {_host(real.address)} -j {MARK_MASQ}")  # hairpin
        recent = ""
        if vs.persistence:
            mask = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff" if v6 else "255.255.255.255"
            recent = f" -m recent --set --name {sep} --mask {mask} --rsource"
        rules.append(f"-A {sep} -p {proto}{recent} -m {proto} -j DNAT --to-destination {_dest(real)}")
    return rules


def rule_count(vs: VirtualServer, cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> int:
    """How many rules ``vs`` owns (its jump + :func:`service_rules`), without writing them."""
    del cluster_cidrs, masquerade_all  # one masquerade rule either way (see service_rules)
    ready = sum(1 for r in vs.real_servers if r.weight > 0)
    reject = 0 if ready else 1  # reject_rule
    return 2 + reject + ready * (2 if vs.persistence else 1) + 2 * len(vs.real_servers)
