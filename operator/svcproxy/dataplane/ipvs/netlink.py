"""IPVS over generic netlink: the real ``IpvsKernel`` (``kernel.py`` has the protocol).

Built by ``host.create``. A kernel adapter, and with ``addresses.py`` and ``host.py``
the only modules that import pyroute2 (here only for the generic netlink family
lookup). Writes are one hand-packed request per diff operation (``nlpack``),
pipelined (``nlsock``); reads decode replies by hand (``dump``). ``dump`` reads the
services over netlink and their real servers from ``/proc/net/ip_vs`` (``probe``);
``read`` re-reads a few services over netlink alone.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Collection, Sequence

from pyroute2.netlink.generic import GenericNetlinkSocket
from pyroute2.netlink.generic import ipvs as nl

from svcproxy.dataplane.diff import Operation
from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.ipvs import probe
from svcproxy.dataplane.ipvs.kernel import Failure
from svcproxy.dataplane.ipvs.nlpack import (
    HDR,
    IPVS_CMD_GET_DEST,
    IPVS_CMD_GET_SERVICE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    messages,
    pack_op,
    request,
    service_key_nest,
)
from svcproxy.dataplane.ipvs.nlsock import NETLINK_GENERIC, dump_replies, pipeline, raw_socket
from svcproxy.dataplane.table import IPVS_SCHEDULERS, RealServer, VirtualServer, VSKey


class NetlinkIpvs:
    """IPVS over generic netlink, with pipelined writes."""

    def __init__(self) -> None:
        self.family_id: int | None = None
        self.use_proc = True  # real servers from /proc/net/ip_vs in dump() (see there)
        self._reason = ""
        self._schedulers: frozenset[str] | None = None
        self._seq = 0
        self._sock: socket.socket | None = None
        try:
            self.family_id = self._resolve()
        except Exception:
            probe.load_ip_vs()
            try:
                self.family_id = self._resolve()
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
            self._schedulers = probe.loadable_schedulers(IPVS_SCHEDULERS)
        return self._schedulers

    def execute(self, ops: Sequence[Operation]) -> list[Failure]:
        assert self.family_id is not None
        if self._sock is None:
            self._sock = raw_socket(NETLINK_GENERIC)
        requests = []
        for op in ops:
            self._seq += 1
            requests.append((self._seq, pack_op(op, self.family_id, self._seq)))
        codes = pipeline(self._sock, requests)
        return [
            Failure(ops[i], code, os.strerror(code)) for i, code in enumerate(codes) if code
        ]

    def dump(self) -> dict[VSKey, VirtualServer]:
        """Every IPVS service with its real servers (owner '').

        On a socket of its own, opened for this dump: the proxier's full sync reads the
        kernel in a worker thread while partial syncs write on the main socket
        (``IpvsProxier.sync_full``). Decoded by hand (:mod:`svcproxy.dataplane.ipvs.dump`):
        pyroute2's generic decoder is most of a read's cost. The services come from
        one netlink dump; their real servers from ``/proc/net/ip_vs`` (a few reads for
        the whole table instead of one netlink dump per service), over netlink for any
        service the file does not list (added meanwhile, or no file).
        """
        assert self.family_id is not None
        family_id = self.family_id
        table: dict[VSKey, VirtualServer] = {}
        names: dict[bytes, str] = {}  # address spellings, shared over the dump
        with raw_socket(NETLINK_GENERIC) as sock:
            sock.sendall(request(family_id, IPVS_CMD_GET_SERVICE, NLM_F_REQUEST | NLM_F_DUMP, 1))
            services = [s for msg in dump_replies(sock, 1) if (s := ipvsdump.service(msg)) is not None]
            from_proc = probe.proc_real_servers() if self.use_proc else {}
            for seq, svc in enumerate(services, start=2):
                if svc.key in from_proc:
                    table[svc.key] = ipvsdump.virtual_server(svc, from_proc[svc.key])
                else:
                    table[svc.key] = ipvsdump.virtual_server(svc, _dests(sock, family_id, svc, seq, names))
        return table

    def read(self, keys: Collection[VSKey]) -> dict[VSKey, VirtualServer]:
        """Just these services, as the kernel holds them now (absent ones left out): one
        GET_SERVICE and one GET_DEST dump each. The full sync re-reads the services it is
        about to change under the write lock, since its big dump ran beside writers."""
        assert self.family_id is not None
        table: dict[VSKey, VirtualServer] = {}
        names: dict[bytes, str] = {}
        with raw_socket(NETLINK_GENERIC) as sock:
            for seq, key in enumerate(sorted(keys, key=str), start=1):
                sock.sendall(request(self.family_id, IPVS_CMD_GET_SERVICE, NLM_F_REQUEST, 2 * seq,
                                     service_key_nest(key)))
                svc = None
                while svc is None:
                    found = [m for _t, _f, q, m in messages(sock.recv(1 << 20)) if q == 2 * seq]
                    if not found:
                        continue
                    mtype = struct.unpack_from("=H", found[0], 4)[0]
                    if mtype == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", found[0], HDR.size)
                        if -code in (errno.ESRCH, errno.ENOENT):
                            break
                        raise OSError(-code, f"IPVS get service {key} failed: {os.strerror(-code)}")
                    svc = ipvsdump.service(found[0])
                    if svc is None:
                        break
                if svc is not None:
                    table[svc.key] = ipvsdump.virtual_server(
                        svc, _dests(sock, self.family_id, svc, 2 * seq + 1, names))
        return table


def _dests(sock: socket.socket, family_id: int, svc: ipvsdump.Service, seq: int,
           names: dict[bytes, str]) -> list[RealServer]:
    """One service's real servers, in kernel order, from one GET_DEST dump."""
    sock.sendall(request(family_id, IPVS_CMD_GET_DEST, NLM_F_REQUEST | NLM_F_DUMP, seq,
                         service_key_nest(svc.key)))
    replies = dump_replies(sock, seq)
    return [d[0] for msg in replies if (d := ipvsdump.dest(msg, svc.family, names)) is not None]
