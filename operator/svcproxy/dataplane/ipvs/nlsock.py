"""Raw netlink sockets: pipelined requests and dump replies, for the ipvs kernel adapters.

``netlink.NetlinkIpvs`` (generic netlink, IPVS) and ``addresses.NetlinkAddresses``
(rtnetlink, VIPs) send through these. Writes are pipelined: many requests go out in
one ``sendmsg`` and their acknowledgements are collected afterwards (one request at a
time costs a system-call round trip each, which dominates in a UML guest). Plain
``socket``: no pyroute2.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator, Sequence

from svcproxy.dataplane.ipvs.nlpack import HDR, NLMSG_DONE, NLMSG_ERROR, messages

NETLINK_ROUTE = 0
NETLINK_GENERIC = 16
# Requests in flight before acknowledgements are read: bounded so acks never
# overflow the receive buffer (ENOBUFS would lose them).
WINDOW = 256


def raw_socket(protocol: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
    try:  # root may exceed rmem_max: room for a whole window of acks
        sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((0, 0))
    return sock


def pipeline(sock: socket.socket, requests: Sequence[tuple[int, bytes]]) -> list[int]:
    """Send requests (seq, bytes) in windows, many per sendmsg; errno per request (0 = ok).

    Requests are processed by the kernel in order; a failed one does not stop
    the rest (netlink acks each with its own status).
    """
    codes = [0] * len(requests)
    for start in range(0, len(requests), WINDOW):
        window = requests[start : start + WINDOW]
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
            for mtype, _f, seq, msg in messages(sock.recv(1 << 20)):
                if mtype != NLMSG_ERROR or seq not in pending:
                    continue
                (code,) = struct.unpack_from("=i", msg, HDR.size)
                codes[pending.pop(seq)] = -code
    return codes


def dump_replies(sock: socket.socket, seq: int) -> Iterator[bytes]:
    """The reply messages of one dump request ``seq`` (whole messages, header included)."""
    while True:
        for mtype, _f, mseq, msg in messages(sock.recv(1 << 20)):
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", msg, HDR.size)
                if code:
                    raise OSError(-code, f"netlink dump failed: {os.strerror(-code)}")
                return
            yield msg
