"""Mode routing: which proxier runs each virtual server on this node; pure.

Modes do not know each other; the agent asks the router where each virtual
server of a :class:`~svcproxy.agent.convert.DesiredProgram` goes. An ``ipvs``
virtual server runs in ``iptables`` mode when IPVS is not usable on the
node, when its scheduler's module does not load, or when the ipvs proxier
reported a fallback error for its owner at runtime. A ``userspace`` one
falls back to ``iptables`` too if the agent cannot proxy here. Each decision
is a :class:`Route` (requested, effective, reason) that the ProxyNode
report lists. Called by :class:`svcproxy.agent.agent.Agent`.

Node ports, external and load-balancer IPs need no routing of their own: the
operator compiles them only into programs whose mode serves them (iptables or
userspace; ipvs leaves such Services to kube-proxy), the trust check refuses a node
port asking for another mode, iptables never falls back, and userspace falls back to
iptables only. Likewise source ranges and the traffic policies Local (iptables and
userspace) are compiled only for the modes that serve them and are a spec error in
another mode (:mod:`svcproxy.agent.convert`). So no mode is
handed a virtual server it cannot serve, and none is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.plan import Placement
from svcproxy.base import Mode
from svcproxy.dataplane.capabilities import ModeCapabilities
from svcproxy.dataplane.table import VirtualServer

FALLBACK_MODE: Mode = "iptables"


@dataclass(frozen=True)
class Route:
    requested: Mode
    effective: Mode
    reason: str = ""


class Router:
    """Decides the effective mode of each virtual server from detected capabilities."""

    def __init__(self, capabilities: Mapping[Mode, ModeCapabilities]) -> None:
        self.capabilities = dict(capabilities)
        # owner -> reason: the ipvs proxier refused it at runtime (e.g. a scheduler failed to load).
        self.forced: dict[str, str] = {}

    def available(self, mode: Mode) -> bool:
        caps = self.capabilities.get(mode)
        return caps is not None and caps.available

    def route(self, mode: Mode, vs: VirtualServer) -> Route:
        if mode == FALLBACK_MODE:
            return Route(mode, mode)
        caps = self.capabilities.get(mode)
        if caps is None or not caps.available:
            why = caps.reason if caps is not None and caps.reason else f"{mode} mode is not available"
            return Route(mode, FALLBACK_MODE, why)
        if mode == "ipvs" and caps.schedulers and vs.scheduler not in caps.schedulers:
            return Route(
                mode,
                FALLBACK_MODE,
                f"IPVS scheduler {vs.scheduler} does not load on this node (module ip_vs_{vs.scheduler})",
            )
        forced = self.forced.get(vs.owner)
        if forced:
            return Route(mode, FALLBACK_MODE, forced)
        return Route(mode, mode)

    def place(self, program: DesiredProgram) -> tuple[Placement, list[Route]]:
        """Effective placement of one program's virtual servers, and the routes taken."""
        placement: Placement = {}
        routes: list[Route] = []
        for mode, servers in program.by_mode.items():
            for vs in servers:
                route = self.route(mode, vs)
                placement.setdefault(route.effective, {})[vs.key] = vs
                if route not in routes:
                    routes.append(route)
        return placement, routes


def modes_summary(routes: list[Route]) -> str:
    """Short text for ``kubectl get pn``, e.g. "iptables(ipvs),userspace"."""
    parts: list[str] = []
    for r in sorted(set(routes), key=lambda r: (r.effective, r.requested)):
        text = r.effective if r.effective == r.requested else f"{r.effective}({r.requested})"
        if text not in parts:
            parts.append(text)
    return ",".join(parts)
