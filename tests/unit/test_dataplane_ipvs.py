"""The ipvs proxier against the stateful in-memory kernel fake (same cases as tests/dataplane/)."""

from __future__ import annotations

import asyncio

from svcproxy.dataplane.ipvs.kernel import FakeAddresses, FakeIpvs
from svcproxy.dataplane.ipvs.proxier import IpvsProxier
from svcproxy.dataplane.proxier import Action
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by

IFACE = "svcproxy0"


def service(n: int, reals: int = 3, scheduler: str = "rr", owner: str = "") -> VirtualServer:
    return VirtualServer.create(
        "TCP",
        f"10.96.{n // 250}.{n % 250 + 1}",
        80,
        [RealServer(f"10.244.1.{i + 2}", 8080) for i in range(reals)],
        scheduler=scheduler,
        owner=owner or f"ns/svc{n}",
    )


def make() -> tuple[IpvsProxier, FakeIpvs, FakeAddresses]:
    kernel, addrs = FakeIpvs(schedulers=frozenset({"rr", "wrr", "sh", "mh"})), FakeAddresses()
    return IpvsProxier(kernel, addrs, interface=IFACE), kernel, addrs


def kernel_view(kernel: FakeIpvs) -> dict[str, tuple[str, tuple[tuple[str, int, int], ...]]]:
    return {
        str(k): (v.scheduler, tuple((r.address, r.port, r.weight) for r in v.real_servers))
        for k, v in kernel.table.items()
    }


def test_full_sync_programs_kernel_and_vips_and_is_idempotent() -> None:
    proxier, kernel, addrs = make()
    desired = make_table(service(i) for i in range(5))
    result = asyncio.run(proxier.sync(desired))
    assert result.ok, result.errors
    assert set(kernel.table) == set(desired)
    assert addrs.interfaces[IFACE] == {k.address for k in desired}
    again = asyncio.run(proxier.sync(desired))
    assert again.total_operations == 0


def test_foreign_virtual_server_survives_and_conflict_is_reported() -> None:
    proxier, kernel, _addrs = make()
    foreign = VirtualServer("TCP", "192.0.2.1", 80, "rr", real_servers=(RealServer("192.0.2.9", 80),))
    clash = VirtualServer("TCP", "10.96.0.1", 80, "wrr")  # VIP not on svcproxy0: not ours
    kernel.table = make_table([foreign, clash])
    desired = make_table([service(0), service(1)])  # service(0) wants 10.96.0.1:80
    result = asyncio.run(proxier.sync(desired))
    assert kernel.table[foreign.key] == foreign
    assert kernel.table[clash.key] == clash
    assert [e.action for e in result.errors] == [Action.CONFLICT]
    assert result.failed_owners == {"ns/svc0"}
    asyncio.run(proxier.sync({}))
    assert set(kernel.table) == {foreign.key, clash.key}


def test_partial_sync_touches_only_the_changed_owner() -> None:
    proxier, kernel, _ = make()
    desired = make_table(service(i) for i in range(50))
    asyncio.run(proxier.sync(desired))
    changed = service(7, reals=4)
    desired[changed.key] = changed
    before = kernel.requests
    result = asyncio.run(proxier.sync(owned_by(desired, {"ns/svc7"}), frozenset({"ns/svc7"})))
    assert result.operations == {"add_real_server": 1}
    assert kernel.requests - before == 1  # no dump: the mirror answers
    assert set(kernel.table[changed.key].real_servers) == set(changed.real_servers)


def test_partial_sync_withdraws_a_deleted_owner_and_its_vip() -> None:
    proxier, kernel, addrs = make()
    desired = make_table(service(i) for i in range(3))
    asyncio.run(proxier.sync(desired))
    gone = service(1)
    result = asyncio.run(proxier.sync({}, frozenset({gone.owner})))
    assert result.operations == {"delete_virtual_server": 1}
    assert gone.key not in kernel.table
    assert gone.address not in addrs.interfaces[IFACE]


def test_restarted_proxier_adopts_its_services_without_rebuilding() -> None:
    proxier, kernel, addrs = make()
    desired = make_table(service(i, scheduler="sh") for i in range(10))
    asyncio.run(proxier.sync(desired))
    restarted = IpvsProxier(kernel, addrs, interface=IFACE)
    result = asyncio.run(restarted.sync(desired))
    assert result.total_operations == 0, result.operations
    assert restarted.counts().virtual_servers == 10


def test_hash_scheduler_order_is_repaired_on_full_sync() -> None:
    proxier, kernel, _ = make()
    vs = service(0, reals=3, scheduler="sh")
    asyncio.run(proxier.sync(make_table([vs])))
    # Someone re-added the last real server: the kernel now holds it first.
    last = vs.real_servers[-1]
    kernel.table[vs.key] = kernel.table[vs.key].with_reals((last, *vs.real_servers[:-1]))
    asyncio.run(proxier.sync(make_table([vs])))
    assert kernel.table[vs.key].real_servers == vs.real_servers


def test_unloadable_scheduler_asks_for_fallback() -> None:
    proxier, kernel, _ = make()
    result = asyncio.run(proxier.sync(make_table([service(0, scheduler="lblcr"), service(1)])))
    assert [e.action for e in result.errors] == [Action.FALLBACK]
    assert result.failed_owners == {"ns/svc0"}
    assert set(kernel.table) == {service(1).key}


def test_ipvs_missing_reports_unavailable() -> None:
    proxier = IpvsProxier(FakeIpvs(unavailable="no CONFIG_IP_VS"), FakeAddresses())
    assert not proxier.capabilities().available
    result = asyncio.run(proxier.sync(make_table([service(0)])))
    assert [e.action for e in result.errors] == [Action.FALLBACK]


def test_cleanup_removes_only_what_is_owned() -> None:
    proxier, kernel, addrs = make()
    foreign = VirtualServer("UDP", "192.0.2.1", 53, "rr")
    kernel.table = make_table([foreign])
    asyncio.run(proxier.sync(make_table(service(i) for i in range(4))))
    asyncio.run(proxier.cleanup())
    assert set(kernel.table) == {foreign.key}
    assert IFACE not in addrs.interfaces


def test_draining_weight_is_applied_as_update() -> None:
    proxier, kernel, _ = make()
    vs = service(0, reals=2)
    asyncio.run(proxier.sync(make_table([vs])))
    drained = vs.with_reals([vs.real_servers[0], RealServer(vs.real_servers[1].address, 8080, 0)])
    result = asyncio.run(proxier.sync(make_table([drained]), frozenset({vs.owner})))
    assert result.operations == {"update_real_server": 1}
    assert [r.weight for r in kernel.table[vs.key].real_servers] == [1, 0]
