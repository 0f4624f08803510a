"""The dummy interface holding IPVS VIPs, over rtnetlink: the real ``AddressKernel``.

Built by ``host.create`` (``kernel.py`` has the protocol and its fake). A kernel
adapter that imports pyroute2 (``IPRoute`` for links, ``ifaddrmsg`` to encode address
requests); the address dump is read by hand on a socket of its own, so the ipvs full
sync can read VIPs in a worker thread beside the writes.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, ifaddrmsg

from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.ipvs.nlpack import (
    HDR,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    family,
)
from svcproxy.dataplane.ipvs.nlsock import NETLINK_ROUTE, dump_replies, pipeline, raw_socket
from svcproxy.dataplane.table import normalize_address

RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22


class NetlinkAddresses:
    """The dummy interface holding VIPs, over rtnetlink (pyroute2 IPRoute)."""

    def __init__(self) -> None:
        self._ipr = IPRoute()
        self._sock: socket.socket | None = None
        self._seq = 0

    def _index(self, name: str) -> int | None:
        found = self._ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def ensure_interface(self, name: str) -> None:
        if self._index(name) is None:
            try:
                self._ipr.link("add", ifname=name, kind="dummy")
            except Exception as err:  # pyroute2 raises NetlinkError
                if getattr(err, "code", 0) != errno.EEXIST:
                    raise
        index = self._index(name)
        self._ipr.link("set", index=index, state="up")

    def delete_interface(self, name: str) -> None:
        index = self._index(name)
        if index is not None:
            self._ipr.link("del", index=index)

    def addresses(self, name: str) -> set[str]:
        """The interface's addresses, from an RTM_GETADDR dump on a socket of its own
        (safe beside the writes: the ipvs full sync reads in a worker thread), decoded
        by hand (ifaddrmsg: family, prefixlen, flags, scope, index; IFA_ADDRESS = 1)."""
        try:
            index = socket.if_nametoindex(name)
        except OSError:
            return set()
        out = set()
        with raw_socket(NETLINK_ROUTE) as sock:
            body = struct.pack("=BBBBI", socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.sendall(HDR.pack(HDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                         + body)
            for msg in dump_replies(sock, 1):
                af, _plen, _flags, _scope, ifindex = struct.unpack_from("=BBBBI", msg, HDR.size)
                if ifindex != index:
                    continue
                found = ipvsdump.attrs(msg, HDR.size + 8, len(msg))
                if 1 in found:
                    start = found[1][0]
                    size = 16 if af == socket.AF_INET6 else 4
                    out.add(normalize_address(socket.inet_ntop(af, msg[start : start + size])))
        return out

    def _change(self, cmd: str, name: str, addresses: Sequence[str]) -> list[str]:
        index = self._index(name)
        if index is None:
            return list(addresses)
        if self._sock is None:
            self._sock = raw_socket(NETLINK_ROUTE)
        messages = []
        for addr in addresses:
            self._seq += 1
            msg = ifaddrmsg()
            af = family(addr)
            msg["family"] = af
            msg["prefixlen"] = 128 if af == socket.AF_INET6 else 32
            msg["index"] = index
            msg["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
            if af == socket.AF_INET6:
                msg["attrs"] = [("IFA_ADDRESS", addr)]
                msg["flags"] = IFA_F_NODAD  # a VIP needs no duplicate detection
            msg["header"]["type"] = RTM_NEWADDR if cmd == "add" else RTM_DELADDR
            flags = NLM_F_REQUEST | NLM_F_ACK
            if cmd == "add":
                flags |= NLM_F_CREATE | NLM_F_REPLACE
            msg["header"]["flags"] = flags
            msg["header"]["sequence_number"] = self._seq
            msg.encode()
            messages.append((self._seq, bytes(msg.data)))
        codes = pipeline(self._sock, messages)
        ok = {0, errno.EEXIST} if cmd == "add" else {0, errno.EADDRNOTAVAIL}
        return [a for a, code in zip(addresses, codes, strict=True) if code not in ok]

    def add_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        return self._change("add", name, addresses)

    def delete_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        return self._change("del", name, addresses)
