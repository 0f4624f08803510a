"""What a proxy mode can do on this node and what it owns: plain values.

Apart from :mod:`svcproxy.dataplane.proxier` (which imports asyncio for the
mode interface), so the agent's pure parts (routing, the report) can read
them without an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from svcproxy.base import Mode


@dataclass(frozen=True)
class ModeCapabilities:
    """What a mode can do on this node (reported in ProxyNode status)."""

    mode: Mode
    available: bool
    reason: str = ""  # why not, and what to do, when not available
    schedulers: frozenset[str] = frozenset()  # usable schedulers (ipvs, userspace)
    protocols: frozenset[str] = frozenset({"TCP", "UDP"})
    backend: str = ""  # e.g. "iptables-nft" / "iptables-legacy" / "netlink"
    detail: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModeCounts:
    """What a proxier owns right now (from its mirror, refreshed on full syncs)."""

    virtual_servers: int = 0
    real_servers: int = 0
    rules: int = 0  # netfilter rules (iptables/userspace) or 0
