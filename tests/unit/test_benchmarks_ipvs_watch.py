"""The IPVS reader of the benchmarks on UML nodes (benchmarks/_lab/ipvs_watch.py): its parsers.

``parse_proc`` is fed ``/proc/net/ip_vs`` as a UML guest (kernel 6.1) printed it for
``ipvsadm`` commands (persistence, a drained real server, UDP, fwmark, IPv6, a service
without real servers); the netlink decoders are fed replies built attribute by attribute
as the kernel's ``ip_vs_genl_fill_service`` / ``ip_vs_genl_fill_dest`` lay them out, and
the attribute numbers are checked against pyroute2's independent table of ``linux/ip_vs.h``.
"""

from __future__ import annotations

import socket
import struct

import pytest

from benchmarks._lab import ipvs_watch as w

# Captured in a UML guest after:
#   ipvsadm -A -t 10.96.16.1:80 -s rr -p 10800
#   ipvsadm -a -t 10.96.16.1:80 -r 10.244.16.1:8080 -m -w 1
#   ipvsadm -a -t 10.96.16.1:80 -r 10.244.16.2:8080 -m -w 0
#   ipvsadm -A -u 10.96.16.2:53 -s wrr; ipvsadm -a -u 10.96.16.2:53 -r 10.244.1.7:5353 -m -w 3
#   ipvsadm -A -f 7 -s rr; ipvsadm -a -f 7 -r 10.244.1.9:0 -m
#   ipvsadm -A -t [fd00::1]:80 -s rr; ipvsadm -a -t [fd00::1]:80 -r [fd00::2]:8080 -m
#   ipvsadm -A -t 10.96.16.3:443 -s sh -b sh-port
PROC = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  [fd00:0000:0000:0000:0000:0000:0000:0001]:0050 rr
  -> [fd00:0000:0000:0000:0000:0000:0000:0002]:1F90      Masq    1      0          0
TCP  0A601001:0050 rr  persistent 1080000 FFFFFFFF
  -> 0AF41002:1F90      Masq    0      0          0
  -> 0AF41001:1F90      Masq    1      0          0
UDP  0A601002:0035 wrr
  -> 0AF40107:14E9      Masq    3      0          0
TCP  0A601003:01BB sh
FWM  00000007 rr
  -> 0AF40109:0000      Masq    1      0          0
"""  # the kernel pads lines with blanks


def test_proc_keys_targets_drained_and_persistence() -> None:
    table = w.parse_proc(PROC)
    assert set(table) == {"10.96.16.1:80", "10.96.16.2:53", "10.96.16.3:443"}
    svc = table["10.96.16.1:80"]
    assert svc.present and svc.affinity
    assert svc.targets == ("10.244.16.1:8080",)
    assert svc.drained == ("10.244.16.2:8080",)  # weight 0: takes no new connections
    assert table["10.96.16.2:53"] == w.Answer(True, ("10.244.1.7:5353",), (), False)
    assert table["10.96.16.3:443"] == w.Answer(True)  # a service with no real servers yet


def test_proc_histogram_counts_real_servers_taking_connections() -> None:
    assert w.histogram(w.parse_proc(PROC)) == {"1": 2, "0": 1}
    assert w.histogram(w.parse_proc("")) == {}


def test_proc_fwmark_real_servers_do_not_join_the_previous_service() -> None:
    text = "TCP  0A601001:0050 rr \nFWM  00000007 rr \n  -> 0AF40109:0000      Masq    1      0          0\n"
    assert w.parse_proc(text)["10.96.16.1:80"].targets == ()


def _nest(kind: int, payload: bytes) -> bytes:
    # The kernel marks nests with NLA_F_NESTED (0x8000); the reader must strip it.
    return w.attr(kind | 0x8000, payload)


def _genl(cmd: int, body: bytes) -> bytes:
    return struct.pack("=BBH", cmd, w.IPVS_GENL_VERSION, 0) + body


def test_attribute_numbers_match_linux_ip_vs_h() -> None:
    nl = pytest.importorskip("pyroute2.netlink.generic.ipvs")
    svc = [name for name, _ in nl.ipvsmsg.service.nla_map]
    dest = [name for name, _ in nl.ipvsmsg.dest.nla_map]
    cmd = [name for name, _ in nl.ipvsmsg.nla_map]
    for name in ("AF", "PROTOCOL", "ADDR", "PORT", "FLAGS", "TIMEOUT"):
        assert svc.index(f"IPVS_SVC_ATTR_{name}") == getattr(w, f"IPVS_SVC_ATTR_{name}"), name
    for name in ("ADDR", "PORT", "WEIGHT"):
        assert dest.index(f"IPVS_DEST_ATTR_{name}") == getattr(w, f"IPVS_DEST_ATTR_{name}"), name
    assert cmd.index("IPVS_CMD_ATTR_SERVICE") == w.IPVS_CMD_ATTR_SERVICE
    assert cmd.index("IPVS_CMD_ATTR_DEST") == w.IPVS_CMD_ATTR_DEST
    assert nl.IPVS_CMD_GET_SERVICE == w.IPVS_CMD_GET_SERVICE
    assert nl.IPVS_CMD_GET_DEST == w.IPVS_CMD_GET_DEST


def test_decode_service_reads_persistence_and_timeout() -> None:
    nest = (w.attr(w.IPVS_SVC_ATTR_AF, struct.pack("=H", socket.AF_INET))
            + w.attr(6, b"rr\0")  # IPVS_SVC_ATTR_SCHED_NAME, odd length: padding follows
            + w.attr(w.IPVS_SVC_ATTR_FLAGS, struct.pack("=II", w.IP_VS_SVC_F_PERSISTENT, 0xFFFFFFFF))
            + w.attr(w.IPVS_SVC_ATTR_TIMEOUT, struct.pack("=I", 10800)))
    reply = _genl(1, _nest(w.IPVS_CMD_ATTR_SERVICE, nest))
    assert w.decode_service(reply) == (True, 10800)
    sh_port = w.attr(w.IPVS_SVC_ATTR_FLAGS, struct.pack("=II", 0x10, 0xFFFFFFFF))
    plain = _genl(1, _nest(w.IPVS_CMD_ATTR_SERVICE, sh_port))
    assert w.decode_service(plain) == (False, 0)


def test_decode_dest_reads_address_port_weight() -> None:
    nest = (w.attr(w.IPVS_DEST_ATTR_ADDR, socket.inet_aton("10.244.16.7") + b"\0" * 12)
            + w.attr(w.IPVS_DEST_ATTR_PORT, struct.pack("!H", 8080))
            + w.attr(3, struct.pack("=I", 0))  # forwarding method
            + w.attr(w.IPVS_DEST_ATTR_WEIGHT, struct.pack("=i", 0)))
    assert w.decode_dest(_genl(1, _nest(w.IPVS_CMD_ATTR_DEST, nest))) == ("10.244.16.7:8080", 0)


def test_service_request_names_the_virtual_server() -> None:
    svc = w.parse_attrs(w.parse_attrs(w.service_attr("10.96.16.9:443"))[w.IPVS_CMD_ATTR_SERVICE])
    assert socket.inet_ntoa(svc[w.IPVS_SVC_ATTR_ADDR]) == "10.96.16.9"
    assert struct.unpack("!H", svc[w.IPVS_SVC_ATTR_PORT]) == (443,)
    assert struct.unpack("=H", svc[w.IPVS_SVC_ATTR_PROTOCOL]) == (socket.IPPROTO_TCP,)


def test_messages_splits_a_multipart_buffer() -> None:
    def msg(mtype: int, seq: int, payload: bytes) -> bytes:
        size = 16 + len(payload)
        return struct.pack("=IHHII", size, mtype, 2, seq, 0) + payload + b"\0" * (-size % 4)

    data = msg(30, 7, b"abc") + msg(30, 7, b"defgh") + msg(w.NLMSG_DONE, 7, b"\0" * 4)
    assert [(t, s, p[:5]) for t, s, p in w.messages(data)] == [
        (30, 7, b"abc"), (30, 7, b"defgh"), (w.NLMSG_DONE, 7, b"\0" * 4)]
