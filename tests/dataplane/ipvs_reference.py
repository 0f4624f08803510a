"""pyroute2's own IPVS codec, the reference the hand-packed netlink is checked against.

The adapters pack requests (``svcproxy.dataplane.ipvs.nlpack``) and decode dumps
(``svcproxy.dataplane.ipvs.dump``) by hand, for speed; this encodes the same requests
and decodes the same table with pyroute2's message classes.
tests/unit/test_dataplane_netlink.py compares requests byte for byte; the UML guest
(ipvs_guest.py) compares ``NetlinkIpvs.dump()`` with :func:`dump` on a real kernel.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.generic import ipvs as nl

from svcproxy.dataplane.diff import Operation, OpKind
from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.ipvs.netlink import NetlinkIpvs
from svcproxy.dataplane.ipvs.nlpack import (
    COMMANDS,
    F_PERSISTENT,
    FLAG_BITS,
    PROTO_NAMES,
    dest_attrs,
    family,
    service_attrs,
    service_key_attrs,
)
from svcproxy.dataplane.ipvs.nlsock import NETLINK_GENERIC, dump_replies, raw_socket
from svcproxy.dataplane.table import FORWARD_METHODS, RealServer, VirtualServer, VSKey, normalize_address


def encode(family_id: int, cmd: int, flags: int, seq: int, attrs: list[tuple[str, Any]]) -> bytes:
    msg = nl.ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = nl.GENL_VERSION
    msg["attrs"] = attrs
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = NLM_F_REQUEST | flags
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def encode_op(op: Operation, family_id: int, seq: int) -> bytes:
    """The request for one operation, encoded by pyroute2."""
    cmd, flags = COMMANDS[op.kind]
    vs = op.virtual_server
    if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS):
        attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": service_attrs(vs)})]
    elif op.kind is OpKind.DELETE_VS:
        attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": service_key_attrs(vs.key)})]
    else:
        assert op.real_server is not None
        attrs = [
            ("IPVS_CMD_ATTR_SERVICE", {"attrs": service_key_attrs(vs.key)}),
            ("IPVS_CMD_ATTR_DEST", {"attrs": dest_attrs(op.real_server, op.kind is not OpKind.DELETE_RS)}),
        ]
    return encode(family_id, cmd, flags | NLM_F_ACK, seq, attrs)


def _dump(sock: socket.socket, family_id: int, seq: int, cmd: int,
          attrs: list[tuple[str, Any]]) -> list[nl.ipvsmsg]:
    sock.sendall(encode(family_id, cmd, NLM_F_DUMP, seq, attrs))
    out = []
    for data in dump_replies(sock, seq):
        parsed = nl.ipvsmsg(data)
        parsed.decode()
        out.append(parsed)
    return out


def dump(kernel: NetlinkIpvs) -> dict[VSKey, VirtualServer]:
    """The kernel's IPVS table decoded by pyroute2 (real servers over netlink)."""
    assert kernel.family_id is not None
    table: dict[VSKey, VirtualServer] = {}
    with raw_socket(NETLINK_GENERIC) as sock:
        seq = 1
        for msg in _dump(sock, kernel.family_id, seq, nl.IPVS_CMD_GET_SERVICE, []):
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            proto = PROTO_NAMES.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0)
            addr = svc.get_attr("IPVS_SVC_ATTR_ADDR")
            if proto is None or not addr:  # fwmark services are not ours
                continue
            key = VSKey(proto, normalize_address(addr), svc.get_attr("IPVS_SVC_ATTR_PORT"))
            sched = svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME")
            bits = svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"]
            timeout = svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0
            flags = frozenset(f for f, b in FLAG_BITS.items() if f.startswith(sched + "-") and bits & b)
            netmask = svc.get_attr("IPVS_SVC_ATTR_NETMASK")  # pyroute2 shows the raw u32 as IPv4
            other = ipvsdump.other_settings(
                family(key.address), bits, flags,
                None if netmask is None else struct.unpack("=I", socket.inet_aton(netmask))[0],
                svc.get_attr("IPVS_SVC_ATTR_PE_NAME"),
            )
            reals = []
            seq += 1
            for dmsg in _dump(sock, kernel.family_id, seq, nl.IPVS_CMD_GET_DEST,
                              [("IPVS_CMD_ATTR_SERVICE", {"attrs": service_key_attrs(key)})]):
                dest = dmsg.get_attr("IPVS_CMD_ATTR_DEST")
                reals.append(RealServer(
                    dest.get_attr("IPVS_DEST_ATTR_ADDR"),
                    dest.get_attr("IPVS_DEST_ATTR_PORT"),
                    dest.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                    FORWARD_METHODS[dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & 7],
                ))
            table[key] = VirtualServer(
                protocol=key.protocol, address=key.address, port=key.port, scheduler=sched,
                flags=flags, persistence=timeout if bits & F_PERSISTENT else 0,
                real_servers=tuple(reals), other=other,
            )
    return table
