"""Which programs the agent trusts: VIPs of the Service, real servers in the Pod/node space; pure.

Defense in depth behind the chart's admission policy (only the operator writes
ProxyVirtualServers): a program whose virtual IPs are not its Service's addresses
(``spec.clusterIPs``, ``spec.externalIPs``, ``status.loadBalancer.ingress[].ip``), or
whose node-port virtual servers (address 0.0.0.0 or ::) are not its Service's
``spec.ports[].nodePort``, lie outside the cluster's node-port range or ask for a mode
that serves no node ports (ipvs; see ``svcproxy.base.EXTERNAL_MODES``), whose
health-check port is not the Service's ``spec.healthCheckNodePort`` (in that range), or
whose real servers are outside every Node's ``spec.podCIDRs``, every Node address
(``status.addresses``: a hostNetwork Pod uses its node's) and the agent's
``--extra-pod-cidr``\\ s, is refused whole. A load-balancer IP's source ranges are
data, not addresses: they never make a virtual IP or a real server trusted (a VIP inside
one is still foreign) and need not lie in any space; they only narrow who reaches a VIP
that is already its Service's. :class:`AddressBook` keeps what the checks
need and nothing more (Service owner -> frozenset of addresses, Node name -> its
networks; never whole objects: the agent's memory budget is per node) and
:meth:`AddressBook.check` says why a program is refused, or None. A Node that leaves
keeps its networks for ``departed_grace`` seconds, so its Pods' endpoints (still
listed until the operator writes the programs again) do not get whole Services
refused meanwhile. The watches in :mod:`svcproxy.agent.watch` fill the book through
:class:`svcproxy.agent.agent.Agent`; no I/O and no clock here (callers pass ``now``).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from svcproxy.agent.convert import DesiredProgram
from svcproxy.base import EXTERNAL_MODES, NODE_PORT_ADDRESSES, unusable_as_vip
from svcproxy.dataplane.table import VirtualServer

FOREIGN_VIP = "ForeignVIP"
FOREIGN_NODE_PORT = "ForeignNodePort"
FOREIGN_REAL_SERVER = "ForeignRealServer"
UNKNOWN_SERVICE = "UnknownService"
REFUSAL_REASONS = (FOREIGN_VIP, FOREIGN_NODE_PORT, FOREIGN_REAL_SERVER, UNKNOWN_SERVICE)
# kube-apiserver's default --service-node-port-range.
DEFAULT_NODE_PORTS = range(30000, 32768)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Refusal:
    """Why a program is not programmed: ``reason`` (one of :data:`REFUSAL_REASONS`) and
    a message naming the offending address and what to do."""

    reason: str
    message: str


def normalised(address: str) -> str | None:
    """One spelling per address (IPv6 compressed), None when it is not an IP address."""
    try:
        return ipaddress.ip_address(address.strip()).compressed
    except ValueError:
        return None


def network(text: str) -> Network:
    """A CIDR (host bits allowed: a Node's podCIDR is always a network, a flag may not be);
    ValueError saying what is wrong."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError as err:
        raise ValueError(f"{text!r} is not a CIDR (e.g. 10.244.0.0/16 or fd00:10:244::/56): {err}") from err


def port_range(text: str) -> range:
    """"FIRST-LAST" (as kube-apiserver's --service-node-port-range) as a range; ValueError
    saying what is wrong."""
    first, sep, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last)
    except ValueError:
        low, high = 0, -1
    if not sep or not 1 <= low <= high <= 65535:
        raise ValueError(f"--node-port-range {text!r} is not FIRST-LAST within 1-65535 (e.g. 30000-32767)")
    return range(low, high + 1)


def node_port_key(protocol: str, port: int) -> str:
    """How a node port sits among a Service's addresses (never an IP address's spelling)."""
    return f"nodePort {protocol}/{port}"


def health_check_key(port: int) -> str:
    """How a Service's healthCheckNodePort sits among its addresses."""
    return f"healthCheckNodePort {port}"


def service_addresses(obj: Mapping[str, Any]) -> frozenset[str]:
    """A Service's addresses that a program may use as virtual IPs, its node ports (as
    :func:`node_port_key`) and its health-check port (:func:`health_check_key`): one set,
    so the watches keep one value per Service."""
    spec = obj.get("spec") or {}
    raw: list[Any] = list(spec.get("clusterIPs") or [spec.get("clusterIP")])
    raw += spec.get("externalIPs") or []
    for ingress in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if isinstance(ingress, Mapping):
            raw.append(ingress.get("ip"))
    found = (normalised(a) for a in raw if isinstance(a, str) and a and a != "None")
    out = {a for a in found if a is not None and not unusable_as_vip(a)}
    for port in spec.get("ports") or []:
        number = port.get("nodePort") if isinstance(port, Mapping) else None
        if isinstance(number, int) and not isinstance(number, bool):
            out.add(node_port_key(str(port.get("protocol") or "TCP"), number))
    health = spec.get("healthCheckNodePort")
    if isinstance(health, int) and not isinstance(health, bool):
        out.add(health_check_key(health))
    return frozenset(out)


def node_networks(obj: Mapping[str, Any]) -> tuple[Network, ...]:
    """A Node's Pod CIDRs and its addresses (as single-host networks)."""
    spec = obj.get("spec") or {}
    nets: list[Network] = []
    for cidr in spec.get("podCIDRs") or [spec.get("podCIDR")]:
        if isinstance(cidr, str) and cidr:
            try:
                nets.append(network(cidr))
            except ValueError:
                continue  # the API server validates podCIDRs; nothing else to trust
    for entry in (obj.get("status") or {}).get("addresses") or []:
        address = normalised(str(entry.get("address", ""))) if isinstance(entry, Mapping) else None
        if address is not None:  # Hostname and DNS entries are not addresses
            nets.append(ipaddress.ip_network(address))
    return tuple(nets)


class NetworkSet:
    """A union of networks, asked whether it holds an address in O(log n): per family, the
    merged [first, last] integer ranges, sorted."""

    def __init__(self, nets: Iterable[Network]) -> None:
        spans: dict[int, list[tuple[int, int]]] = {}
        for net in nets:
            spans.setdefault(net.version, []).append((int(net.network_address), int(net.broadcast_address)))
        self._starts: dict[int, list[int]] = {}
        self._ends: dict[int, list[int]] = {}
        for version, ranges in spans.items():
            merged: list[list[int]] = []
            for first, last in sorted(ranges):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            self._starts[version] = [m[0] for m in merged]
            self._ends[version] = [m[1] for m in merged]

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        starts = self._starts.get(ip.version, [])
        i = bisect.bisect_right(starts, int(ip)) - 1
        return i >= 0 and int(ip) <= self._ends[ip.version][i]


@dataclass
class _Verdict:
    program: DesiredProgram
    addresses: frozenset[str] | None
    nodes_version: int
    refusal: Refusal | None


@dataclass
class AddressBook:
    """Service addresses and the Pod/node address space, as the watches last saw them."""

    extra: tuple[Network, ...] = ()
    departed_grace: float = 300.0
    node_ports: range = DEFAULT_NODE_PORTS
    services: dict[str, frozenset[str]] = field(default_factory=dict)
    nodes: dict[str, tuple[Network, ...]] = field(default_factory=dict)
    departed: dict[str, tuple[tuple[Network, ...], float]] = field(default_factory=dict)
    nodes_version: int = 0
    _space: NetworkSet | None = None
    _verdicts: dict[str, _Verdict] = field(default_factory=dict)
    _narrowed: bool = False

    # ---- Services ----------------------------------------------------------------------
    def set_service(self, owner: str, addresses: frozenset[str]) -> bool:
        """True when the owner's addresses changed."""
        if self.services.get(owner) == addresses:
            return False
        self.services[owner] = addresses
        return True

    def drop_service(self, owner: str) -> bool:
        return self.services.pop(owner, None) is not None

    def replace_services(self, services: Mapping[str, frozenset[str]]) -> set[str]:
        """After a (re-)list: the complete set; returns the owners whose addresses changed."""
        changed = {o for o in self.services if o not in services}
        changed |= {o for o, a in services.items() if self.services.get(o) != a}
        self.services = dict(services)
        return changed

    # ---- Nodes -------------------------------------------------------------------------
    def set_node(self, name: str, nets: tuple[Network, ...]) -> bool:
        """True when the address space changed; :meth:`take_narrowed` says whether it lost any."""
        departed = self.departed.pop(name, None)
        current = self.nodes.get(name)
        if current == nets:
            return False
        # A Node back from departure is compared with the networks it left with.
        before = current if current is not None else departed[0] if departed is not None else None
        if before is not None and not set(before) <= set(nets):
            self._narrowed = True  # programs accepted before may reach outside the space now
        self.nodes[name] = nets
        self._moved()
        return True

    def take_narrowed(self) -> bool:
        """True once after a Node's networks lost a range (the caller re-checks every program)."""
        narrowed, self._narrowed = self._narrowed, False
        return narrowed

    def drop_node(self, name: str, now: float) -> None:
        """The Node left: its networks stay in the space until the grace ends."""
        nets = self.nodes.pop(name, None)
        if nets is not None:
            self.departed[name] = (nets, now + self.departed_grace)

    def replace_nodes(self, nodes: Mapping[str, tuple[Network, ...]], now: float) -> bool:
        """After a (re-)list; True when the address space changed."""
        for name in [n for n in self.nodes if n not in nodes]:
            self.drop_node(name, now)
        changed = False
        for name, nets in nodes.items():
            changed |= self.set_node(name, nets)
        return changed

    def expire(self, now: float) -> bool:
        """Forget Nodes that left more than ``departed_grace`` ago; True when any did."""
        gone = [n for n, (_, until) in self.departed.items() if until <= now]
        for name in gone:
            del self.departed[name]
        if gone:
            self._moved()
        return bool(gone)

    def _moved(self) -> None:
        self.nodes_version += 1
        self._space = None

    def space(self) -> NetworkSet:
        """Every address a real server may have."""
        if self._space is None:
            nets = [n for ns in self.nodes.values() for n in ns]
            nets += [n for ns, _ in self.departed.values() for n in ns]
            self._space = NetworkSet([*nets, *self.extra])
        return self._space

    # ---- the check ---------------------------------------------------------------------
    def check(self, program: DesiredProgram) -> Refusal | None:
        """Why ``program`` is refused, or None; remembered per owner until the program, its
        Service's addresses or the address space change (full syncs re-check every owner)."""
        addresses = self.services.get(program.owner)
        seen = self._verdicts.get(program.owner)
        if (seen is not None and seen.program is program and seen.addresses is addresses
                and seen.nodes_version == self.nodes_version):
            return seen.refusal
        refusal = refusal_of(program, addresses, self.space(), self.node_ports)
        self._verdicts[program.owner] = _Verdict(program, addresses, self.nodes_version, refusal)
        return refusal

    def forget(self, owner: str) -> None:
        """The owner's program is gone: drop its remembered verdict."""
        self._verdicts.pop(owner, None)


def refusal_of(
    program: DesiredProgram,
    addresses: frozenset[str] | None,
    space: NetworkSet,
    node_ports: range = DEFAULT_NODE_PORTS,
) -> Refusal | None:
    """The check itself: every virtual IP one of ``addresses`` (None: the Service is
    unknown), every node port (address 0.0.0.0 or ::) and the health-check port the
    Service's and in ``node_ports``, every real server in ``space``."""
    owner = program.owner
    if addresses is None:
        return Refusal(
            UNKNOWN_SERVICE,
            f"the Service {owner} is not known to this agent: a ProxyVirtualServer is programmed"
            " only for an existing Service with the same name and namespace (it is, as soon as the"
            " Service shows up)",
        )
    health = program.health_check_port
    if health is not None and (health not in node_ports or health_check_key(health) not in addresses):
        return Refusal(
            FOREIGN_NODE_PORT,
            f"health-check port {health} of {owner} is not the Service's healthCheckNodePort in"
            f" this agent's node-port range {node_ports.start}-{node_ports.stop - 1}: check who"
            " wrote this ProxyVirtualServer",
        )
    for mode, servers in program.by_mode.items():
        for vs in servers:
            refusal = _virtual_ip_refusal(vs, owner, addresses, node_ports, mode)
            if refusal is not None:
                return refusal
            for rs in vs.real_servers:
                if rs.address not in space:
                    return Refusal(
                        FOREIGN_REAL_SERVER,
                        f"real server {rs.address} of {vs.address}:{vs.port} is not in any Node's"
                        " Pod CIDR, nor a Node address, nor an --extra-pod-cidr of this agent: check"
                        " who wrote this ProxyVirtualServer, or add the CNI's Pod range with"
                        " --extra-pod-cidr (chart value agent.extraPodCIDRs)",
                    )
    return None


def _virtual_ip_refusal(
    vs: VirtualServer, owner: str, addresses: frozenset[str], node_ports: range, mode: str
) -> Refusal | None:
    """Why one virtual server's address (or node port) is not its Service's, or None."""
    address = normalised(vs.address)
    if address in NODE_PORT_ADDRESSES:
        if mode not in EXTERNAL_MODES:  # the operator never compiles one: it would be misread
            return Refusal(
                FOREIGN_NODE_PORT,
                f"node port {vs.port}/{vs.protocol} of {owner} asks for mode {mode}: node ports"
                f" are served in {' and '.join(EXTERNAL_MODES)} modes only: check who wrote this"
                " ProxyVirtualServer",
            )
        if vs.port not in node_ports:
            return Refusal(
                FOREIGN_NODE_PORT,
                f"node port {vs.port}/{vs.protocol} of {owner} is outside this agent's node-port"
                f" range {node_ports.start}-{node_ports.stop - 1} (--node-port-range): check who"
                " wrote this ProxyVirtualServer, or give the agent the cluster's"
                " --service-node-port-range",
            )
        if node_port_key(vs.protocol, vs.port) not in addresses:
            return Refusal(
                FOREIGN_NODE_PORT,
                f"node port {vs.port}/{vs.protocol} is not a nodePort of the Service {owner}: check"
                " who wrote this ProxyVirtualServer",
            )
        return None
    if address is None or address not in addresses:
        have = ", ".join(sorted(a for a in addresses if not a.startswith("nodePort "))) or "none"
        special = address is not None and unusable_as_vip(address)
        why = " (loopback, link-local and multicast never are)" if special else ""
        return Refusal(
            FOREIGN_VIP,
            f"virtual IP {vs.address} is not an address of the Service {owner} (it has:"
            f" {have}){why}; a program may only use its Service's clusterIPs, externalIPs and"
            " load-balancer IPs: check who wrote this ProxyVirtualServer",
        )
    return None
