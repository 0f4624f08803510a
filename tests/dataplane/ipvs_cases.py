"""Conformance cases for the IPVS kernel surface: run against the fake and the real kernel.

Each case takes a :class:`Kit` (a fresh, empty kernel: IPVS + addresses) and
asserts on what the kernel's own dump returns. tests/unit/test_dataplane_ipvs_conformance.py
runs them with FakeIpvs/FakeAddresses; tests/dataplane/test_ipvs.py runs them in a UML
guest with NetlinkIpvs/NetlinkAddresses (via ipvs_guest.py). If the fake and the
kernel disagree, one of the two runs fails.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from svcproxy.dataplane.diff import Operation, OpKind
from svcproxy.dataplane.ipvs.kernel import AddressKernel, IpvsKernel
from svcproxy.dataplane.ipvs.proxier import IpvsProxier
from svcproxy.dataplane.proxier import Action
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by

IFACE = "svcproxy0"


@dataclass
class Kit:
    kernel: IpvsKernel
    addresses: AddressKernel

    def proxier(self) -> IpvsProxier:
        return IpvsProxier(self.kernel, self.addresses, interface=IFACE)


def svc(n: int, scheduler: str = "rr", reals: int = 3, persistence: int = 0) -> VirtualServer:
    return VirtualServer.create(
        "TCP", f"10.96.8.{n}", 80,
        [RealServer(f"10.244.8.{i + 2}", 8080) for i in range(reals)],
        scheduler=scheduler, persistence=persistence, owner=f"ns/s{n}",
    )


def case_cold_sync_then_idempotent(kit: Kit) -> None:
    p = kit.proxier()
    desired = make_table([svc(1), svc(2, "sh"), svc(3, "wrr", persistence=60)])
    result = p.sync_blocking(desired)
    assert result.ok, result.errors
    dump = kit.kernel.dump()
    assert set(dump) == set(desired)
    for key, want in desired.items():
        assert dump[key].same_service(want), (dump[key], want)
        assert set(dump[key].real_servers) == set(want.real_servers)
    assert dump[svc(2).key].real_servers == svc(2, "sh").real_servers  # canonical order
    assert {k.address for k in desired} <= kit.addresses.addresses(IFACE)
    assert p.sync_blocking(desired).total_operations == 0


def case_update_keeps_scheduler_flags_and_persistence(kit: Kit) -> None:
    p = kit.proxier()
    p.sync_blocking(make_table([svc(1)]))
    changed = VirtualServer.create(
        "TCP", "10.96.8.1", 80, svc(1).real_servers, scheduler="sh",
        flags={"sh-port"}, persistence=300, owner="ns/s1",
    )
    result = p.sync_blocking(make_table([changed]), frozenset({"ns/s1"}))
    assert result.operations.get("update_virtual_server") == 1
    got = kit.kernel.dump()[changed.key]
    assert (got.scheduler, got.flags, got.persistence) == ("sh", frozenset({"sh-port"}), 300)


def case_weights_and_draining(kit: Kit) -> None:
    p = kit.proxier()
    v = svc(1)
    p.sync_blocking(make_table([v]))
    drained = v.with_reals([v.real_servers[0], RealServer(v.real_servers[1].address, 8080, 0),
                            RealServer(v.real_servers[2].address, 8080, 5)])
    p.sync_blocking(make_table([drained]), frozenset({v.owner}))
    weights = {r.address: r.weight for r in kit.kernel.dump()[v.key].real_servers}
    assert weights == {"10.244.8.2": 1, "10.244.8.3": 0, "10.244.8.4": 5}


def case_foreign_service_is_left_alone(kit: Kit) -> None:
    foreign = VirtualServer("TCP", "192.0.2.1", 80, "rr")
    assert kit.kernel.execute([Operation(OpKind.ADD_VS, foreign)]) == []
    clash = VirtualServer("TCP", "10.96.8.1", 80, "lc")  # a desired key, VIP not ours
    assert kit.kernel.execute([Operation(OpKind.ADD_VS, clash)]) == []
    p = kit.proxier()
    result = p.sync_blocking(make_table([svc(1), svc(2)]))
    assert [e.action for e in result.errors] == [Action.CONFLICT], result.errors
    p.sync_blocking({})
    p.cleanup_blocking()
    dump = kit.kernel.dump()
    assert set(dump) == {foreign.key, clash.key}
    assert dump[clash.key].scheduler == "lc"


def case_partial_sync_and_withdrawal(kit: Kit) -> None:
    p = kit.proxier()
    desired = make_table([svc(n) for n in range(1, 6)])
    p.sync_blocking(desired)
    desired[svc(3).key] = svc(3, reals=5)
    result = p.sync_blocking(owned_by(desired, {"ns/s3"}), frozenset({"ns/s3"}))
    assert result.operations == {"add_real_server": 2}, result
    assert len(kit.kernel.dump()[svc(3).key].real_servers) == 5
    p.sync_blocking({}, frozenset({"ns/s4"}))
    assert svc(4).key not in kit.kernel.dump()
    assert "10.96.8.4" not in kit.addresses.addresses(IFACE)


def case_restarted_proxier_adopts(kit: Kit) -> None:
    desired = make_table([svc(1, "sh"), svc(2, "mh")])
    kit.proxier().sync_blocking(desired)
    again = kit.proxier()
    result = again.sync_blocking(desired)
    assert result.total_operations == 0, result
    assert again.counts().virtual_servers == 2


def case_cleanup_removes_everything_owned(kit: Kit) -> None:
    p = kit.proxier()
    p.sync_blocking(make_table([svc(1), svc(2)]))
    p.cleanup_blocking()
    assert kit.kernel.dump() == {}
    assert kit.addresses.addresses(IFACE) == set()


def case_read_of_some_keys_matches_the_dump(kit: Kit) -> None:
    """``read(keys)`` (the full sync's second look under the lock) sees what ``dump`` sees,
    and leaves out keys the kernel does not hold."""
    p = kit.proxier()
    p.sync_blocking(make_table([svc(1), svc(2, "sh"), svc(3, "wrr", persistence=60)]))
    absent = svc(9).key
    got = kit.kernel.read([svc(2).key, svc(3).key, absent])
    dump = kit.kernel.dump()
    assert got == {svc(2).key: dump[svc(2).key], svc(3).key: dump[svc(3).key]}, got
    assert kit.kernel.read([]) == {}


def case_full_sync_edits_a_forwarding_method_back_to_nat(kit: Kit) -> None:
    """A real server switched to direct routing behind the agent's back: both readers
    (``dump``: /proc/net/ip_vs on a real kernel; ``read``: netlink) report it, a partial
    sync (mirror) does not see it, a full sync updates it back to NAT."""
    p = kit.proxier()
    v = svc(1)
    p.sync_blocking(make_table([v]))
    routed = RealServer(v.real_servers[0].address, 8080, forward="route")
    assert kit.kernel.execute([Operation(OpKind.UPDATE_RS, v.without_reals(), routed)]) == []
    for got in (kit.kernel.dump()[v.key], kit.kernel.read([v.key])[v.key]):
        assert {r.key: r.forward for r in got.real_servers}[routed.key] == "route", got
    assert p.sync_blocking(make_table([v]), frozenset({v.owner})).total_operations == 0
    result = p.sync_blocking(make_table([v]))
    assert result.operations == {"update_real_server": 1}, result
    for got in (kit.kernel.dump()[v.key], kit.kernel.read([v.key])[v.key]):
        assert set(got.real_servers) == set(v.real_servers), got  # masq again, weights kept
    assert p.sync_blocking(make_table([v])).total_operations == 0


def case_ipv6_persistent_service_reads_back_as_written(kit: Kit) -> None:
    """The persistence netmask of IPv6 is a prefix length (128 sent, 128 read back): a
    service written by the agent shows no ``other`` setting, so steady full syncs write
    nothing; the proc reader's IPv6 real servers match netlink's."""
    p = kit.proxier()
    reals = [RealServer("fd01::2", 8080), RealServer("fd01::3", 8080)]
    v = VirtualServer.create("TCP", "fd00::10", 80, reals, persistence=60, owner="ns/v6")
    result = p.sync_blocking(make_table([v]))
    assert result.ok, result.errors
    for got in (kit.kernel.dump()[v.key], kit.kernel.read([v.key])[v.key]):
        assert got.other == frozenset() and got.persistence == 60, got
        assert set(got.real_servers) == set(v.real_servers), got
    assert p.sync_blocking(make_table([v])).total_operations == 0


CASES: dict[str, Callable[[Kit], None]] = {
    name: fn for name, fn in globals().items() if name.startswith("case_") and callable(fn)
}
