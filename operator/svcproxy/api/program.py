"""ProxyVirtualServer: the compiled program of one Service, written by the operator.

One object per proxied Service, with the Service's name and namespace. It lists
every virtual server (service port x virtual IP) with its scheduler, flags,
persistence and real servers, in the order the agents program them. Agents
read these and nothing else; the content hash lets them report exactly which
program they applied.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints

from svcproxy.api.common import API_VERSION, LENIENT, UNIQUE, ApiModel, CelRule, ObjectMeta
from svcproxy.api.policy import Scheduler, SchedulerFlag
from svcproxy.base import NODE_PORT_ADDRESSES, Mode

Protocol = Literal["TCP", "UDP", "SCTP"]
AddressType = Literal["ClusterIP", "ExternalIP", "LoadBalancerIP", "NodePort"]
TrafficPolicy = Literal["Cluster", "Local"]
IPAddress = Annotated[str, StringConstraints(min_length=2, max_length=45)]


def _cidr(text: str) -> str:
    # As the API server's ``format: cidr`` (Go's net.ParseCIDR): host bits may be set,
    # the prefix length may not be left out.
    try:
        if "/" not in text:
            raise ValueError("the prefix length is missing")
        ipaddress.ip_network(text, strict=False)
    except ValueError as err:
        raise ValueError(f"{text!r} is not a CIDR (e.g. 203.0.113.0/24 or 2001:db8::/32): {err}") from err
    return text


CIDR = Annotated[
    str, StringConstraints(min_length=4, max_length=43), AfterValidator(_cidr),
    Field(json_schema_extra={"format": "cidr"}),
]
"""An IPv4 or IPv6 network, checked by the schema's ``format: cidr`` (no CEL cost: the
lists holding it are nested in the unbounded list of virtual servers)."""


class RealServerSpec(ApiModel):
    """One endpoint behind a virtual server."""

    address: IPAddress
    """The endpoint's IP address."""
    port: int = Field(ge=1, le=65535)
    """The endpoint's port (the Service's targetPort, resolved)."""
    weight: int = Field(default=1, ge=0, le=65535)
    """IPVS weight from the policy; 0 drains: no new connections, existing ones continue.
    A serving-terminating endpoint keeps its weight: agents drain it while its scope has
    a ready endpoint and give it new connections when none is ready (as kube-proxy)."""
    node_name: str | None = None
    """The node the endpoint runs on."""
    pod_name: str | None = None
    """The Pod behind the endpoint."""
    ready: bool = True
    """The endpoint is ready: it takes new connections."""
    serving: bool = True
    """The endpoint is serving (ready, or terminating but still answering)."""
    terminating: bool = False
    """The endpoint is terminating (see ``weight`` for how serving ones are used)."""


EndpointKey = tuple[str, int]


def is_ready(rs: RealServerSpec) -> bool:
    """Takes new connections as kube-proxy's Ready (compile already clears ready when terminating)."""
    return rs.ready and not rs.terminating


def is_serving_terminating(rs: RealServerSpec) -> bool:
    """Terminating but still answering: used only when its scope has no ready endpoint."""
    return rs.serving and rs.terminating


def _usable(reals: Sequence[RealServerSpec]) -> frozenset[EndpointKey]:
    ready = frozenset((rs.address, rs.port) for rs in reals if is_ready(rs))
    if ready:
        return ready
    return frozenset((rs.address, rs.port) for rs in reals if is_serving_terminating(rs))


def usable_endpoints(
    reals: Sequence[RealServerSpec], local: Sequence[bool]
) -> tuple[frozenset[EndpointKey], frozenset[EndpointKey]]:
    """The endpoints (address, port) taking new connections: (cluster scope, local scope).

    kube-proxy's rule (CategorizeEndpoints), applied to each scope on its own: the ready
    endpoints; if none is ready, the serving-terminating ones; else none. The cluster
    scope is every endpoint; the local scope only those with ``local`` set (this node's,
    under a traffic policy Local). So a node whose own endpoint terminates while another
    node's is ready sends local-scope traffic to its terminating one, as kube-proxy does.
    """
    return _usable(reals), _usable([rs for rs, mine in zip(reals, local, strict=True) if mine])


class VirtualServerSpec(ApiModel):
    """One virtual server: a virtual IP, protocol and port, and its real servers."""

    port_name: Annotated[str, StringConstraints(max_length=63)] = ""
    """The Service port's name ("" for a single unnamed port)."""
    protocol: Protocol = "TCP"
    """Transport protocol."""
    address: IPAddress
    """The virtual IP: a ClusterIP, an external IP, a load-balancer ingress IP, or for a
    node port 0.0.0.0 (IPv4) or :: (IPv6), meaning the node's own addresses."""
    address_type: AddressType = "ClusterIP"
    """Where the virtual IP comes from."""
    port: int = Field(ge=1, le=65535)
    """The virtual port (the node port for addressType NodePort)."""
    mode: Mode = "ipvs"
    """Proxy mode for this virtual server."""
    scheduler: Scheduler | None = None
    """Scheduler (none in iptables mode, where the choice is random)."""
    scheduler_flags: list[SchedulerFlag] = Field(default_factory=list)
    """Scheduler flags (sh and mh only)."""
    persistence_timeout_seconds: int = Field(default=0, ge=0, le=86400)
    """ClientIP affinity timeout; 0 means no affinity."""
    real_servers: list[RealServerSpec] = Field(default_factory=list)
    """Real servers in canonical order (sorted by address and port): every node adds
    them in this order so hashing schedulers agree across nodes."""
    traffic_policy: TrafficPolicy | None = None
    """Which real servers new connections go to: Cluster (or left out), all of them;
    Local, only those whose nodeName is the agent's node, keeping the client address
    (the Service's internalTrafficPolicy for a ClusterIP, its externalTrafficPolicy for
    the others). No default in the CRD: during an upgrade an agent that predates the
    field then refuses only the programs that set it, not every program."""
    load_balancer_source_ranges: Annotated[list[CIDR], UNIQUE] | None = Field(
        default=None, min_length=1, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """The Service's spec.loadBalancerSourceRanges, on its load-balancer IPs only: new
    connections to this virtual IP are taken only from these networks (those of the
    address's family; a /0 of it takes every client) and from the node itself; others are
    dropped. Left out: no filter. Never on a ClusterIP, external IP or node port (as
    kube-proxy). Like trafficPolicy, no default: an agent that predates it refuses the
    programs that set it rather than serve them unfiltered."""

    cel_rules = (
        # Agents read 0.0.0.0 / :: as "a node port"; any other pairing would be misread.
        CelRule(
            rule="(self.address == '0.0.0.0' || self.address == '::') == "
            "(has(self.addressType) && self.addressType == 'NodePort')",
            message="address 0.0.0.0 or :: goes with addressType NodePort, and only with it"
            " (a node port is served on the node's own addresses; every other virtual IP is one address)",
            check=lambda s: (s.address in NODE_PORT_ADDRESSES) == (s.address_type == "NodePort"),
            field_path=".address",
        ),
        CelRule(
            rule="!has(self.loadBalancerSourceRanges) || "
            "(has(self.addressType) && self.addressType == 'LoadBalancerIP')",
            message="loadBalancerSourceRanges goes with addressType LoadBalancerIP only (kube-proxy"
            " filters load-balancer IPs by source, never ClusterIPs, external IPs or node ports)",
            check=lambda s: s.load_balancer_source_ranges is None or s.address_type == "LoadBalancerIP",
            field_path=".loadBalancerSourceRanges",
        ),
    )


class ObjectRef(ApiModel):
    """A reference to the object a program came from."""

    name: str
    """Name."""
    uid: str | None = None
    """UID."""
    generation: int | None = None
    """.metadata.generation at compile time (policies only)."""


class ProgramSummary(ApiModel):
    """Short text for `kubectl get pvs`."""

    vips: str = ""
    """Virtual IP:port/protocol list."""
    endpoints: str = ""
    """Ready endpoints over all listed endpoints."""


class ProxyVirtualServerSpec(ApiModel):
    """The compiled program of one Service."""

    service: ObjectRef
    """The Service this programs (same name and namespace as this object)."""
    policy: ObjectRef
    """The ServiceProxyPolicy it was compiled from."""
    mode: Mode
    """Proxy mode."""
    scheduler: Scheduler | None = None
    """Scheduler (none in iptables mode)."""
    scheduler_flags: list[SchedulerFlag] = Field(default_factory=list)
    """Scheduler flags."""
    persistence_timeout_seconds: int = Field(default=0, ge=0, le=86400)
    """ClientIP affinity timeout; 0 means no affinity."""
    virtual_servers: list[VirtualServerSpec] = Field(default_factory=list)
    """One entry per service port and virtual IP."""
    health_check_node_port: int | None = Field(default=None, ge=1, le=65535)
    """The Service's healthCheckNodePort (externalTrafficPolicy Local): every agent answers
    HTTP on it, 200 while its node has a ready local endpoint, else 503."""
    content_hash: str = ""
    """Hash of everything above: agents report it once applied."""
    summary: ProgramSummary = Field(default_factory=ProgramSummary)
    """Short text for printer columns."""


class ProxyVirtualServer(ApiModel):
    """The compiled proxy program of one Service, written only by the svcproxy operator
    and read by every node agent."""

    model_config = LENIENT

    api_version: Literal["svcproxy.io/v1alpha1"] = API_VERSION
    kind: Literal["ProxyVirtualServer"] = "ProxyVirtualServer"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ProxyVirtualServerSpec

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ProxyVirtualServer:
        return cls.model_validate(obj)
