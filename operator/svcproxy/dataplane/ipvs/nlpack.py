"""IPVS generic netlink requests packed by hand, and netlink message framing; pure.

``netlink.NetlinkIpvs`` sends what this packs (one request per diff operation, and
the dump/get requests of its reads) and ``nlsock`` splits replies with
:func:`messages`. Packing by hand avoids pyroute2's encoder, slow where every
message counts (UML guests); the result is checked byte for byte against pyroute2's encoding
(``tests/unit/test_dataplane_netlink.py``, reference codec in
``tests/dataplane/ipvs_reference.py``). Every service request carries scheduler, flags,
timeout and netmask (so an update also clears what svcproxy never sets: one-packet
scheduling, a wider persistence netmask, a persistence engine), and every real server
its forwarding method, NAT (0) in every desired table. Numbers: include/uapi/linux
netlink.h, genetlink.h and ip_vs.h. No socket I/O, no pyroute2.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

from svcproxy.base import IPFamily
from svcproxy.dataplane.diff import Operation, OpKind
from svcproxy.dataplane.table import FORWARD_METHODS, Protocol, RealServer, VirtualServer, VSKey

NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_ERROR, NLMSG_DONE = 2, 3
HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
GENL_VERSION = 1  # IPVS_GENL_VERSION
(IPVS_CMD_NEW_SERVICE, IPVS_CMD_SET_SERVICE, IPVS_CMD_DEL_SERVICE, IPVS_CMD_GET_SERVICE,
 IPVS_CMD_NEW_DEST, IPVS_CMD_SET_DEST, IPVS_CMD_DEL_DEST, IPVS_CMD_GET_DEST) = range(1, 9)
CMD_ATTR_SERVICE, CMD_ATTR_DEST = 1, 2

PROTO_NUMBERS: dict[Protocol, int] = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES: dict[int, Protocol] = {v: k for k, v in PROTO_NUMBERS.items()}
F_PERSISTENT = 0x1
FLAG_BITS = {"sh-fallback": 0x8, "sh-port": 0x10, "mh-fallback": 0x8, "mh-port": 0x10}
FWD_VALUES = {name: value for value, name in enumerate(FORWARD_METHODS)}  # masq -> 0

# Attribute numbers of include/uapi/linux/ip_vs.h.
_SVC = {"AF": 1, "PROTOCOL": 2, "ADDR": 3, "PORT": 4, "SCHED_NAME": 6, "FLAGS": 7,
        "TIMEOUT": 8, "NETMASK": 9}
_DEST = {"ADDR": 1, "PORT": 2, "FWD_METHOD": 3, "WEIGHT": 4, "U_THRESH": 5, "L_THRESH": 6,
         "ADDR_FAMILY": 11}

# Operation -> (command, extra header flags).
COMMANDS = {
    OpKind.ADD_VS: (IPVS_CMD_NEW_SERVICE, NLM_F_CREATE | NLM_F_EXCL),
    OpKind.UPDATE_VS: (IPVS_CMD_SET_SERVICE, 0),
    OpKind.DELETE_VS: (IPVS_CMD_DEL_SERVICE, 0),
    OpKind.ADD_RS: (IPVS_CMD_NEW_DEST, NLM_F_CREATE | NLM_F_EXCL),
    OpKind.UPDATE_RS: (IPVS_CMD_SET_DEST, 0),
    OpKind.DELETE_RS: (IPVS_CMD_DEL_DEST, 0),
}


def family(address: str) -> int:
    return socket.AF_INET6 if IPFamily.is_v6(address) else socket.AF_INET


def netmask(af: int) -> str:
    # The kernel reads IPVS_SVC_ATTR_NETMASK raw: all ones for IPv4, the prefix
    # length 128 (host byte order, as ipvsadm sends it) for IPv6.
    if af == socket.AF_INET:
        return "255.255.255.255"
    return socket.inet_ntoa(struct.pack("=I", 128))


def flags(vs: VirtualServer) -> int:
    bits = F_PERSISTENT if vs.persistence else 0
    for flag in vs.flags:
        if flag.split("-")[0] == vs.scheduler:
            bits |= FLAG_BITS[flag]
    return bits


def service_key_attrs(key: VSKey) -> list[tuple[str, Any]]:
    """The attributes naming one service (pyroute2's names: the reference codec uses them)."""
    return [
        ("IPVS_SVC_ATTR_AF", family(key.address)),
        ("IPVS_SVC_ATTR_PROTOCOL", PROTO_NUMBERS[key.protocol]),
        ("IPVS_SVC_ATTR_ADDR", key.address),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]


def service_attrs(vs: VirtualServer) -> list[tuple[str, Any]]:
    """Every service setting svcproxy sends."""
    return [
        *service_key_attrs(vs.key),
        ("IPVS_SVC_ATTR_SCHED_NAME", vs.scheduler),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": flags(vs), "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", vs.persistence),
        ("IPVS_SVC_ATTR_NETMASK", netmask(family(vs.address))),
    ]


def dest_attrs(rs: RealServer, full: bool) -> list[tuple[str, Any]]:
    """A real server's key, and with ``full`` every setting svcproxy sends."""
    attrs: list[tuple[str, Any]] = [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", family(rs.address)),
        ("IPVS_DEST_ATTR_ADDR", rs.address),
        ("IPVS_DEST_ATTR_PORT", rs.port),
    ]
    if full:
        attrs += [
            ("IPVS_DEST_ATTR_FWD_METHOD", FWD_VALUES[rs.forward]),
            ("IPVS_DEST_ATTR_WEIGHT", rs.weight),
            ("IPVS_DEST_ATTR_U_THRESH", 0),
            ("IPVS_DEST_ATTR_L_THRESH", 0),
        ]
    return attrs


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) for each netlink message in a datagram."""
    offset = 0
    while offset + HDR.size <= len(data):
        length, mtype, mflags, seq, _pid = HDR.unpack_from(data, offset)
        if length < HDR.size:
            break
        yield mtype, mflags, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _pack_value(name: str, value: Any) -> bytes:
    if name in ("AF", "PROTOCOL", "ADDR_FAMILY"):
        return struct.pack("=H", value)
    if name == "PORT":
        return struct.pack(">H", value)
    if name == "ADDR":
        return socket.inet_pton(family(value), value)
    if name == "SCHED_NAME":
        return str(value).encode() + b"\0"
    if name == "FLAGS":
        return struct.pack("=II", value["flags"], value["mask"])
    if name == "NETMASK":
        return socket.inet_aton(value)
    return struct.pack("=I", value)


def _nest(kind: int, attrs: list[tuple[str, Any]], numbers: dict[str, int], prefix: str) -> bytes:
    body = b"".join(
        _attr(numbers[n.removeprefix(prefix)], _pack_value(n.removeprefix(prefix), v))
        for n, v in attrs
    )
    return _attr(kind, body)


def service_key_nest(key: VSKey) -> bytes:
    """IPVS_CMD_ATTR_SERVICE naming ``key``: the body of a GET_SERVICE / GET_DEST request."""
    return _nest(CMD_ATTR_SERVICE, service_key_attrs(key), _SVC, "IPVS_SVC_ATTR_")


def request(family_id: int, cmd: int, header_flags: int, seq: int, body: bytes = b"") -> bytes:
    """One generic netlink request: netlink header, genl header (IPVS version), ``body``."""
    genl = struct.pack("=BBH", cmd, GENL_VERSION, 0)
    return HDR.pack(HDR.size + len(genl) + len(body), family_id, header_flags, seq, 0) + genl + body


def pack_op(op: Operation, family_id: int, seq: int) -> bytes:
    """The generic netlink request for one operation (header, genl header, attributes)."""
    cmd, extra = COMMANDS[op.kind]
    vs = op.virtual_server
    if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS):
        body = _nest(CMD_ATTR_SERVICE, service_attrs(vs), _SVC, "IPVS_SVC_ATTR_")
    else:
        body = service_key_nest(vs.key)
    if op.real_server is not None:
        full = op.kind is not OpKind.DELETE_RS
        body += _nest(CMD_ATTR_DEST, dest_attrs(op.real_server, full), _DEST, "IPVS_DEST_ATTR_")
    return request(family_id, cmd, NLM_F_REQUEST | NLM_F_ACK | extra, seq, body)
