"""Plain values of the data plane: virtual servers, real servers, tables.

Named as the kernel names them (IPVS ``ip_vs_service`` / ``ip_vs_dest``):
a :class:`VirtualServer` is one VIP:port:protocol with a scheduler, flags,
persistence and an ordered tuple of :class:`RealServer`. Two attributes exist
only to be read back from a kernel and compared: a real server's ``forward``
(svcproxy always programs NAT, ``masq``) and a virtual server's ``other``
(settings svcproxy never makes); desired tables keep their defaults, so a
kernel object holding anything else differs and a full sync repairs it. A table maps
:class:`VSKey` -> :class:`VirtualServer`. The agent builds the desired
table from ProxyVirtualServers; every proxier (ipvs, iptables, userspace)
takes it; :mod:`svcproxy.dataplane.diff` compares two of them. Pure: no I/O.

Real-server order matters for hash schedulers (sh, dh, mh): they choose
the same backend for a client on every node only if every node's kernel
holds the same real servers in the same order. Desired tables therefore
keep real servers in ONE canonical order (:func:`canonical_order`); built
through :meth:`VirtualServer.create` they always are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from svcproxy.base import NODE_PORT_ADDRESSES, IPFamily

Protocol = Literal["TCP", "UDP", "SCTP"]
PROTOCOLS: tuple[Protocol, ...] = ("TCP", "UDP", "SCTP")

# Schedulers whose choice is a hash of the packet: backend order must be canonical.
HASH_SCHEDULERS = frozenset({"sh", "dh", "mh"})
# Every IPVS scheduler the kernel ships (modules ip_vs_<name>).
IPVS_SCHEDULERS = frozenset(
    {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf", "twos"}
)
# Scheduler flags as ipvsadm spells them (-b): sh and mh use flag-1 / flag-2.
SCHEDULER_FLAGS = frozenset({"sh-fallback", "sh-port", "mh-fallback", "mh-port"})
# One shared empty set: most virtual servers have no flags (10k Services: 10k empty sets).
NO_FLAGS: frozenset[str] = frozenset()
# IPVS forwarding methods, indexed by the kernel's value (IP_VS_CONN_F_MASQ = 0 ... BYPASS = 4).
Forward = Literal["masq", "local", "tunnel", "route", "bypass"]
FORWARD_METHODS: tuple[Forward, ...] = ("masq", "local", "tunnel", "route", "bypass")
# ClientIP affinity default of Kubernetes (Service.spec.sessionAffinityConfig).
DEFAULT_AFFINITY_SECONDS = 10800
# A traffic policy Local as the iptables and userspace modes serve it: "" none (every endpoint);
# "internal" (internalTrafficPolicy on a ClusterIP): only this node's endpoints;
# "external" (externalTrafficPolicy on a node port, external or LB IP): outside
# clients reach only this node's endpoints with their address kept, while the node
# itself and its Pods reach every endpoint, as through kube-proxy.
LocalPolicy = Literal["", "internal", "external"]
# Source ranges of a load-balancer IP (kube-proxy's firewall): None, no filter; else new
# connections only from these networks (of the address's family; () none at all) and
# from the node itself.
SourceRanges = tuple[str, ...] | None


def normalize_address(address: str) -> str:
    """The one spelling of an IP address (IPv6 compressed, IPv4 dotted)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError as err:
        raise ValueError(f"{address!r} is not an IP address: give an IPv4 or IPv6 address") from err


def normalize_network(text: str, family: IPFamily | None = None) -> str:
    """The one spelling of a network (its network address, IPv6 compressed); ValueError
    when it is not a CIDR, or not of ``family``."""
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise ValueError(f"{text!r} is not a CIDR: give e.g. 203.0.113.0/24 or 2001:db8::/32") from err
    if family is not None and net.version != family.value:
        raise ValueError(f"source range {text} is not IPv{family.value} like the address it filters")
    return str(net)


def address_sort_key(address: str) -> tuple[int, bytes]:
    ip = ipaddress.ip_address(address)
    return (ip.version, ip.packed)


class VSKey(NamedTuple):
    """What the kernel keys a virtual server by."""

    protocol: Protocol
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol}/{IPFamily.bracketed(self.address)}:{self.port}"


@dataclass(frozen=True, slots=True)  # slots: ~100k of these at 10k Services
class RealServer:
    """One backend of a virtual server; weight 0 = draining (no new connections).

    ``forward``: the IPVS forwarding method. svcproxy programs every real server with
    NAT (``masq``), the only method that works for a Service proxy (the backend answers
    the node, which undoes the translation); other values come from reading back a
    kernel where someone changed it (``ipvsadm -e ... -g``), and differ from the desired
    real server, so the next full sync edits it back. ``local``: the endpoint runs on
    this node (set only under a traffic policy Local, see :data:`LocalPolicy`).
    ``cluster_drain``: under a traffic policy Local, a local serving-terminating endpoint
    that takes the node's local-scope traffic (no local endpoint is ready) while the
    cluster scope, which has ready endpoints elsewhere, sends it none (kube-proxy's rule:
    :func:`svcproxy.api.program.usable_endpoints`).
    """

    address: str
    port: int
    weight: int = 1
    forward: Forward = "masq"
    local: bool = False
    cluster_drain: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", normalize_address(self.address))
        if not 0 < self.port < 65536:
            raise ValueError(f"real server port {self.port} is out of range 1-65535")
        if self.weight < 0:
            raise ValueError(f"real server weight {self.weight} is negative: use 0 to drain")
        if self.forward not in FORWARD_METHODS:
            raise ValueError(
                f"forwarding method {self.forward!r} is not one of {', '.join(FORWARD_METHODS)}"
            )

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)

    @property
    def draining(self) -> bool:
        return self.weight == 0


def real_server_sort_key(real: RealServer) -> tuple[int, bytes, int]:
    version, packed = address_sort_key(real.address)
    return (version, packed, real.port)


def canonical_order(reals: Iterable[RealServer]) -> tuple[RealServer, ...]:
    """Real servers sorted by (address, port): the order every node uses."""
    return tuple(sorted(reals, key=real_server_sort_key))


@dataclass(frozen=True, slots=True)
class VirtualServer:
    """One virtual server (VIP:port/protocol) and its real servers.

    ``persistence`` is the IPVS persistence timeout in seconds (0 = none);
    ClientIP session affinity maps to it. ``owner`` is "namespace/name" of
    the ProxyVirtualServer it came from; the kernel does not store it, so
    tables read back from a kernel carry ``owner=""``. ``other``: settings a
    kernel holds that svcproxy never makes, as a reader spells them (e.g.
    ``ops``, ``netmask 255.255.255.0``, ``pe sip``); empty in desired tables,
    so a virtual server read back with any differs (:meth:`same_service`) and
    is updated, which sends every setting and so clears them. ``local_policy``: see
    :data:`LocalPolicy` (iptables and userspace modes). ``source_ranges``: see :data:`SourceRanges`
    (iptables and userspace modes; never on a node port).
    """

    protocol: Protocol
    address: str
    port: int
    scheduler: str = "rr"
    flags: frozenset[str] = NO_FLAGS
    persistence: int = 0
    owner: str = ""
    real_servers: tuple[RealServer, ...] = ()
    other: frozenset[str] = NO_FLAGS
    local_policy: LocalPolicy = ""
    source_ranges: SourceRanges = None

    @property
    def is_node_port(self) -> bool:
        """Served on every local address of the node (0.0.0.0 or ::, normalised)."""
        return self.address in NODE_PORT_ADDRESSES

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        object.__setattr__(self, "address", normalize_address(self.address))
        object.__setattr__(self, "flags", frozenset(self.flags) if self.flags else NO_FLAGS)
        object.__setattr__(self, "other", frozenset(self.other) if self.other else NO_FLAGS)
        if not 0 < self.port < 65536:
            raise ValueError(f"virtual server port {self.port} is out of range 1-65535")
        if self.persistence < 0:
            raise ValueError(f"persistence {self.persistence} is negative: use 0 for none")
        unknown = self.flags - SCHEDULER_FLAGS
        if unknown:
            raise ValueError(
                f"unknown scheduler flags {sorted(unknown)}: use {sorted(SCHEDULER_FLAGS)}"
            )
        if self.local_policy not in ("", "internal", "external"):
            raise ValueError(f"local policy {self.local_policy!r} is not '', 'internal' or 'external'")
        keys = [r.key for r in self.real_servers]
        if len(keys) != len(set(keys)):
            raise ValueError(f"{self.key}: the same real server is listed twice")
        if self.source_ranges is not None:
            if self.is_node_port:
                raise ValueError(f"{self.key}: source ranges filter load-balancer IPs, never node ports")
            family = IPFamily.of(self.address)
            nets = tuple(dict.fromkeys(normalize_network(n, family) for n in self.source_ranges))
            object.__setattr__(self, "source_ranges", nets)

    @classmethod
    def create(
        cls,
        protocol: Protocol,
        address: str,
        port: int,
        real_servers: Iterable[RealServer] = (),
        *,
        scheduler: str = "rr",
        flags: Iterable[str] = (),
        persistence: int = 0,
        owner: str = "",
        local_policy: LocalPolicy = "",
        source_ranges: SourceRanges = None,
    ) -> VirtualServer:
        """A virtual server with its real servers in canonical order (for desired tables)."""
        return cls(
            local_policy=local_policy,
            source_ranges=source_ranges,
            protocol=protocol,
            address=address,
            port=port,
            scheduler=scheduler,
            flags=frozenset(flags) or NO_FLAGS,
            persistence=persistence,
            owner=owner,
            real_servers=canonical_order(real_servers),
        )

    @property
    def key(self) -> VSKey:
        return VSKey(self.protocol, self.address, self.port)

    @property
    def hashed(self) -> bool:
        """True when the scheduler hashes, so real-server order must be canonical."""
        return self.scheduler in HASH_SCHEDULERS

    def same_service(self, other: VirtualServer) -> bool:
        """Same kernel attributes of the virtual server itself (reals and owner aside)."""
        return (
            self.scheduler == other.scheduler
            and self.flags == other.flags
            and self.persistence == other.persistence
            and self.other == other.other
        )

    def without_reals(self) -> VirtualServer:
        return replace(self, real_servers=())

    def with_reals(self, reals: Iterable[RealServer]) -> VirtualServer:
        return replace(self, real_servers=tuple(reals))

    def canonical(self) -> VirtualServer:
        return replace(self, real_servers=canonical_order(self.real_servers))


Table = Mapping[VSKey, VirtualServer]


def make_table(servers: Iterable[VirtualServer]) -> dict[VSKey, VirtualServer]:
    """A table from virtual servers; refuses two servers with one key."""
    table: dict[VSKey, VirtualServer] = {}
    for vs in servers:
        if vs.key in table:
            raise ValueError(
                f"{vs.key} is programmed by both {table[vs.key].owner!r} and {vs.owner!r}:"
                " one VIP:port/protocol can belong to one ProxyVirtualServer only"
            )
        table[vs.key] = vs
    return table


def owned_by(table: Table, owners: Iterable[str]) -> dict[VSKey, VirtualServer]:
    """The part of ``table`` that belongs to ``owners`` (for partial syncs)."""
    wanted = set(owners)
    return {k: v for k, v in table.items() if v.owner in wanted}
