"""Which programs the agent trusts: VIPs of the Service, real servers in the Pod/node space; pure.

Defense in depth behind the chart's admission policy (only the operator writes
ProxyVirtualServers): a program whose virtual IPs are not its Service's addresses
(``spec.clusterIPs``, ``spec.externalIPs``, ``status.loadBalancer.ingress[].ip``), or
whose real servers are outside every Node's ``spec.podCIDRs``, every Node address
(``status.addresses``: a hostNetwork Pod uses its node's) and the agent's
``--extra-pod-cidr``\\ s, is refused whole. :class:`AddressBook` keeps what the checks
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

FOREIGN_VIP = "ForeignVIP"
FOREIGN_REAL_SERVER = "ForeignRealServer"
UNKNOWN_SERVICE = "UnknownService"
REFUSAL_REASONS = (FOREIGN_VIP, FOREIGN_REAL_SERVER, UNKNOWN_SERVICE)

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


def service_addresses(obj: Mapping[str, Any]) -> frozenset[str]:
    """A Service's addresses that a program may use as virtual IPs."""
    spec = obj.get("spec") or {}
    raw: list[Any] = list(spec.get("clusterIPs") or [spec.get("clusterIP")])
    raw += spec.get("externalIPs") or []
    for ingress in ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if isinstance(ingress, Mapping):
            raw.append(ingress.get("ip"))
    found = (normalised(a) for a in raw if isinstance(a, str) and a and a != "None")
    return frozenset(a for a in found if a is not None)


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
        refusal = refusal_of(program, addresses, self.space())
        self._verdicts[program.owner] = _Verdict(program, addresses, self.nodes_version, refusal)
        return refusal

    def forget(self, owner: str) -> None:
        """The owner's program is gone: drop its remembered verdict."""
        self._verdicts.pop(owner, None)


def refusal_of(
    program: DesiredProgram, addresses: frozenset[str] | None, space: NetworkSet
) -> Refusal | None:
    """The check itself: every virtual IP one of ``addresses`` (None: the Service is
    unknown), every real server in ``space``."""
    owner = program.owner
    if addresses is None:
        return Refusal(
            UNKNOWN_SERVICE,
            f"the Service {owner} is not known to this agent: a ProxyVirtualServer is programmed"
            " only for an existing Service with the same name and namespace (it is, as soon as the"
            " Service shows up)",
        )
    for servers in program.by_mode.values():
        for vs in servers:
            if normalised(vs.address) not in addresses:
                have = ", ".join(sorted(addresses)) or "none"
                return Refusal(
                    FOREIGN_VIP,
                    f"virtual IP {vs.address} is not an address of the Service {owner} (it has:"
                    f" {have}); a program may only use its Service's clusterIPs, externalIPs and"
                    " load-balancer IPs: check who wrote this ProxyVirtualServer",
                )
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
