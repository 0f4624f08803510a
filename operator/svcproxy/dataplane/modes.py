"""Build a proxier by mode name; the agent's one entry into the data plane.

The agent calls :func:`build_proxier` once per mode it needs, at start, and
reads ``proxier.capabilities()`` to decide on fallback (an ``ipvs`` Service
on a node where IPVS is unavailable runs in ``iptables`` mode). Mode
packages are imported lazily here, so a node without pyroute2's IPVS
support still runs the other modes, and no mode imports another.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from svcproxy.base import Mode, parse_mode
from svcproxy.dataplane.proxier import Proxier


@dataclass(frozen=True)
class DataplaneConfig:
    """Node-level settings shared by the modes."""

    # Dummy interface holding IPVS VIPs; a VIP on it marks its virtual servers as ours.
    interface: str = "svcproxy0"
    # Traffic from outside these CIDRs is masqueraded (kube-proxy's --cluster-cidr).
    cluster_cidrs: tuple[str, ...] = ("10.244.0.0/16",)
    # Masquerade everything (kube-proxy's --masquerade-all); needed when clients
    # are not routed back through this node.
    masquerade_all: bool = False
    # Set net.ipv4.ip_forward, vs.conntrack, ... (off in tests of a fake kernel).
    set_sysctls: bool = True


_MODULES: dict[Mode, str] = {
    "ipvs": "svcproxy.dataplane.ipvs.host",
    "iptables": "svcproxy.dataplane.iptables.proxier",
    "userspace": "svcproxy.dataplane.userspace.proxier",
}


def build_proxier(mode: Mode, config: DataplaneConfig | None = None) -> Proxier:
    """The proxier of ``mode`` on the real kernel (check ``capabilities().available``).

    Construction never raises for a missing kernel feature: the proxier
    reports ``available=False`` with the reason, and its ``sync`` returns a
    ``ModeUnavailableError`` error.
    """
    module = importlib.import_module(_MODULES[parse_mode(mode)])
    proxier: Proxier = module.create(config or DataplaneConfig())
    return proxier
