"""The userspace proxier on the in-memory netfilter: one listener per portal and one
REDIRECT rule to it, jumps put back by full syncs, no-endpoint portals sent to a
refusing port, IPv6 in ip6tables only, cleanup leaving foreign rules. Listeners are
opened on ephemeral ports but no traffic is sent (that is tests/dataplane/test_userspace.py)."""

from __future__ import annotations

import asyncio

from nftrace import trace
from proxierkit import userspace_env  # noqa: F401 (the fixture env)
from proxierkit import userspace_ok as ok

from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.proxier import ModeUnavailableError, UnsupportedError
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy.dataplane.userspace.proxier import CHAIN, JUMPS, NODEPORTS_JUMP, UserspaceProxier

VIP, VIP6 = "10.96.6.10", "fd00:96::6:10"


def svc(port: int = 80, protocol: str = "TCP", weights: tuple[int, ...] = (1, 1), vip: str = VIP,
        owner: str | None = None) -> VirtualServer:
    reals = [RealServer(f"10.244.1.{i + 2}", 8080, w) for i, w in enumerate(weights)]
    return VirtualServer.create(protocol, vip, port, reals, owner=owner or f"ns/{protocol.lower()}{port}")  # type: ignore[arg-type]




def port_of(target: set[str]) -> int:
    (only,) = target
    return int(only.removeprefix("redirect:"))


async def test_each_portal_redirects_to_its_own_listener(env: tuple[FakeNetfilter, UserspaceProxier]) -> None:
    nf, p = env
    await ok(p, make_table([svc(), svc(53, "UDP")]))
    tcp, udp = trace(nf, VIP, 80), trace(nf, VIP, 53, "udp")
    assert port_of(tcp) != port_of(udp)
    assert trace(nf, VIP, 80, chain="OUTPUT") == tcp  # node-local clients too
    assert nf.jumps("nat") == {j.line for j in JUMPS}
    assert p.counts().virtual_servers == 2


async def test_a_changed_portal_keeps_its_listener(env: tuple[FakeNetfilter, UserspaceProxier]) -> None:
    nf, p = env
    await ok(p, make_table([svc()]))
    before = trace(nf, VIP, 80)
    result = await ok(p, make_table([svc(weights=(1, 1, 1))]), {"ns/tcp80"})
    assert result.operations == {"update_virtual_server": 1}
    assert trace(nf, VIP, 80) == before


async def test_no_ready_backend_goes_to_the_refusing_port_and_back(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    await ok(p, make_table([svc()]))
    listener = trace(nf, VIP, 80)
    await ok(p, make_table([svc(weights=(0, 0))]), {"ns/tcp80"})
    refused = trace(nf, VIP, 80)
    assert refused != listener
    await ok(p, make_table([svc()]), {"ns/tcp80"})
    assert trace(nf, VIP, 80) == listener
    assert len(nf.rules("nat", CHAIN)) == 2  # the portal and the node-port jump


async def test_a_full_sync_puts_back_a_deleted_jump_and_rewrites_the_chain(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    table = make_table([svc(), svc(81)])
    await ok(p, table)
    want = nf.save()
    first = nf.rules("nat", CHAIN)[0].removeprefix(f"-A {CHAIN} ")
    nf.restore(f"*nat\n-D {JUMPS[0].chain} {JUMPS[0].rule}\n-D {CHAIN} {first}\nCOMMIT\n")
    assert trace(nf, VIP, 80) == set() or trace(nf, VIP, 81) == set()
    await ok(p, table, {"ns/tcp81"})  # a partial sync repairs nothing it did not change
    assert nf.save() != want

    async def between(reading: asyncio.Future[object]) -> frozenset[str]:
        await reading
        return frozenset()

    result = await p.sync_full(table, between)
    assert result.ok, result.errors
    assert nf.save() == want


async def test_ipv6_portals_go_to_ip6tables_only(env: tuple[FakeNetfilter, UserspaceProxier]) -> None:
    nf, p = env
    await ok(p, make_table([svc(), svc(vip=VIP6, owner="ns/six")]))
    assert trace(nf.family(True), VIP6, 80) and trace(nf, VIP6, 80) == set()
    assert trace(nf.family(True), VIP, 80) == set()
    await ok(p, make_table([svc()]))
    assert nf.family(True).rules("nat", CHAIN) == [NODEPORTS_JUMP]


async def test_sctp_is_refused_with_what_to_use(env: tuple[FakeNetfilter, UserspaceProxier]) -> None:
    nf, p = env
    result = await p.sync(make_table([svc(protocol="SCTP")]))
    assert result.failed_owners == {"ns/sctp80"}
    assert isinstance(result.errors[0], UnsupportedError) and "ipvs or iptables" in str(result.errors[0])
    assert nf.rules("nat", CHAIN) == [NODEPORTS_JUMP]


async def test_cleanup_removes_the_chain_and_jumps_and_keeps_foreign_rules(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    nf.restore("*nat\n-A PREROUTING -d 192.0.2.2/32 -j RETURN\nCOMMIT\n")
    await ok(p, make_table([svc(), svc(vip=VIP6, owner="ns/six")]))
    assert (await p.cleanup()).ok
    assert "SVCPROXY" not in nf.save() and "SVCPROXY" not in nf.family(True).save()
    assert "-A PREROUTING -d 192.0.2.2/32 -j RETURN" in nf.save()
    assert p.counts().virtual_servers == 0


async def test_a_node_without_iptables_reports_why() -> None:
    p = UserspaceProxier(FakeNetfilter(backend="", reason="no iptables"))
    assert not p.capabilities().available
    result = await p.sync(make_table([svc()]))
    assert result.failed_owners == {"ns/tcp80"} and isinstance(result.errors[0], ModeUnavailableError)
