"""The ipvs proxier's sync_full against the in-memory kernel: partial syncs made while
the full sync reads the kernel (before or after the read itself) survive its write,
drift elsewhere is repaired (also a forwarding method or a setting svcproxy never
makes), and the mirror matches the kernel afterwards. The dump decoder against
pyroute2's on messages pyroute2 encodes, and the /proc/net/ip_vs reader."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from dataclasses import replace
from typing import Any

import pytest

from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.ipvs.kernel import FakeAddresses, FakeIpvs
from svcproxy.dataplane.ipvs.proxier import IpvsProxier
from svcproxy.dataplane.table import RealServer, VirtualServer, VSKey, make_table, owned_by

IFACE = "svcproxy0"


def svc(n: int, port: int = 8080, owner: str = "") -> VirtualServer:
    return VirtualServer.create("TCP", f"10.96.0.{n}", 80, [RealServer(f"10.244.1.{n}", port)],
                                scheduler="rr", owner=owner or f"ns/s{n}")


class GatedIpvs(FakeIpvs):
    """A fake whose dump waits for the test (``gate``) after (or before) copying the table."""

    def __init__(self) -> None:
        super().__init__(schedulers=frozenset({"rr", "sh"}))
        self.gate = threading.Event()
        self.copy_first = True
        self.reading = threading.Event()

    def dump(self) -> dict[VSKey, VirtualServer]:
        if threading.current_thread() is threading.main_thread():
            return super().dump()
        self.reading.set()
        if self.copy_first:
            table = super().dump()
            self.gate.wait(5)
            return table
        self.gate.wait(5)
        return super().dump()


@pytest.mark.parametrize("copy_first", [True, False], ids=["partial-after-read", "partial-before-read"])
def test_partial_syncs_during_the_read_survive_the_full_sync(copy_first: bool) -> None:
    kernel, addrs = GatedIpvs(), FakeAddresses()
    proxier = IpvsProxier(kernel, addrs, interface=IFACE)
    desired = make_table([svc(1), svc(2), svc(3)])
    assert proxier.sync_blocking(desired).ok
    del kernel.table[svc(3).key]  # drift the full sync must repair
    kernel.copy_first = copy_first
    changed, added = svc(1, port=9000), svc(4)
    after = make_table([changed, svc(3), added])  # 2 deleted, 1 changed, 4 added

    async def run() -> Any:
        async def between(until: asyncio.Future[Any]) -> frozenset[str]:
            await asyncio.to_thread(kernel.reading.wait, 5)
            owners = frozenset({"ns/s1", "ns/s2", "ns/s4"})
            result = await proxier.sync(owned_by(after, owners), owners)
            assert result.ok, result.errors
            kernel.gate.set()
            await until
            return owners

        return await proxier.sync_full(desired, between)  # desired as the full sync began

    result = asyncio.run(run())
    assert result.ok, result.errors
    assert kernel.table[svc(1).key].real_servers == (RealServer("10.244.1.1", 9000),)  # not reverted
    assert svc(2).key not in kernel.table  # not brought back
    assert svc(4).key in kernel.table and svc(3).key in kernel.table  # kept; repaired
    assert addrs.addresses(IFACE) == {"10.96.0.1", "10.96.0.3", "10.96.0.4"}
    # The mirror agrees with the kernel: the next plain full sync has nothing to do.
    assert proxier.sync_blocking(after).total_operations == 0
    assert proxier.counts().virtual_servers == 3


def test_the_first_full_sync_is_a_plain_one() -> None:
    proxier = IpvsProxier(FakeIpvs(), FakeAddresses(), interface=IFACE)
    calls: list[object] = []

    async def between(until: asyncio.Future[Any]) -> frozenset[str]:
        calls.append(until)
        return frozenset()

    result = asyncio.run(proxier.sync_full(make_table([svc(1)]), between))
    assert result.ok and calls == []


def _encoded(cmd: int, attrs: list[tuple[str, Any]]) -> bytes:
    from pyroute2.netlink.generic import ipvs as nl

    msg = nl.ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["attrs"] = attrs
    msg["header"]["type"] = 30
    msg.encode()
    return bytes(msg.data)


def _pyroute2(data: bytes) -> Any:
    from pyroute2.netlink.generic import ipvs as nl

    msg = nl.ipvsmsg(data)
    msg.decode()
    return msg


V6_HOST = "128.0.0.0"  # the prefix length 128 in host byte order, as pyroute2 shows a u32
V6_64 = socket.inet_ntoa(struct.pack("=I", 64))


@pytest.mark.parametrize(("af", "addr", "sched", "bits", "timeout", "netmask", "pe", "other"), [
    (socket.AF_INET, "10.96.0.10", "sh", 0x1 | 0x2 | 0x10, 10800, "255.255.255.255", None, set()),
    # a timeout without the persistent bit
    (socket.AF_INET, "10.96.0.11", "rr", 0x2, 300, "255.255.255.255", None, set()),
    (socket.AF_INET6, "fd00::a", "mh", 0x8, 0, V6_HOST, None, set()),
    # what svcproxy never sets: one-packet scheduling, a wider netmask, an engine, stray bits
    (socket.AF_INET, "10.96.0.12", "rr", 0x1 | 0x2 | 0x4, 60, "255.255.255.0", "sip",
     {"ops", "netmask 255.255.255.0", "pe sip"}),
    (socket.AF_INET, "10.96.0.13", "rr", 0x2 | 0x10 | 0x20, 0, "255.255.255.255", None, {"flags 0x30"}),
    (socket.AF_INET6, "fd00::b", "sh", 0x1 | 0x8, 60, V6_64, None, {"netmask /64"}),
])
def test_service_decoder_reads_what_pyroute2_reads(*, af: int, addr: str, sched: str, bits: int,
                                                   timeout: int, netmask: str, pe: str | None,
                                                   other: set[str]) -> None:
    pytest.importorskip("pyroute2")
    raw = _encoded(1, [("IPVS_CMD_ATTR_SERVICE", {"attrs": [
        ("IPVS_SVC_ATTR_AF", af), ("IPVS_SVC_ATTR_PROTOCOL", socket.IPPROTO_UDP),
        ("IPVS_SVC_ATTR_ADDR", addr), ("IPVS_SVC_ATTR_PORT", 53),
        ("IPVS_SVC_ATTR_SCHED_NAME", sched),
        # the kernel's order: an engine's name before the flags
        *([("IPVS_SVC_ATTR_PE_NAME", pe)] if pe else []),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": bits, "mask": 0xFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", timeout), ("IPVS_SVC_ATTR_NETMASK", netmask),
    ]})])
    ref = _pyroute2(raw).get_attr("IPVS_CMD_ATTR_SERVICE")
    got = ipvsdump.service(raw)
    assert got is not None
    assert got.key == VSKey("UDP", ref.get_attr("IPVS_SVC_ATTR_ADDR"), ref.get_attr("IPVS_SVC_ATTR_PORT"))
    assert got.scheduler == ref.get_attr("IPVS_SVC_ATTR_SCHED_NAME") == sched
    assert got.persistence == (timeout if bits & 1 else 0)
    assert got.flags == frozenset(f for f, b in ipvsdump.FLAG_BITS.items()
                                  if f.startswith(sched + "-") and bits & b)
    assert got.other == other
    assert ref.get_attr("IPVS_SVC_ATTR_PE_NAME") == pe




@pytest.mark.parametrize(("af", "addr", "weight", "fwd", "forward"), [
    (socket.AF_INET, "10.244.1.2", 0, 0, "masq"),
    (socket.AF_INET6, "fd01::2", 7, 0, "masq"),
    (socket.AF_INET, "10.244.1.3", 1, 3, "route"),  # ipvsadm -g
    (socket.AF_INET, "10.244.1.4", 1, 2, "tunnel"),  # ipvsadm -i
    (socket.AF_INET, "10.244.1.5", 1, 1, "local"),
    (socket.AF_INET, "10.244.1.6", 1, 6, "bypass"),  # no such method: not NAT all the same
])
def test_dest_decoder_reads_what_pyroute2_reads(af: int, addr: str, weight: int, fwd: int,
                                                forward: str) -> None:
    pytest.importorskip("pyroute2")
    raw = _encoded(5, [("IPVS_CMD_ATTR_DEST", {"attrs": [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", af), ("IPVS_DEST_ATTR_ADDR", addr),
        ("IPVS_DEST_ATTR_PORT", 8080), ("IPVS_DEST_ATTR_FWD_METHOD", fwd),
        ("IPVS_DEST_ATTR_WEIGHT", weight), ("IPVS_DEST_ATTR_U_THRESH", 0),
    ]})])
    ref = _pyroute2(raw).get_attr("IPVS_CMD_ATTR_DEST")
    got = ipvsdump.dest(raw, socket.AF_INET, {})
    assert ref.get_attr("IPVS_DEST_ATTR_FWD_METHOD") == fwd
    assert got == (RealServer(ref.get_attr("IPVS_DEST_ATTR_ADDR"), ref.get_attr("IPVS_DEST_ATTR_PORT"),
                              ref.get_attr("IPVS_DEST_ATTR_WEIGHT"), forward), fwd)  # type: ignore[arg-type]


class TornIpvs(FakeIpvs):
    """A fake whose (unlocked) dump misses one service and shows another one stale, as a
    dump in several parts can when a partial sync changes the table between parts."""

    def __init__(self) -> None:
        super().__init__(schedulers=frozenset({"rr"}))
        self.tear = False

    def dump(self) -> dict[VSKey, VirtualServer]:
        table = super().dump()
        if self.tear:
            del table[svc(1).key]
            table[svc(2).key] = svc(2, port=7777).without_reals().with_reals(
                [RealServer("10.244.1.2", 7777)])
        return table


def test_a_torn_read_is_checked_again_under_the_lock_before_writing() -> None:
    kernel, addrs = TornIpvs(), FakeAddresses()
    proxier = IpvsProxier(kernel, addrs, interface=IFACE)
    desired = make_table([svc(1), svc(2), svc(3)])
    assert proxier.sync_blocking(desired).ok
    before = dict(kernel.table)
    kernel.tear = True

    async def between(until: asyncio.Future[Any]) -> frozenset[str]:
        await until
        return frozenset()

    result = asyncio.run(proxier.sync_full(desired, between))
    # Without the second look: add_virtual_server s1 -> EEXIST, reported as a foreign
    # service (a conflict), and s2's real servers rewritten for nothing.
    assert result.ok, result.errors
    assert result.total_operations == 0
    assert kernel.table == before


PROC = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port Forward Weight ActiveConn InActConn
TCP  0A600001:0050 rr
  -> 0AF40103:1F90      Masq    1      0          0
  -> 0AF40102:1F90      Masq    0      2          0
TCP  0A600002:1F90 rr
  -> 0AF40104:1F90      Route   1      0          0
  -> 0AF40105:1F90      Tunnel  1      0          0
  -> 0AF40106:1F90      Local   1      0          0
UDP  0A60000D:0035 sh persistent 10800 FFFFFFFF
FWM  00000007 rr
  -> 0AF40102:1F90      Masq    1      0          0
UDP  [fd00:0000:0000:0000:0000:0000:0000:000a]:0035 mh
  -> [fd01:0000:0000:0000:0000:0000:0000:0002]:0035      Masq    3      0          0
"""


def test_proc_reader_keeps_kernel_order_weights_forwarding_and_ipv6() -> None:
    got = ipvsdump.proc_real_servers(PROC)
    assert got == {
        VSKey("TCP", "10.96.0.1", 80): [RealServer("10.244.1.3", 8080, 1), RealServer("10.244.1.2", 8080, 0)],
        VSKey("TCP", "10.96.0.2", 8080): [RealServer("10.244.1.4", 8080, 1, "route"),
                                          RealServer("10.244.1.5", 8080, 1, "tunnel"),
                                          RealServer("10.244.1.6", 8080, 1, "local")],
        VSKey("UDP", "10.96.0.13", 53): [],
        VSKey("UDP", "fd00::a", 53): [RealServer("fd01::2", 53, 3)],
    }


def test_a_full_sync_repairs_a_forwarding_method_and_settings_it_never_makes() -> None:
    """Drift the readers now report: a real server set to direct routing, a service given
    one-packet scheduling. The periodic full sync edits both back; a partial sync (which
    diffs against the mirror) does not see them; foreign services keep theirs."""
    kernel, addrs = FakeIpvs(schedulers=frozenset({"rr"})), FakeAddresses()
    proxier = IpvsProxier(kernel, addrs, interface=IFACE)
    desired = make_table([svc(1), svc(2)])
    assert proxier.sync_blocking(desired).ok
    foreign = VirtualServer("TCP", "192.0.2.1", 80, "rr", other=frozenset({"ops"}),
                            real_servers=(RealServer("192.0.2.9", 80, forward="route"),))
    kernel.table[foreign.key] = foreign
    one, two = svc(1).key, svc(2).key
    kernel.table[one] = kernel.table[one].with_reals([RealServer("10.244.1.1", 8080, forward="route")])
    kernel.table[two] = replace(kernel.table[two], other=frozenset({"ops"}))
    assert proxier.sync_blocking(desired, frozenset({"ns/s1", "ns/s2"})).total_operations == 0

    async def between(until: asyncio.Future[Any]) -> frozenset[str]:
        await until
        return frozenset()

    result = asyncio.run(proxier.sync_full(desired, between))
    assert result.ok, result.errors
    assert result.operations == {"update_real_server": 1, "update_virtual_server": 1}
    assert kernel.table[one].real_servers == (RealServer("10.244.1.1", 8080),)
    assert kernel.table[one].real_servers[0].forward == "masq"
    assert kernel.table[two].other == frozenset()
    assert kernel.table[foreign.key] == foreign
    assert asyncio.run(proxier.sync_full(desired, between)).total_operations == 0
