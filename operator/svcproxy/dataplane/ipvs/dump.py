"""Decode IPVS netlink dump replies into table values, by hand, only what the diff needs.

``netlink.NetlinkIpvs.dump`` reads the kernel's IPVS table (one GET_SERVICE dump,
then one GET_DEST dump per service) and hands each reply message here. pyroute2's
generic decoder builds every attribute of every message (statistics included) as
Python objects, most of a full sync's cost. This module reads
the few attributes the diff compares (protocol, address, port, scheduler, flags,
timeout, and what svcproxy never sets: other flag bits, the persistence netmask, a
persistence engine; a real server's address, port, weight and forwarding method)
straight from the bytes with ``struct``. Pure: no socket, no pyroute2 (so unit tests and the
equivalence test against pyroute2's decoder run anywhere).
Attribute numbers: include/uapi/linux/ip_vs.h.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from svcproxy.dataplane.table import (
    FORWARD_METHODS,
    NO_FLAGS,
    Forward,
    Protocol,
    RealServer,
    VirtualServer,
    VSKey,
    normalize_address,
)

NLMSG_HDR = 16
GENL_HDR = 4
CMD_ATTR_SERVICE = 1
CMD_ATTR_DEST = 2
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT = 1, 2, 3, 4, 6, 7, 8
SVC_NETMASK, SVC_PE_NAME = 9, 11
DEST_ADDR, DEST_PORT, DEST_FWD, DEST_WEIGHT, DEST_FAMILY = 1, 2, 3, 4, 11
F_PERSISTENT, F_HASHED, F_ONEPACKET = 0x1, 0x2, 0x4
FWD_MASK = 0x7  # IP_VS_CONN_F_FWD_MASK: the forwarding method in the dest's conn flags
PROTO_NAMES: dict[int, Protocol] = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP", 132: "SCTP"}
FLAG_BITS = {"sh-fallback": 0x8, "sh-port": 0x10, "mh-fallback": 0x8, "mh-port": 0x10}
# The persistence netmask svcproxy sends (nlpack.py): one client address. The kernel
# keeps it raw: an IPv4 mask, or an IPv6 prefix length in host byte order.
HOST_NETMASK: dict[int, int] = {socket.AF_INET: 0xFFFFFFFF, socket.AF_INET6: 128}
# /proc/net/ip_vs spells the forwarding method as ip_vs_fwd_name() does (BYPASS prints as Masq).
PROC_FORWARD: dict[str, Forward] = {"Masq": "masq", "Local": "local", "Tunnel": "tunnel", "Route": "route"}
# Stops after NETMASK: a persistence engine's name (if any) comes before FLAGS, statistics last.
_SVC_WANTED = frozenset({SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_SCHED, SVC_FLAGS, SVC_TIMEOUT,
                         SVC_NETMASK})
_DEST_WANTED = frozenset({DEST_ADDR, DEST_PORT, DEST_FWD, DEST_WEIGHT, DEST_FAMILY})
_ATTR = struct.Struct("=HH")
_U16 = struct.Struct("=H")
_BE16 = struct.Struct(">H")
_U32 = struct.Struct("=I")


def attrs(
    data: bytes, start: int, end: int, wanted: frozenset[int] = frozenset()
) -> dict[int, tuple[int, int]]:
    """Attribute type -> (payload start, payload end) within ``data[start:end]``; stops
    once every type in ``wanted`` is found (statistics come last: not walked then)."""
    out: dict[int, tuple[int, int]] = {}
    offset = start
    unpack = _ATTR.unpack_from
    while offset + 4 <= end:
        length, kind = unpack(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = (offset + 4, offset + length)  # without NLA_F_NESTED / BYTEORDER
        if wanted and wanted.issubset(out):
            break
        offset += (length + 3) & ~3
    return out


def _nested(msg: bytes, kind: int, wanted: frozenset[int]) -> dict[int, tuple[int, int]] | None:
    top = attrs(msg, NLMSG_HDR + GENL_HDR, len(msg))
    if kind not in top:
        return None
    start, end = top[kind]
    return attrs(msg, start, end, wanted)


def _real(address: str, port: int, weight: int, forward: Forward = "masq") -> RealServer:
    """A RealServer from values already checked: the address is normalised here once
    per distinct address (``dest``), the kernel's port and weight are in range, so the
    per-object validation (an ``ipaddress`` parse, ~half of a dump's Python time in a
    UML guest at 10 real servers per service) is skipped."""
    real = object.__new__(RealServer)
    object.__setattr__(real, "address", address)
    object.__setattr__(real, "port", port)
    object.__setattr__(real, "weight", weight)
    object.__setattr__(real, "forward", forward)
    object.__setattr__(real, "local", False)
    object.__setattr__(real, "cluster_drain", False)
    return real


def _address(msg: bytes, span: tuple[int, int], family: int) -> str:
    size = 16 if family == socket.AF_INET6 else 4
    return socket.inet_ntop(family, msg[span[0] : span[0] + size])


@dataclass(frozen=True, slots=True)
class Service:
    """One decoded service reply: its key and service attributes (no real servers)."""

    key: VSKey
    family: int
    scheduler: str
    flags: frozenset[str]
    persistence: int
    other: frozenset[str] = NO_FLAGS


def service(msg: bytes) -> Service | None:
    """A GET_SERVICE reply message; None for a service that is not ours to read
    (a firewall-mark service has no protocol/address)."""
    a = _nested(msg, CMD_ATTR_SERVICE, _SVC_WANTED)
    if a is None or SVC_ADDR not in a or SVC_PROTOCOL not in a:
        return None
    proto = PROTO_NAMES.get(_U16.unpack_from(msg, a[SVC_PROTOCOL][0])[0])
    if proto is None:
        return None
    family = _U16.unpack_from(msg, a[SVC_AF][0])[0]
    address = normalize_address(_address(msg, a[SVC_ADDR], family))
    port = _BE16.unpack_from(msg, a[SVC_PORT][0])[0]
    start, end = a[SVC_SCHED]
    sched = msg[start:end].split(b"\0", 1)[0].decode()
    bits = _U32.unpack_from(msg, a[SVC_FLAGS][0])[0] if SVC_FLAGS in a else 0
    timeout = _U32.unpack_from(msg, a[SVC_TIMEOUT][0])[0] if SVC_TIMEOUT in a else 0
    flags = frozenset(f for f, b in FLAG_BITS.items() if f.startswith(sched + "-") and bits & b)
    return Service(VSKey(proto, address, port), family, sched,
                   flags, timeout if bits & F_PERSISTENT else 0, _other(msg, a, family, bits, flags))


def _other(msg: bytes, a: dict[int, tuple[int, int]], family: int, bits: int,
           flags: frozenset[str]) -> frozenset[str]:
    mask = _U32.unpack_from(msg, a[SVC_NETMASK][0])[0] if SVC_NETMASK in a else None
    pe = None
    if SVC_PE_NAME in a:
        start, end = a[SVC_PE_NAME]
        pe = msg[start:end].split(b"\0", 1)[0].decode()
    return other_settings(family, bits, flags, mask, pe)


def other_settings(family: int, bits: int, flags: frozenset[str], netmask: int | None,
                   pe: str | None) -> frozenset[str]:
    """What a service holds that svcproxy never sets, spelled as ipvsadm does: flag bits
    other than persistent/hashed/the scheduler's own (``ops`` = one-packet scheduling),
    a persistence netmask wider than one address (``netmask``: the raw u32 the kernel
    keeps), a persistence engine. Usually nothing: one shared empty set. Also used by
    the pyroute2 reference reader (``tests/dataplane/ipvs_reference.py``)."""
    other: list[str] = []
    extra = bits & ~(F_PERSISTENT | F_HASHED)
    for flag in flags:
        extra &= ~FLAG_BITS[flag]
    if extra & F_ONEPACKET:
        other.append("ops")
    if extra & ~F_ONEPACKET:
        other.append(f"flags {extra & ~F_ONEPACKET:#x}")
    if netmask is not None and netmask != HOST_NETMASK.get(family, netmask):
        other.append(f"netmask {socket.inet_ntoa(_U32.pack(netmask))}" if family == socket.AF_INET
                     else f"netmask /{netmask}")
    if pe:
        other.append(f"pe {pe}")
    return frozenset(other) if other else NO_FLAGS


def dest(msg: bytes, family: int, names: dict[bytes, str] | None = None) -> tuple[RealServer, int] | None:
    """A GET_DEST reply message: the real server with its forwarding method, and the
    method's kernel value. ``family``: the service's (older kernels send no per-dest
    family); ``names``: a cache of address spellings shared over one dump (real
    servers repeat across services). Values 5-7 name no kernel method: read as
    ``bypass``, which is not NAT either, so a full sync edits them back all the same."""
    a = _nested(msg, CMD_ATTR_DEST, _DEST_WANTED)
    if a is None or DEST_ADDR not in a:
        return None
    if DEST_FAMILY in a:
        family = _U16.unpack_from(msg, a[DEST_FAMILY][0])[0]
    size = 16 if family == socket.AF_INET6 else 4
    raw = msg[a[DEST_ADDR][0] : a[DEST_ADDR][0] + size]
    address = names.get(raw) if names is not None else None
    if address is None:
        address = normalize_address(socket.inet_ntop(family, raw))
        if names is not None:
            names[raw] = address
    port = _BE16.unpack_from(msg, a[DEST_PORT][0])[0]
    weight = _U32.unpack_from(msg, a[DEST_WEIGHT][0])[0] if DEST_WEIGHT in a else 0
    fwd = _U32.unpack_from(msg, a[DEST_FWD][0])[0] & FWD_MASK if DEST_FWD in a else 0
    forward = FORWARD_METHODS[fwd] if fwd < len(FORWARD_METHODS) else "bypass"
    return _real(address, port, weight, forward), fwd


def virtual_server(svc: Service, reals: list[RealServer]) -> VirtualServer:
    return VirtualServer(
        protocol=svc.key.protocol,
        address=svc.key.address,
        port=svc.key.port,
        scheduler=svc.scheduler,
        flags=svc.flags,
        persistence=svc.persistence,
        real_servers=tuple(reals),
        other=svc.other,
    )


def proc_real_servers(text: str) -> dict[VSKey, list[RealServer]]:
    """Real servers per service, in kernel order, from ``/proc/net/ip_vs``.

    The file carries a real server's address, port, forwarding method and weight in
    one line each (``  -> 0AF40102:1F90      Masq    1      0          0``) and
    costs a few reads for the whole table, where netlink needs one dump (three system
    calls) per service: most of a full sync in a UML guest. It does not carry the
    sh/mh flag bits (only ``persistent``), so the services themselves come from the
    netlink dump. The forwarding method is read as the netlink reader reads it (the
    file prints BYPASS as ``Masq``; no tool sets BYPASS). The upper/lower connection
    thresholds are in neither this file nor the comparison.
    """
    out: dict[VSKey, list[RealServer]] = {}
    names: dict[str, str] = {}
    reals: list[RealServer] | None = None
    for line in text.splitlines():
        if line.startswith("  -> "):
            if reals is None:
                continue
            fields = line.split()
            where, weight = fields[1], int(fields[3])
            raw, _, port = where.rpartition(":")
            address = names.get(raw)
            if address is None:
                address = _proc_address(raw)
                names[raw] = address
            reals.append(_real(address, int(port, 16), weight, PROC_FORWARD.get(fields[2], "bypass")))
            continue
        reals = None
        fields = line.split()
        if len(fields) < 3 or fields[0] not in ("TCP", "UDP", "SCTP"):
            continue  # the header lines, FWM and other protocols
        raw, _, port = fields[1].rpartition(":")
        key = VSKey(fields[0], _proc_address(raw), int(port, 16))  # type: ignore[arg-type]
        reals = out[key] = []
    return out


def _proc_address(raw: str) -> str:
    if raw.startswith("["):  # IPv6, printed in full (%pI6)
        return normalize_address(raw[1:-1])
    return socket.inet_ntop(socket.AF_INET, int(raw, 16).to_bytes(4, "big"))
