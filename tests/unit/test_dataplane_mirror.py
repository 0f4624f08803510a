"""The proxiers' shared mirror (svcproxy.dataplane.mirror): the owner index and the
running totals stay equal to what a recount of the table gives, whatever the updates."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from svcproxy.dataplane.mirror import Mirror
from svcproxy.dataplane.table import RealServer, VirtualServer


def vs(port: int, owner: str, reals: int) -> VirtualServer:
    return VirtualServer.create("TCP", "10.96.0.10", port,
                                [RealServer(f"10.244.1.{i + 1}", 8080) for i in range(reals)], owner=owner)


def recount(mirror: Mirror) -> tuple[dict[str, set[object]], int, int]:
    owners: dict[str, set[object]] = {}
    for key, v in mirror.items():
        owners.setdefault(v.owner, set()).add(key)
    return owners, sum(len(v.real_servers) for v in mirror.values()), sum(1 + len(v.real_servers)
                                                                          for v in mirror.values())


def test_a_key_that_changes_owner_moves_in_the_index() -> None:
    mirror = Mirror(lambda v: 1 + len(v.real_servers))
    a = vs(80, "ns/a", 2)
    assert mirror.put(a.key, a) is None
    b = vs(80, "ns/b", 3)
    assert mirror.put(b.key, b) == a
    assert mirror.keys_of({"ns/a"}) == set() and mirror.keys_of({"ns/b", "ns/c"}) == {b.key}
    assert (len(mirror), mirror.real_servers, mirror.rules) == (1, 3, 4)
    assert mirror.drop(b.key) == b and mirror.drop(b.key) is None
    assert (len(mirror), mirror.real_servers, mirror.rules, dict(mirror.owners())) == (0, 0, 0, {})


updates = st.lists(st.tuples(st.booleans(), st.integers(1, 6), st.sampled_from(["ns/a", "ns/b", "ns/c"]),
                             st.integers(0, 3)), max_size=40)


@given(updates)
def test_the_index_and_totals_equal_a_recount(steps: list[tuple[bool, int, str, int]]) -> None:
    mirror = Mirror(lambda v: 1 + len(v.real_servers))
    for put, port, owner, reals in steps:
        v = vs(port, owner, reals)
        if put:
            mirror.put(v.key, v)
        else:
            mirror.drop(v.key)
        owners, real_servers, rules = recount(mirror)
        assert dict(mirror.owners()) == owners
        assert (mirror.real_servers, mirror.rules) == (real_servers, rules)
    mirror.clear()
    assert (len(mirror), mirror.real_servers, mirror.rules, dict(mirror.owners())) == (0, 0, 0, {})
