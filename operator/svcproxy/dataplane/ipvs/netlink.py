"""IPVS and interface addresses over netlink: the real ``IpvsKernel`` / ``AddressKernel``.

One of the only modules that import pyroute2 (generic netlink family lookup,
dump decoding, address lookups); ``ipvs.proxier.create`` builds it. Writes are
pipelined: many IPVS requests go out in one ``sendmsg`` and their
acknowledgements are collected afterwards (one request at a time costs a
system-call round trip each, which dominates in a UML guest). Every service
request carries scheduler, flags, timeout and netmask (so an update also
clears what svcproxy never sets: one-packet scheduling, a wider persistence
netmask, a persistence engine), and every real server its forwarding method,
NAT (fwd_method 0) in every desired table: pyroute2's helper classes would
send class defaults instead (see notes/ipvs-test-kernel.md).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic import ipvs as nl
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_GETADDR, RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD, ifaddrmsg

from svcproxy.dataplane.diff import Operation, OpKind
from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.ipvs.kernel import Failure
from svcproxy.dataplane.table import (
    FORWARD_METHODS,
    IPVS_SCHEDULERS,
    Protocol,
    RealServer,
    VirtualServer,
    VSKey,
    normalize_address,
)

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
NLMSG_ERROR = 2
NLMSG_DONE = 3
_HDR = struct.Struct("=IHHII")

PROTO_NUMBERS: dict[Protocol, int] = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTO_NAMES: dict[int, Protocol] = {v: k for k, v in PROTO_NUMBERS.items()}
F_PERSISTENT = 0x1
FLAG_BITS = {"sh-fallback": 0x8, "sh-port": 0x10, "mh-fallback": 0x8, "mh-port": 0x10}
FWD_VALUES = {name: value for value, name in enumerate(FORWARD_METHODS)}  # masq -> 0
# Requests in flight before acknowledgements are read: bounded so acks never
# overflow the receive buffer (ENOBUFS would lose them).
WINDOW = 256


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _netmask(family: int) -> str:
    # The kernel reads IPVS_SVC_ATTR_NETMASK raw: all ones for IPv4, the prefix
    # length 128 (host byte order, as ipvsadm sends it) for IPv6.
    if family == socket.AF_INET:
        return "255.255.255.255"
    return socket.inet_ntoa(struct.pack("=I", 128))


def _flags(vs: VirtualServer) -> int:
    bits = F_PERSISTENT if vs.persistence else 0
    for flag in vs.flags:
        if flag.split("-")[0] == vs.scheduler:
            bits |= FLAG_BITS[flag]
    return bits


def _service_key(key: VSKey) -> list[tuple[str, Any]]:
    return [
        ("IPVS_SVC_ATTR_AF", _family(key.address)),
        ("IPVS_SVC_ATTR_PROTOCOL", PROTO_NUMBERS[key.protocol]),
        ("IPVS_SVC_ATTR_ADDR", key.address),
        ("IPVS_SVC_ATTR_PORT", key.port),
    ]


def _service_full(vs: VirtualServer) -> list[tuple[str, Any]]:
    return [
        *_service_key(vs.key),
        ("IPVS_SVC_ATTR_SCHED_NAME", vs.scheduler),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": _flags(vs), "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", vs.persistence),
        ("IPVS_SVC_ATTR_NETMASK", _netmask(_family(vs.address))),
    ]


def _dest(rs: RealServer, full: bool) -> list[tuple[str, Any]]:
    attrs: list[tuple[str, Any]] = [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", _family(rs.address)),
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


_COMMANDS = {
    OpKind.ADD_VS: (nl.IPVS_CMD_NEW_SERVICE, NLM_F_CREATE | NLM_F_EXCL),
    OpKind.UPDATE_VS: (nl.IPVS_CMD_SET_SERVICE, 0),
    OpKind.DELETE_VS: (nl.IPVS_CMD_DEL_SERVICE, 0),
    OpKind.ADD_RS: (nl.IPVS_CMD_NEW_DEST, NLM_F_CREATE | NLM_F_EXCL),
    OpKind.UPDATE_RS: (nl.IPVS_CMD_SET_DEST, 0),
    OpKind.DELETE_RS: (nl.IPVS_CMD_DEL_DEST, 0),
}


def _messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) for each netlink message in a datagram."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, mtype, mflags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            break
        yield mtype, mflags, seq, data[offset : offset + length]
        offset += (length + 3) & ~3


def raw_socket(protocol: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:  # root may exceed rmem_max: room for a whole window of acks
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    return sock


def pipeline(sock: socket.socket, messages: Sequence[tuple[int, bytes]]) -> list[int]:
    """Send requests (seq, bytes) in windows, many per sendmsg; errno per request (0 = ok).

    Requests are processed by the kernel in order; a failed one does not stop
    the rest (netlink acks each with its own status).
    """
    codes = [0] * len(messages)
    for start in range(0, len(messages), WINDOW):
        window = messages[start : start + WINDOW]
        pending = {seq: start + i for i, (seq, _) in enumerate(window)}
        batch = bytearray()
        for _seq, data in window:
            batch += data
            if len(batch) > 48 * 1024:
                sock.sendall(bytes(batch))
                batch.clear()
        if batch:
            sock.sendall(bytes(batch))
        while pending:
            for mtype, _f, seq, msg in _messages(sock.recv(1 << 20)):
                if mtype != NLMSG_ERROR or seq not in pending:
                    continue
                (code,) = struct.unpack_from("=i", msg, _HDR.size)
                codes[pending.pop(seq)] = -code
    return codes


# Attribute numbers of include/uapi/linux/ip_vs.h.
_SVC = {"AF": 1, "PROTOCOL": 2, "ADDR": 3, "PORT": 4, "SCHED_NAME": 6, "FLAGS": 7,
        "TIMEOUT": 8, "NETMASK": 9}
_DEST = {"ADDR": 1, "PORT": 2, "FWD_METHOD": 3, "WEIGHT": 4, "U_THRESH": 5, "L_THRESH": 6,
         "ADDR_FAMILY": 11}


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _pack_value(name: str, value: Any) -> bytes:
    if name in ("AF", "PROTOCOL", "ADDR_FAMILY"):
        return struct.pack("=H", value)
    if name == "PORT":
        return struct.pack(">H", value)
    if name == "ADDR":
        return socket.inet_pton(_family(value), value)
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


def pack_op(op: Operation, family_id: int, seq: int) -> bytes:
    """The generic netlink request for one operation (header, genl header, attributes)."""
    cmd, flags = _COMMANDS[op.kind]
    vs = op.virtual_server
    if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS):
        body = _nest(1, _service_full(vs), _SVC, "IPVS_SVC_ATTR_")
    else:
        body = _nest(1, _service_key(vs.key), _SVC, "IPVS_SVC_ATTR_")
    if op.real_server is not None:
        full = op.kind is not OpKind.DELETE_RS
        body += _nest(2, _dest(op.real_server, full), _DEST, "IPVS_DEST_ATTR_")
    genl = struct.pack("=BBH", cmd, nl.GENL_VERSION, 0)
    length = _HDR.size + len(genl) + len(body)
    header = _HDR.pack(length, family_id, NLM_F_REQUEST | NLM_F_ACK | flags, seq, 0)
    return header + genl + body


class NetlinkIpvs:
    """IPVS over generic netlink, with pipelined writes."""

    def __init__(self) -> None:
        self._family_id: int | None = None
        self.use_proc = True  # real servers from /proc/net/ip_vs in dump() (see there)
        self._reason = ""
        self._schedulers: frozenset[str] | None = None
        self._seq = 0
        self._sock: socket.socket | None = None
        try:
            self._family_id = self._resolve()
        except Exception:
            subprocess.run(["modprobe", "ip_vs"], capture_output=True, check=False)
            try:
                self._family_id = self._resolve()
            except Exception as err:
                self._reason = (
                    f"the IPVS generic netlink family is missing ({err}): the kernel lacks"
                    " CONFIG_IP_VS or `modprobe ip_vs` failed; ipvs Services fall back to iptables"
                )

    @staticmethod
    def _resolve() -> int:
        gen = GenericNetlinkSocket()
        try:
            gen.bind(nl.GENL_NAME, nl.ipvsmsg)
            return int(gen.prid)
        finally:
            gen.close()

    def available(self) -> str:
        return self._reason

    def schedulers(self) -> frozenset[str]:
        if self._schedulers is None:
            found = set()
            for name in sorted(IPVS_SCHEDULERS):
                if os.path.isdir(f"/sys/module/ip_vs_{name}") or subprocess.run(
                    ["modprobe", f"ip_vs_{name}"], capture_output=True, check=False
                ).returncode == 0:
                    found.add(name)
            self._schedulers = frozenset(found)
        return self._schedulers

    # Socket and message plumbing.

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = raw_socket(NETLINK_GENERIC)
        return self._sock

    def _encode(self, cmd: int, flags: int, attrs: list[tuple[str, Any]]) -> tuple[int, bytes]:
        assert self._family_id is not None
        self._seq += 1
        msg = nl.ipvsmsg()
        msg["cmd"] = cmd
        msg["version"] = nl.GENL_VERSION
        msg["attrs"] = attrs
        msg["header"]["type"] = self._family_id
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = self._seq
        msg.encode()
        return self._seq, bytes(msg.data)

    def _op_message(self, op: Operation) -> tuple[int, bytes]:
        """One request, packed by hand (pyroute2's encoder costs ~0.3 ms a message in UML)."""
        assert self._family_id is not None
        self._seq += 1
        return self._seq, pack_op(op, self._family_id, self._seq)

    def _op_message_pyroute2(self, op: Operation) -> tuple[int, bytes]:
        """The same request encoded by pyroute2: the reference pack_op is tested against."""
        cmd, flags = _COMMANDS[op.kind]
        vs = op.virtual_server
        if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS):
            attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_full(vs)})]
        elif op.kind is OpKind.DELETE_VS:
            attrs = [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key(vs.key)})]
        else:
            assert op.real_server is not None
            attrs = [
                ("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key(vs.key)}),
                (
                    "IPVS_CMD_ATTR_DEST",
                    {"attrs": _dest(op.real_server, op.kind is not OpKind.DELETE_RS)},
                ),
            ]
        return self._encode(cmd, flags | NLM_F_ACK, attrs)

    def execute(self, ops: Sequence[Operation]) -> list[Failure]:
        messages = [self._op_message(op) for op in ops]
        codes = pipeline(self._socket(), messages)
        return [
            Failure(ops[i], code, os.strerror(code)) for i, code in enumerate(codes) if code
        ]

    def _dump_pyroute2(self, cmd: int, attrs: list[tuple[str, Any]]) -> list[nl.ipvsmsg]:
        sock = self._socket()
        seq, data = self._encode(cmd, NLM_F_DUMP, attrs)
        sock.sendall(data)
        out: list[nl.ipvsmsg] = []
        for msg in _dump_replies(sock, seq):
            parsed = nl.ipvsmsg(msg)
            parsed.decode()
            out.append(parsed)
        return out

    def dump(self) -> dict[VSKey, VirtualServer]:
        """Every IPVS service with its real servers (owner '').

        On a socket of its own, opened for this dump: the proxier's full sync reads the
        kernel in a worker thread while partial syncs write on the main socket
        (``IpvsProxier.sync_full``). Decoded by hand (``dump.py``): pyroute2's decoder
        spent ~2.3 s of a 2.5 s read of 1k services x 10 in a UML guest. The services
        come from one netlink dump; their real servers from ``/proc/net/ip_vs`` (a few
        reads for the whole table instead of one netlink dump per service), over
        netlink for any service the file does not list (added meanwhile, or no file).
        """
        assert self._family_id is not None
        family_id = self._family_id
        table: dict[VSKey, VirtualServer] = {}
        names: dict[bytes, str] = {}
        with raw_socket(NETLINK_GENERIC) as sock:
            replies = _dump_replies(sock, _send_dump(sock, family_id, nl.IPVS_CMD_GET_SERVICE, b"", 1))
            services = [s for msg in replies if (s := ipvsdump.service(msg)) is not None]
            from_proc = _proc_real_servers() if self.use_proc else {}
            for seq, svc in enumerate(services, start=2):
                if svc.key in from_proc:
                    table[svc.key] = ipvsdump.virtual_server(svc, from_proc[svc.key])
                    continue
                body = _nest(1, _service_key(svc.key), _SVC, "IPVS_SVC_ATTR_")
                replies = _dump_replies(sock, _send_dump(sock, family_id, nl.IPVS_CMD_GET_DEST, body, seq))
                reals = [d[0] for msg in replies if (d := ipvsdump.dest(msg, svc.family, names)) is not None]
                table[svc.key] = ipvsdump.virtual_server(svc, reals)
        return table

    def read(self, keys: Collection[VSKey]) -> dict[VSKey, VirtualServer]:
        """Just these services, as the kernel holds them now (absent ones left out): one
        GET_SERVICE and one GET_DEST dump each. The full sync re-reads the services it is
        about to change under the write lock, since its big dump ran beside writers."""
        assert self._family_id is not None
        table: dict[VSKey, VirtualServer] = {}
        names: dict[bytes, str] = {}
        with raw_socket(NETLINK_GENERIC) as sock:
            for seq, key in enumerate(sorted(keys, key=str), start=1):
                body = _nest(1, _service_key(key), _SVC, "IPVS_SVC_ATTR_")
                genl = struct.pack("=BBH", nl.IPVS_CMD_GET_SERVICE, nl.GENL_VERSION, 0)
                sock.sendall(_HDR.pack(_HDR.size + len(genl) + len(body), self._family_id,
                                       NLM_F_REQUEST, 2 * seq, 0) + genl + body)
                svc = None
                while svc is None:
                    found = [m for t, _f, q, m in _messages(sock.recv(1 << 20)) if q == 2 * seq]
                    if not found:
                        continue
                    mtype = struct.unpack_from("=H", found[0], 4)[0]
                    if mtype == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", found[0], _HDR.size)
                        if -code in (errno.ESRCH, errno.ENOENT):
                            break
                        raise OSError(-code, f"IPVS get service {key} failed: {os.strerror(-code)}")
                    svc = ipvsdump.service(found[0])
                    if svc is None:
                        break
                if svc is None:
                    continue
                replies = _dump_replies(sock, _send_dump(sock, self._family_id, nl.IPVS_CMD_GET_DEST,
                                                         body, 2 * seq + 1))
                reals = [d[0] for msg in replies if (d := ipvsdump.dest(msg, svc.family, names)) is not None]
                table[svc.key] = ipvsdump.virtual_server(svc, reals)
        return table

    def dump_pyroute2(self) -> dict[VSKey, VirtualServer]:
        """The same table decoded by pyroute2: the reference ``dump`` is tested against."""
        table: dict[VSKey, VirtualServer] = {}
        for msg in self._dump_pyroute2(nl.IPVS_CMD_GET_SERVICE, []):
            svc = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
            proto = PROTO_NAMES.get(svc.get_attr("IPVS_SVC_ATTR_PROTOCOL") or 0)
            addr = svc.get_attr("IPVS_SVC_ATTR_ADDR")
            if proto is None or not addr:  # fwmark services are not ours
                continue
            key = VSKey(proto, normalize_address(addr), svc.get_attr("IPVS_SVC_ATTR_PORT"))
            sched = svc.get_attr("IPVS_SVC_ATTR_SCHED_NAME")
            bits = svc.get_attr("IPVS_SVC_ATTR_FLAGS")["flags"]
            timeout = svc.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0
            flags = frozenset(
                f for f, b in FLAG_BITS.items() if f.startswith(sched + "-") and bits & b
            )
            netmask = svc.get_attr("IPVS_SVC_ATTR_NETMASK")  # pyroute2 shows the raw u32 as IPv4
            other = ipvsdump.other_settings(
                _family(key.address), bits, flags,
                None if netmask is None else struct.unpack("=I", socket.inet_aton(netmask))[0],
                svc.get_attr("IPVS_SVC_ATTR_PE_NAME"),
            )
            reals = []
            for dmsg in self._dump_pyroute2(
                nl.IPVS_CMD_GET_DEST,
                [("IPVS_CMD_ATTR_SERVICE", {"attrs": _service_key(key)})],
            ):
                dest = dmsg.get_attr("IPVS_CMD_ATTR_DEST")
                reals.append(
                    RealServer(
                        dest.get_attr("IPVS_DEST_ATTR_ADDR"),
                        dest.get_attr("IPVS_DEST_ATTR_PORT"),
                        dest.get_attr("IPVS_DEST_ATTR_WEIGHT"),
                        FORWARD_METHODS[dest.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & 7],
                    )
                )
            table[key] = VirtualServer(
                protocol=key.protocol,
                address=key.address,
                port=key.port,
                scheduler=sched,
                flags=flags,
                persistence=timeout if bits & F_PERSISTENT else 0,
                real_servers=tuple(reals),
                other=other,
            )
        return table


def _proc_real_servers() -> dict[VSKey, list[RealServer]]:
    """The real servers of /proc/net/ip_vs of this thread's network namespace (the
    worker thread's: /proc/net follows the process's main thread); {} without it."""
    try:
        with open("/proc/thread-self/net/ip_vs", "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(1 << 20):
                chunks.append(chunk)
    except OSError:
        return {}
    return ipvsdump.proc_real_servers(b"".join(chunks).decode())


def _send_dump(sock: socket.socket, family_id: int, cmd: int, body: bytes, seq: int) -> int:
    genl = struct.pack("=BBH", cmd, nl.GENL_VERSION, 0)
    sock.sendall(_HDR.pack(_HDR.size + len(genl) + len(body), family_id,
                           NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + genl + body)
    return seq


def _dump_replies(sock: socket.socket, seq: int) -> Iterator[bytes]:
    """The reply messages of one dump request ``seq`` (whole messages, header included)."""
    while True:
        for mtype, _f, mseq, msg in _messages(sock.recv(1 << 20)):
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", msg, _HDR.size)
                if code:
                    raise OSError(-code, f"netlink dump failed: {os.strerror(-code)}")
                return
            yield msg


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
            sock.sendall(_HDR.pack(_HDR.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                         + body)
            for msg in _dump_replies(sock, 1):
                family, _plen, _flags, _scope, ifindex = struct.unpack_from("=BBBBI", msg, _HDR.size)
                if ifindex != index:
                    continue
                found = ipvsdump.attrs(msg, _HDR.size + 8, len(msg))
                if 1 in found:
                    start = found[1][0]
                    size = 16 if family == socket.AF_INET6 else 4
                    out.add(normalize_address(socket.inet_ntop(family, msg[start : start + size])))
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
            family = _family(addr)
            msg["family"] = family
            msg["prefixlen"] = 128 if family == socket.AF_INET6 else 32
            msg["index"] = index
            msg["attrs"] = [("IFA_LOCAL", addr), ("IFA_ADDRESS", addr)]
            if family == socket.AF_INET6:
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
