"""Compile one Service into its ProxyVirtualServer program (pure).

``compile_program(policy, service, slices, pod_labels)`` turns a parsed
ServiceProxyPolicy, the Service object and its EndpointSlices (plain dicts as
the API server returns them) into a :class:`ProxyVirtualServerSpec`, or a
:class:`NotProxied` saying why the Service cannot be proxied (ExternalName,
headless, no ClusterIP yet, no ports, or what svcproxy does not serve yet). Each
Service port is served on its ClusterIPs, its externalIPs and (type LoadBalancer)
its VIP-mode ingress IPs, and its nodePort on 0.0.0.0 / :: (address type
NodePort: the node's own addresses); the last three only in the modes of
:data:`~svcproxy.base.EXTERNAL_MODES` (iptables, userspace; ipvs leaves such
Services to kube-proxy). spec.loadBalancerSourceRanges travel on the load-balancer
IPs' virtual servers (normalised, every family: each agent keeps those of the
address's family), only in the modes of :data:`~svcproxy.base.SOURCE_RANGE_MODES`.
The traffic policies Local only in iptables and userspace modes
(:data:`~svcproxy.base.LOCAL_POLICY_MODES`): each virtual server then says
``trafficPolicy: Local`` and every agent keeps only its own node's endpoints (real
servers carry ``nodeName``). ``pod_labels`` maps Pod name -> labels
in the Service's namespace so the policy's ``weights`` can match Pods without
this module doing I/O. Called by the operator's reconciler and by
``svcproxy plan``; the output is identical for any order of the slices and of
their endpoints, which is what makes the content hash meaningful.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from svcproxy.api.policy import Scheduler, SchedulerFlag, ServiceProxyPolicy
from svcproxy.api.program import (
    AddressType,
    ObjectRef,
    ProgramSummary,
    Protocol,
    ProxyVirtualServerSpec,
    RealServerSpec,
    VirtualServerSpec,
)
from svcproxy.base import (
    EXTERNAL_MODES,
    LOCAL_POLICY_MODES,
    NODE_PORT_ADDRESSES,
    SOURCE_RANGE_MODES,
    IPFamily,
    unusable_as_vip,
)

JSON = dict[str, Any]
PROTOCOLS = ("TCP", "UDP", "SCTP")
DEFAULT_SERVICE_AFFINITY_TIMEOUT = 10800
# The fields every model_construct below sets, one set shared by all the objects it builds:
# pydantic otherwise keeps a set of field names per object, the largest part of a
# compiled program (benchmarks/README.md, operator memory, has the figures).
# pydantic copies the set before it changes one (model_copy), so sharing it is safe.
_REAL_SERVER_FIELDS = {
    "address",
    "port",
    "weight",
    "node_name",
    "pod_name",
    "ready",
    "serving",
    "terminating",
}
_VIRTUAL_SERVER_FIELDS = {
    "port_name",
    "protocol",
    "address",
    "address_type",
    "port",
    "mode",
    "scheduler",
    "scheduler_flags",
    "persistence_timeout_seconds",
    "real_servers",
    "traffic_policy",
    "load_balancer_source_ranges",
}


@dataclass(frozen=True)
class NotProxied:
    """A Service svcproxy never programs, and why (shown in the policy status)."""

    reason: str
    message: str


def _ipv4_packed(address: str) -> bytes | None:
    """The 4 bytes of a dotted-quad IPv4 address, by the rules of ``ipaddress`` (no
    leading zeros, 0..255), or None. Splitting is cheaper than ``ip_address``,
    and compile looks at every endpoint of every Service it compiles."""
    parts = address.split(".")
    if len(parts) != 4:
        return None
    out = []
    for part in parts:
        if not (part.isascii() and part.isdigit()) or len(part) > 3 or (len(part) > 1 and part[0] == "0"):
            return None
        value = int(part)
        if value > 255:
            return None
        out.append(value)
    return bytes(out)


def address_key(address: str) -> tuple[int, bytes, str]:
    """Numeric order of IP addresses (IPv4 before IPv6), the agents' canonical order."""
    if IPFamily.of(address) is IPFamily.V4:
        packed = _ipv4_packed(address)
        return (4, packed, "") if packed is not None else (9, b"", address)
    try:
        return (6, ipaddress.IPv6Address(address).packed, "")
    except ValueError:
        return (9, b"", address)


def _family(address: str) -> int:
    """4 or 6; 0 for anything else (an FQDN endpoint, a malformed address)."""
    version = address_key(address)[0]
    return version if version in (4, 6) else 0


def not_proxied(service: JSON) -> NotProxied | None:
    """Why ``service`` is never proxied, or None when it can be."""
    spec = service.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return NotProxied("ExternalName", "ExternalName Services are resolved by DNS only; nothing to proxy")
    cluster_ip = spec.get("clusterIP")
    if cluster_ip == "None":
        return NotProxied("Headless", "headless Service (clusterIP: None): clients reach Pods directly")
    if not cluster_ip:
        return NotProxied("NoClusterIP", "the Service has no ClusterIP yet")
    if not isinstance(spec.get("ports"), list) or not spec["ports"]:
        return NotProxied("NoPorts", "the Service has no ports: add spec.ports to proxy it")
    try:
        source_ranges(service)
    except ValueError as err:
        # Served unfiltered it would be open to every client: kube-proxy keeps it.
        return NotProxied("Unsupported", f"{err}; kube-proxy keeps this Service")
    return None


def source_ranges(service: JSON) -> list[str]:
    """spec.loadBalancerSourceRanges of a type LoadBalancer Service, normalised (the
    network address, IPv6 compressed; no repeats; spaces trimmed, which the API server
    lets through), in the Service's order; [] when it sets none or is of another type
    (only load-balancer IPs are filtered). ValueError naming an entry that is no CIDR."""
    spec = service.get("spec") or {}
    raw = spec.get("loadBalancerSourceRanges") or []
    if spec.get("type") != "LoadBalancer" or not isinstance(raw, list):
        return []
    out: dict[str, None] = {}
    for i, text in enumerate(raw):
        try:
            out[str(ipaddress.ip_network(str(text).strip(), strict=False))] = None
        except ValueError as err:
            raise ValueError(
                f"spec.loadBalancerSourceRanges[{i}] {text!r} is not a CIDR svcproxy reads"
                f" (e.g. 203.0.113.0/24 or 2001:db8::/32): {err}"
            ) from err
    return list(out)


def external_surface(service: JSON) -> str:
    """What the Service offers beyond its ClusterIPs ("" when nothing): node ports,
    external IPs, load-balancer IPs, in words for a status message."""
    spec = service.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    parts = [f"type {kind}"] if kind in ("NodePort", "LoadBalancer") else []
    if spec.get("externalIPs"):
        parts.append("spec.externalIPs")
    return " and ".join(parts)


def local_policies(service: JSON) -> str:
    """The traffic policies Local the Service sets ("" when none), in words."""
    parts = ["externalTrafficPolicy: Local"] if external_policy_local(service) else []
    if internal_policy_local(service):
        parts.append("internalTrafficPolicy: Local")
    return " and ".join(parts)


def external_policy_local(service: JSON) -> bool:
    """externalTrafficPolicy Local, which (as for kube-proxy) counts only for types
    NodePort and LoadBalancer: their node ports, external and load-balancer IPs then
    reach only the node's own endpoints."""
    spec = service.get("spec") or {}
    return spec.get("type") in ("NodePort", "LoadBalancer") and spec.get("externalTrafficPolicy") == "Local"


def internal_policy_local(service: JSON) -> bool:
    """internalTrafficPolicy Local: the ClusterIPs reach only the node's own endpoints."""
    return (service.get("spec") or {}).get("internalTrafficPolicy") == "Local"


def health_check_node_port(service: JSON) -> int | None:
    """spec.healthCheckNodePort when externalTrafficPolicy is Local (the API server
    allocates one for type LoadBalancer), else None."""
    port = (service.get("spec") or {}).get("healthCheckNodePort")
    if not external_policy_local(service) or isinstance(port, bool) or not isinstance(port, int):
        return None
    return port if 1 <= port <= 65535 else None


def mode_refusal(policy: ServiceProxyPolicy, service: JSON) -> NotProxied | None:
    """Node ports, external and load-balancer IPs are served in the modes of
    :data:`EXTERNAL_MODES`, source ranges in :data:`SOURCE_RANGE_MODES`, the traffic
    policies Local in :data:`LOCAL_POLICY_MODES`: in another mode the Service stays with
    kube-proxy rather than lose them. The message names everything the policy's mode lacks."""
    mode = policy.spec.mode
    ranges = "spec.loadBalancerSourceRanges" if source_ranges(service) else ""
    lacking = [
        f"{what} (served in {' and '.join(modes)} {'modes' if len(modes) > 1 else 'mode'} only)"
        for what, modes in ((external_surface(service), EXTERNAL_MODES),
                            (ranges, SOURCE_RANGE_MODES),
                            (local_policies(service), LOCAL_POLICY_MODES))
        if what and mode not in modes
    ]
    if not lacking:
        return None
    return NotProxied(
        "Unsupported",
        f"{' and '.join(lacking)}, and the policy's mode is {mode}; kube-proxy keeps this Service",
    )


def external_ips(service: JSON) -> list[tuple[str, AddressType]]:
    """spec.externalIPs, then for type LoadBalancer the VIP-mode ingress IPs (ipMode
    Proxy entries are reached through the load balancer, not at that IP: skipped, as
    kube-proxy does), each with its address type; normalised, without repeats."""
    spec = service.get("spec") or {}
    raw: list[tuple[Any, AddressType]] = [(ip, "ExternalIP") for ip in spec.get("externalIPs") or []]
    if spec.get("type") == "LoadBalancer":
        ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        raw += [
            (entry.get("ip"), "LoadBalancerIP")
            for entry in ingress
            if isinstance(entry, dict) and entry.get("ipMode") != "Proxy"
        ]
    out: dict[str, AddressType] = {}
    for ip, kind in raw:
        if isinstance(ip, str) and not unusable_as_vip(ip):
            out.setdefault(ipaddress.ip_address(ip).compressed, kind)
    return list(out.items())


def node_port_addresses(service: JSON) -> list[str]:
    """0.0.0.0 and/or :: for the Service's ipFamilies (else its ClusterIPs' families)
    when it is of type NodePort or LoadBalancer; else none."""
    spec = service.get("spec") or {}
    if spec.get("type") not in ("NodePort", "LoadBalancer"):
        return []
    families = [f for f in spec.get("ipFamilies") or [] if f in ("IPv4", "IPv6")]
    if not families:
        families = ["IPv6" if _family(ip) == 6 else "IPv4" for ip in virtual_ips(service)]
    return [NODE_PORT_ADDRESSES[f == "IPv6"] for f in dict.fromkeys(families)]


def virtual_ips(service: JSON) -> list[str]:
    """The Service's ClusterIPs (dual-stack aware)."""
    spec = service.get("spec") or {}
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    return [ip for ip in ips if isinstance(ip, str) and ip and ip != "None"]


def persistence_timeout(policy: ServiceProxyPolicy, service: JSON) -> int:
    """ClientIP affinity timeout: the policy's, else the Service's own; 0 means none."""
    affinity = policy.spec.session_affinity
    if affinity is not None:
        return affinity.timeout_seconds if affinity.type == "ClientIP" else 0
    spec = service.get("spec") or {}
    if spec.get("sessionAffinity") != "ClientIP":
        return 0
    config = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
    timeout = config.get("timeoutSeconds", DEFAULT_SERVICE_AFFINITY_TIMEOUT)
    if not isinstance(timeout, int) or not 1 <= timeout <= 86400:
        return DEFAULT_SERVICE_AFFINITY_TIMEOUT
    return timeout


def endpoint_weight(policy: ServiceProxyPolicy, labels: Mapping[str, str] | None) -> int:
    """The first matching weight entry's weight; 1 when none matches (or no labels)."""
    for entry in policy.spec.weights or []:
        if labels is not None and entry.pod_selector.matches(dict(labels)):
            return entry.weight
    return 1


def _slice_port(slice_: JSON, name: str, protocol: str) -> int | None:
    """The slice's resolved target port for the Service port called ``name``."""
    for port in slice_.get("ports") or []:
        if not isinstance(port, dict):
            continue
        if (port.get("name") or "") == name and (port.get("protocol") or "TCP") == protocol:
            value = port.get("port")
            if isinstance(value, int) and 1 <= value <= 65535:
                return value
    return None


class Endpoint(NamedTuple):
    """One EndpointSlice endpoint as compile reads it, conditions resolved by the API's
    rules (:func:`endpoint_of`). The operator's cache keeps endpoints in this form (about
    a fifth of the API's dicts); compile takes either."""

    address: str  # the first address: consumers use only that one
    ready: bool
    serving: bool
    terminating: bool
    node: str | None
    pod: str | None  # targetRef's name when it is a Pod


def endpoint_of(ep: Any) -> Endpoint | None:
    """``ep`` (an API dict, or already an Endpoint) as an Endpoint; None when it has no address."""
    if isinstance(ep, Endpoint):
        return ep
    if not isinstance(ep, dict) or not ep.get("addresses"):
        return None
    cond = ep.get("conditions") or {}
    # API semantics: ready nil -> ready; serving nil -> same as ready; terminating nil -> false.
    ready = cond.get("ready") is not False
    serving = cond.get("serving") if isinstance(cond.get("serving"), bool) else ready
    terminating = cond.get("terminating") is True
    if terminating:
        ready = False
    ref = ep.get("targetRef") or {}
    pod = ref.get("name") if ref.get("kind") == "Pod" else None
    node = ep.get("nodeName")
    return Endpoint(
        str(ep["addresses"][0]),
        ready,
        bool(serving),
        terminating,
        node if isinstance(node, str) else None,
        pod if isinstance(pod, str) else None,
    )


def _candidates(
    policy: ServiceProxyPolicy,
    *,
    slices: Iterable[JSON],
    port_name: str,
    protocol: str,
    family: int,
    pod_labels: Mapping[str, Mapping[str, str]],
) -> list[RealServerSpec]:
    """Real servers of one Service port and address family, one per address:port."""
    best: dict[tuple[str, int], RealServerSpec] = {}
    for slice_ in slices:
        target = _slice_port(slice_, port_name, protocol)
        if target is None:
            continue
        for raw in slice_.get("endpoints") or []:
            ep = endpoint_of(raw)
            if ep is None or _family(ep.address) != family:
                continue
            if not ep.ready and not (ep.serving and ep.terminating):
                continue  # not serving: no traffic, not even draining
            # Serving-terminating endpoints keep their weight: the agent drains them while
            # the scope has a ready endpoint and uses them as ready when it has none.
            weight = endpoint_weight(policy, pod_labels.get(ep.pod) if ep.pod else None)
            # Built without validation: every value comes from API-validated objects or was
            # range-checked above (the port), and this runs once per endpoint.
            rs = RealServerSpec.model_construct(
                _REAL_SERVER_FIELDS,
                address=ep.address,
                port=target,
                weight=weight,
                node_name=ep.node,
                pod_name=ep.pod,
                ready=ep.ready,
                serving=ep.serving,
                terminating=ep.terminating,
            )
            address = ep.address
            key = (address, target)
            # The same endpoint can sit in two slices while the controller moves it:
            # keep one, chosen by content so slice order cannot change the result.
            if key not in best or _rank(rs) > _rank(best[key]):
                best[key] = rs
    return sorted(best.values(), key=lambda r: (address_key(r.address), r.port))


def _rank(rs: RealServerSpec) -> tuple[bool, bool, int, str, str]:
    return (rs.ready, rs.serving, rs.weight, rs.node_name or "", rs.pod_name or "")


def content_hash(spec: ProxyVirtualServerSpec) -> str:
    """Hash of what agents program (mode, scheduler, persistence, virtual servers)."""
    program = spec.model_dump(
        by_alias=True,
        mode="json",
        include={"mode", "scheduler", "scheduler_flags", "persistence_timeout_seconds", "virtual_servers"},
    )
    # The fields added with the traffic policies and source ranges count only when set, so
    # a program without them keeps the hash it had before they existed (no re-apply on upgrade).
    for vs in program["virtualServers"]:
        if vs.get("trafficPolicy") in (None, "Cluster"):
            vs.pop("trafficPolicy", None)
        if vs.get("loadBalancerSourceRanges") is None:
            vs.pop("loadBalancerSourceRanges", None)
    if spec.health_check_node_port is not None:
        program["healthCheckNodePort"] = spec.health_check_node_port
    text = json.dumps(program, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def summarize(virtual_servers: list[VirtualServerSpec]) -> ProgramSummary:
    """Short texts for `kubectl get pvs`: VIP:port/proto list and ready/all endpoints."""
    vips = ",".join(f"{IPFamily.bracketed(vs.address)}:{vs.port}/{vs.protocol}" for vs in virtual_servers)
    every = {rs.address for vs in virtual_servers for rs in vs.real_servers}
    ready = {rs.address for vs in virtual_servers for rs in vs.real_servers if rs.ready}
    if len(vips) > 200:
        vips = vips[:197] + "..."
    return ProgramSummary(vips=vips, endpoints=f"{len(ready)}/{len(every)}")


def _addresses(service: JSON, port: JSON, number: int) -> list[tuple[str, AddressType, int]]:
    """The (address, type, virtual port) triples one Service port is served on: every
    ClusterIP, external and load-balancer IP at ``number``, and its nodePort (if any)
    on 0.0.0.0 and/or ::."""
    out: list[tuple[str, AddressType, int]] = [(vip, "ClusterIP", number) for vip in virtual_ips(service)]
    out += [(ip, kind, number) for ip, kind in external_ips(service)]
    node_port = port.get("nodePort")
    if isinstance(node_port, int) and not isinstance(node_port, bool) and 1 <= node_port <= 65535:
        out += [(any_ip, "NodePort", node_port) for any_ip in node_port_addresses(service)]
    return out


def _virtual_servers(
    policy: ServiceProxyPolicy,
    service: JSON,
    slices: list[JSON],
    pod_labels: Mapping[str, Mapping[str, str]],
    *,
    flags: list[str],
    persistence: int,
) -> list[VirtualServerSpec]:
    """One virtual server per usable Service port x address, with its real servers."""
    spec = policy.spec
    servers: list[VirtualServerSpec] = []
    seen: set[tuple[str, int, str]] = set()
    for port in service["spec"]["ports"]:
        if not isinstance(port, dict):
            continue
        number = port.get("port")
        protocol = port.get("protocol") or "TCP"
        if not isinstance(number, int) or not 1 <= number <= 65535 or protocol not in PROTOCOLS:
            continue
        name = str(port.get("name") or "")
        reals: dict[int, list[RealServerSpec]] = {}  # per family: the same for every address
        local = {"ClusterIP": internal_policy_local(service)}
        external = external_policy_local(service)
        ranges = source_ranges(service) or None
        for address, kind, vport in _addresses(service, port, number):
            if (address, vport, protocol) in seen:
                continue  # an external IP that is also a ClusterIP, say: served once
            seen.add((address, vport, protocol))
            family = _family(address)
            if family not in reals:
                reals[family] = _candidates(
                    policy, slices=slices, port_name=name, protocol=protocol, family=family,
                    pod_labels=pod_labels,
                )
            # Built without validation (per Service port x address): port and protocol are
            # checked above, the rest comes from the validated policy and Service.
            servers.append(
                VirtualServerSpec.model_construct(
                    _VIRTUAL_SERVER_FIELDS,
                    port_name=name,
                    protocol=cast(Protocol, protocol),
                    address=address,
                    address_type=kind,
                    port=vport,
                    mode=spec.mode,
                    scheduler=cast(Scheduler | None, spec.scheduler),
                    scheduler_flags=cast(list[SchedulerFlag], flags),
                    persistence_timeout_seconds=persistence,
                    real_servers=reals[family],
                    traffic_policy="Local" if local.get(kind, external) else None,
                    load_balancer_source_ranges=ranges if kind == "LoadBalancerIP" else None,
                )
            )
    return servers


def compile_program(
    policy: ServiceProxyPolicy,
    service: JSON,
    slices: Iterable[JSON],
    pod_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> ProxyVirtualServerSpec | NotProxied:
    """The program of ``service`` under ``policy``, or why it is not proxied.

    ``slices`` are the Service's EndpointSlices (any order); ``pod_labels`` maps
    Pod names to labels for weight selection (Pods missing from it weigh 1).
    """
    why = not_proxied(service) or mode_refusal(policy, service)
    if why is not None:
        return why
    spec = policy.spec
    meta = service.get("metadata") or {}
    scheduler = spec.scheduler
    flags = list(spec.scheduler_flags) if scheduler is not None else []
    persistence = persistence_timeout(policy, service)
    servers = _virtual_servers(policy, service, list(slices), pod_labels if pod_labels is not None else {},
                               flags=flags, persistence=persistence)
    if not servers:
        return NotProxied("NoPorts", "the Service has no usable ports (port 1..65535, TCP/UDP/SCTP)")
    servers.sort(key=lambda vs: (address_key(vs.address), vs.port, vs.protocol))
    program = ProxyVirtualServerSpec(
        service=ObjectRef(name=str(meta.get("name", "")), uid=meta.get("uid")),
        policy=ObjectRef(
            name=policy.metadata.name, uid=policy.metadata.uid, generation=policy.metadata.generation
        ),
        mode=spec.mode,
        scheduler=scheduler,
        scheduler_flags=flags,
        persistence_timeout_seconds=persistence,
        virtual_servers=servers,
        health_check_node_port=health_check_node_port(service),
        summary=summarize(servers),
    )
    return program.model_copy(update={"content_hash": content_hash(program)})
