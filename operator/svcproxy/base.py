"""The words every layer shares: the proxy :data:`Mode` and the :class:`IPFamily` of an address.

The bottom of the package: it imports nothing from svcproxy and no I/O library, so the
API models, the compile step, the data plane, the agent and the CLI all spell a mode
and tell IPv4 from IPv6 the same way.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import Literal, TypeGuard

Mode = Literal["ipvs", "iptables", "userspace"]
"""A proxy mode, as a ServiceProxyPolicy, a ProxyVirtualServer and a ProxyNode spell it."""

MODES: tuple[Mode, ...] = ("ipvs", "iptables", "userspace")

EXTERNAL_MODES: tuple[Mode, ...] = ("iptables", "userspace")
"""The modes that serve node ports, external IPs and load-balancer IPs. The operator
compiles such Services only under these (others leave them to kube-proxy) and the
agent's trust check refuses a node port asking for any other mode."""

NODE_PORT_ADDRESSES: tuple[str, str] = ("0.0.0.0", "::")
"""The address of a node-port virtual server (IPv4, IPv6): every local address of the
node. The operator compiles node ports with it; every mode and the agent read it so."""

SOURCE_RANGE_MODES: tuple[Mode, ...] = ("iptables", "userspace")
"""The modes that filter load-balancer IPs by spec.loadBalancerSourceRanges. The
operator compiles such Services only under these, and the agent refuses a virtual
server carrying source ranges in any other mode."""

LOCAL_POLICY_MODES: tuple[Mode, ...] = ("iptables", "userspace")
"""The modes that serve externalTrafficPolicy and internalTrafficPolicy Local (only
this node's endpoints). The operator compiles such Services only under these, and
the agent refuses a virtual server with trafficPolicy Local in any other mode."""


def is_mode(text: str) -> TypeGuard[Mode]:
    """True when ``text`` names a proxy mode (narrows it to :data:`Mode`)."""
    return text in MODES


def parse_mode(text: str) -> Mode:
    """``text`` as a :data:`Mode`; ValueError naming the valid modes otherwise."""
    if not is_mode(text):
        raise ValueError(f"unknown proxy mode {text!r}: use one of {', '.join(MODES)}")
    return text


class IPFamily(enum.Enum):
    """IPv4 or IPv6, told from the spelling of an address, a CIDR or a host."""

    V4 = 4
    V6 = 6

    @classmethod
    def of(cls, address: str) -> IPFamily:
        """The family of ``address`` (no parsing: an IPv6 address always holds a colon,
        an IPv4 address, an IPv4 CIDR and a host name never do)."""
        return cls.V6 if ":" in address else cls.V4

    @classmethod
    def is_v6(cls, address: str) -> bool:
        return cls.of(address) is cls.V6

    @classmethod
    def bracketed(cls, address: str) -> str:
        """``address`` as the host part of ``host:port`` or a URL (IPv6 in brackets)."""
        return f"[{address}]" if cls.of(address) is cls.V6 else address

    @property
    def host_prefix(self) -> int:
        """Prefix length of a single host: 32 or 128."""
        return 128 if self is IPFamily.V6 else 32


def unusable_as_vip(address: str) -> bool:
    """Not an address a Service can be reached at: malformed, unspecified (the node-port
    form), loopback, link-local or multicast. The API server refuses such externalIPs;
    the operator also skips such load-balancer IPs and the agent never trusts them."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True
    return ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast
