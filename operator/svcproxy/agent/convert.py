"""ProxyVirtualServer -> the data plane's desired entries; pure.

The watch (:mod:`svcproxy.agent.watch`) parses each object once into the
pydantic model; :func:`to_program` turns it into a :class:`DesiredProgram`: the
owner ("namespace/name"), its content hash and its virtual servers grouped
by the mode they ask for. The agent's router then decides the mode each
group really runs in. Endpoint rules (kube-proxy's, per traffic scope, see
:func:`usable_endpoints`): ready endpoints take new connections with their weight;
when none is ready, the serving-terminating ones do instead; serving endpoints that
terminate otherwise drain (weight 0, existing connections continue); endpoints that
neither are left out. Every mode reads only the weights, so each gets the rule here.

A virtual server with ``trafficPolicy: Local`` keeps every real server, each marked
``local`` when its ``nodeName`` is this agent's node: the iptables rules send outside
traffic only to those (:mod:`svcproxy.dataplane.iptables.rules`). Such a program is
one for all nodes; only the agent knows which endpoints are its own, so the node name
is given to :func:`to_program`. The program's ``healthCheckNodePort`` and this node's
count of ready local endpoints feed :mod:`svcproxy.agent.healthcheck`.

A load-balancer IP's ``loadBalancerSourceRanges`` become the virtual server's
``source_ranges`` (:func:`source_ranges`: this address's family only), which the
iptables and userspace modes filter new connections by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from svcproxy.api.program import (
    ProxyVirtualServer,
    RealServerSpec,
    VirtualServerSpec,
    is_ready,
    usable_endpoints,
)
from svcproxy.base import LOCAL_POLICY_MODES, SOURCE_RANGE_MODES, IPFamily, Mode
from svcproxy.dataplane.table import (
    LocalPolicy,
    RealServer,
    SourceRanges,
    VirtualServer,
    normalize_network,
)


@dataclass(frozen=True)
class DesiredProgram:
    """One ProxyVirtualServer as the agent keeps it.

    ``by_mode``: requested mode -> virtual servers (owner set, reals in
    canonical order). ``error``: set when the object cannot be programmed
    at all (then ``by_mode`` is empty and the owner is reported, not applied).
    ``health_check_port``/``local_endpoints``: what the health-check server answers.
    """

    owner: str
    content_hash: str
    by_mode: Mapping[Mode, tuple[VirtualServer, ...]] = field(default_factory=dict)
    error: str = ""
    health_check_port: int | None = None  # the Service's healthCheckNodePort
    local_endpoints: int = 0  # ready endpoints on this node (for the health check)

    @property
    def virtual_server_count(self) -> int:
        return sum(len(v) for v in self.by_mode.values())


def owner_of(namespace: str | None, name: str) -> str:
    return f"{namespace or ''}/{name}"


def real_server(rs: RealServerSpec, local: bool = False, usable: bool | None = None,
                cluster_drain: bool = False) -> RealServer | None:
    """The kernel's view of one endpoint, or None when it takes no traffic at all.

    ``usable``: it takes new connections (:func:`~svcproxy.api.program.usable_endpoints`,
    the choice per scope); None means "if ready".
    A serving endpoint that is not usable drains (weight 0: existing connections only)."""
    if not is_ready(rs) and not rs.serving:
        return None
    if usable is None:
        usable = is_ready(rs)
    return RealServer(rs.address, rs.port, rs.weight if usable else 0, local=local,
                      cluster_drain=cluster_drain and usable)


def local_policy(vs: VirtualServerSpec) -> LocalPolicy:
    """How ``vs``'s trafficPolicy Local is served: "" (Cluster), "internal" for a
    ClusterIP (internalTrafficPolicy), "external" for the others."""
    if vs.traffic_policy != "Local":
        return ""
    if vs.mode not in LOCAL_POLICY_MODES:
        raise ValueError(
            f"trafficPolicy Local is served in {' and '.join(LOCAL_POLICY_MODES)} modes only, not {vs.mode}"
        )
    return "internal" if vs.address_type == "ClusterIP" else "external"


def source_ranges(vs: VirtualServerSpec) -> SourceRanges:
    """The networks new connections to ``vs`` may come from (besides the node itself), as
    kube-proxy reads loadBalancerSourceRanges: only those of the address's family, and a
    /0 of it means every client (None: no filter). Ranges of the other family only give
    ``()``: nobody but the node (kube-proxy would leave that address open)."""
    ranges = vs.load_balancer_source_ranges
    if ranges is None:
        return None
    if vs.mode not in SOURCE_RANGE_MODES:
        raise ValueError(
            f"loadBalancerSourceRanges are filtered in {' and '.join(SOURCE_RANGE_MODES)} modes only,"
            f" not {vs.mode}"
        )
    family = IPFamily.of(vs.address)
    mine = [normalize_network(r) for r in ranges if IPFamily.of(r) is family]
    if any(r.endswith("/0") for r in mine):
        return None
    return tuple(mine)


def virtual_server(vs: VirtualServerSpec, owner: str, node_name: str = "") -> VirtualServer:
    """``vs`` as the data plane takes it; under a traffic policy Local, real servers on
    ``node_name`` are marked local."""
    policy = local_policy(vs)
    specs = vs.real_servers
    marks = [bool(policy) and bool(node_name) and rs.node_name == node_name for rs in specs]
    cluster, mine = usable_endpoints(specs, marks)
    reals: dict[tuple[str, int], RealServer] = {}
    for api_rs, local in zip(specs, marks, strict=True):
        key = (api_rs.address, api_rs.port)
        # A local endpoint follows the local scope's choice; if only that scope uses it,
        # the cluster scope (external policy's cluster chain) still drains it.
        usable = key in mine if local else key in cluster
        rs = real_server(api_rs, local, usable, cluster_drain=local and key not in cluster)
        if rs is None:
            continue
        old = reals.get(rs.key)
        # One endpoint listed twice (two slices during a rollout): keep the stronger entry.
        if old is None or rs.weight > old.weight:
            reals[rs.key] = rs
    return VirtualServer.create(
        vs.protocol,
        vs.address,
        vs.port,
        reals.values(),
        scheduler=vs.scheduler or "rr",
        flags=vs.scheduler_flags,
        persistence=vs.persistence_timeout_seconds,
        owner=owner,
        local_policy=policy,
        source_ranges=source_ranges(vs),
    )


def local_endpoints(pvs: ProxyVirtualServer, node_name: str) -> int:
    """Ready endpoints (distinct addresses) of the program on ``node_name``."""
    if not node_name:
        return 0
    return len({rs.address for vs in pvs.spec.virtual_servers for rs in vs.real_servers
                if rs.node_name == node_name and is_ready(rs)})


def to_program(pvs: ProxyVirtualServer, node_name: str = "") -> DesiredProgram:
    """The agent's form of one ProxyVirtualServer on the node ``node_name`` (never raises
    for bad content)."""
    owner = owner_of(pvs.metadata.namespace, pvs.metadata.name)
    by_mode: dict[Mode, list[VirtualServer]] = {}
    seen: set[tuple[str, str, int]] = set()
    try:
        for api_vs in pvs.spec.virtual_servers:
            vs = virtual_server(api_vs, owner, node_name)
            if vs.key in seen:
                raise ValueError(f"{vs.key} is listed twice: list each VIP:port/protocol once")
            seen.add(vs.key)
            by_mode.setdefault(api_vs.mode, []).append(vs)
    except ValueError as err:
        return DesiredProgram(owner, pvs.spec.content_hash, {}, f"cannot program {owner}: {err}")
    port = pvs.spec.health_check_node_port
    return DesiredProgram(
        owner, pvs.spec.content_hash, {m: tuple(v) for m, v in by_mode.items()},
        health_check_port=port, local_endpoints=local_endpoints(pvs, node_name) if port else 0,
    )
