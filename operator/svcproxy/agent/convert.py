"""ProxyVirtualServer -> the data plane's desired entries; pure.

The watch (:mod:`svcproxy.agent.watch`) parses each object once into the
pydantic model; :func:`to_program` turns it into a :class:`DesiredProgram`: the
owner ("namespace/name"), its content hash and its virtual servers grouped
by the mode they ask for. The agent's router then decides the mode each
group really runs in. Endpoint rules: ready endpoints take traffic with
their weight; serving endpoints that terminate are drained (weight 0, no new
connections, existing ones continue); endpoints that neither are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from svcproxy.api.program import ProxyVirtualServer, RealServerSpec, VirtualServerSpec
from svcproxy.base import Mode
from svcproxy.dataplane.table import RealServer, VirtualServer


@dataclass(frozen=True)
class DesiredProgram:
    """One ProxyVirtualServer as the agent keeps it.

    ``by_mode``: requested mode -> virtual servers (owner set, reals in
    canonical order). ``error``: set when the object cannot be programmed
    at all (then ``by_mode`` is empty and the owner is reported, not applied).
    """

    owner: str
    content_hash: str
    by_mode: Mapping[Mode, tuple[VirtualServer, ...]] = field(default_factory=dict)
    error: str = ""

    @property
    def virtual_server_count(self) -> int:
        return sum(len(v) for v in self.by_mode.values())


def owner_of(namespace: str | None, name: str) -> str:
    return f"{namespace or ''}/{name}"


def real_server(rs: RealServerSpec) -> RealServer | None:
    """The kernel's view of one endpoint, or None when it takes no traffic at all."""
    if rs.ready and not rs.terminating:
        return RealServer(rs.address, rs.port, rs.weight)
    if rs.serving:
        # Terminating but still answering: keep existing connections, send no new ones.
        return RealServer(rs.address, rs.port, 0)
    return None


def virtual_server(vs: VirtualServerSpec, owner: str) -> VirtualServer:
    reals: dict[tuple[str, int], RealServer] = {}
    for api_rs in vs.real_servers:
        rs = real_server(api_rs)
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
    )


def to_program(pvs: ProxyVirtualServer) -> DesiredProgram:
    """The agent's form of one ProxyVirtualServer (never raises for bad content)."""
    owner = owner_of(pvs.metadata.namespace, pvs.metadata.name)
    by_mode: dict[Mode, list[VirtualServer]] = {}
    seen: set[tuple[str, str, int]] = set()
    try:
        for api_vs in pvs.spec.virtual_servers:
            vs = virtual_server(api_vs, owner)
            if vs.key in seen:
                raise ValueError(f"{vs.key} is listed twice: list each VIP:port/protocol once")
            seen.add(vs.key)
            by_mode.setdefault(api_vs.mode, []).append(vs)
    except ValueError as err:
        return DesiredProgram(owner, pvs.spec.content_hash, {}, f"cannot program {owner}: {err}")
    return DesiredProgram(owner, pvs.spec.content_hash, {m: tuple(v) for m, v in by_mode.items()})
