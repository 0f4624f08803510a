"""Properties of the pure diff: apply(observed, diff(...)) reaches desired, touching only what is owned."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from svcproxy.dataplane.diff import OpKind, apply, conflicts, diff
from svcproxy.dataplane.table import (
    RealServer,
    VirtualServer,
    VSKey,
    canonical_order,
    make_table,
)

SCHEDULERS = ["rr", "wrr", "lc", "sh", "mh", "dh"]

reals = st.lists(
    st.builds(
        RealServer,
        address=st.sampled_from([f"10.244.{i}.{j}" for i in (1, 2) for j in (2, 3, 4)]),
        port=st.sampled_from([80, 8080]),
        weight=st.integers(0, 3),
        # Observed tables may hold a method changed by hand; desired ones hold masq (but
        # the property holds either way).
        forward=st.sampled_from(["masq", "masq", "route", "tunnel"]),
    ),
    max_size=6,
    unique_by=lambda r: r.key,
)


@st.composite
def virtual_servers(draw: st.DrawFn, canonical: bool) -> VirtualServer:
    rs = draw(reals)
    rs = list(canonical_order(rs)) if canonical else draw(st.permutations(rs))
    return VirtualServer(
        protocol=draw(st.sampled_from(["TCP", "UDP"])),
        address=draw(st.sampled_from(["10.96.0.10", "10.96.0.11", "fd00::a"])),
        port=draw(st.sampled_from([53, 80])),
        scheduler=draw(st.sampled_from(SCHEDULERS)),
        flags=draw(st.sampled_from([frozenset(), frozenset({"sh-port"})])),
        persistence=draw(st.sampled_from([0, 10800])),
        other=draw(st.sampled_from([frozenset(), frozenset({"ops"}), frozenset({"netmask 255.255.255.0"})])),
        owner=draw(st.sampled_from(["ns/a", "ns/b"])),
        real_servers=tuple(rs),
    )


def tables(canonical: bool) -> st.SearchStrategy[dict[VSKey, VirtualServer]]:
    return st.lists(virtual_servers(canonical), max_size=6, unique_by=lambda v: v.key).map(make_table)


def same(vs_a: VirtualServer, vs_b: VirtualServer) -> bool:
    """Equal as the kernel sees it: attributes, and real servers (in order when hashing)."""
    if not vs_a.same_service(vs_b):
        return False
    if vs_a.hashed:
        return vs_a.real_servers == vs_b.real_servers
    return set(vs_a.real_servers) == set(vs_b.real_servers)


@settings(max_examples=400)
@given(desired=tables(canonical=True), observed=tables(canonical=False), data=st.data())
def test_applying_the_diff_reaches_desired_and_touches_only_owned(
    desired: dict[VSKey, VirtualServer],
    observed: dict[VSKey, VirtualServer],
    data: st.DataObject,
) -> None:
    owned = set(data.draw(st.sets(st.sampled_from(sorted(observed))))) if observed else set()
    ops = diff(desired, observed, owned)
    result = apply(observed, ops)
    for key, want in desired.items():
        if key in observed and key not in owned:
            assert result[key] == observed[key], "a foreign virtual server was changed"
        else:
            assert same(result[key], want), f"{key}: {result[key]} != {want}"
    for key, have in observed.items():
        if key not in owned:
            assert result[key] == have
        elif key not in desired:
            assert key not in result, "an owned leftover was not swept"
    assert set(result) <= set(desired) | set(observed)
    touched = {op.key for op in ops}
    assert touched <= owned | (set(desired) - set(observed))
    assert set(conflicts(desired, observed, owned)) == {
        k for k in desired if k in observed and k not in owned
    }


@given(table=tables(canonical=True))
def test_diff_of_a_table_with_itself_is_empty(table: dict[VSKey, VirtualServer]) -> None:
    assert diff(table, table, set(table)) == []


@given(table=tables(canonical=False))
def test_non_hash_order_never_causes_operations(table: dict[VSKey, VirtualServer]) -> None:
    canon = {k: v.canonical() for k, v in table.items()}
    ops = diff(canon, table, set(table))
    assert all(table[op.key].hashed for op in ops)


@given(table=tables(canonical=True), data=st.data())
def test_one_changed_service_yields_operations_for_it_only(
    table: dict[VSKey, VirtualServer], data: st.DataObject
) -> None:
    if not table:
        return
    key = data.draw(st.sampled_from(sorted(table)))
    changed = dict(table)
    changed[key] = VirtualServer.create(
        key.protocol,
        key.address,
        key.port,
        data.draw(reals),
        scheduler=data.draw(st.sampled_from(SCHEDULERS)),
        owner=table[key].owner,
    )
    ops = diff(changed, table, set(table))
    assert {op.key for op in ops} <= {key}
    assert same(apply(table, ops)[key], changed[key])


def test_hash_scheduler_adds_back_to_front_because_the_kernel_prepends() -> None:
    a, b, c = (RealServer(f"10.244.1.{i}", 80) for i in (1, 2, 3))
    observed = make_table([VirtualServer("TCP", "10.96.0.10", 80, "sh", real_servers=(b, c))])
    desired = make_table([VirtualServer.create("TCP", "10.96.0.10", 80, [c, a, b], scheduler="sh")])
    ops = diff(desired, observed, set(observed))
    assert [(op.kind, op.real_server) for op in ops] == [(OpKind.ADD_RS, a)]
    key = next(iter(desired))
    assert apply(observed, ops)[key].real_servers == (a, b, c)


def test_hash_scheduler_reorders_what_precedes_the_first_out_of_order_position() -> None:
    a, b, c, d = (RealServer(f"10.244.1.{i}", 80) for i in (1, 2, 3, 4))
    observed = make_table([VirtualServer("TCP", "10.96.0.10", 80, "sh", real_servers=(c, b, d))])
    desired = make_table([VirtualServer.create("TCP", "10.96.0.10", 80, [a, b, c, d], scheduler="sh")])
    ops = diff(desired, observed, set(observed))
    # d stays (no traffic loss for its clients); c and b go and come back in order; a prepended.
    assert [(op.kind, op.real_server) for op in ops] == [
        (OpKind.DELETE_RS, c),
        (OpKind.DELETE_RS, b),
        (OpKind.ADD_RS, c),
        (OpKind.ADD_RS, b),
        (OpKind.ADD_RS, a),
    ]
    key = next(iter(desired))
    assert apply(observed, ops)[key].real_servers == (a, b, c, d)


def test_adds_and_updates_come_before_deletes() -> None:
    a, b = RealServer("10.244.1.1", 80), RealServer("10.244.1.2", 80)
    old = VirtualServer("TCP", "10.96.0.10", 80, "rr", real_servers=(a,))
    gone = VirtualServer("TCP", "10.96.0.12", 80, "rr")
    new = VirtualServer.create("TCP", "10.96.0.10", 80, [b], scheduler="wrr")
    ops = diff(make_table([new]), make_table([old, gone]), {old.key, gone.key})
    kinds = [op.kind for op in ops]
    assert kinds == [OpKind.UPDATE_VS, OpKind.ADD_RS, OpKind.DELETE_RS, OpKind.DELETE_VS]


def test_canonical_order_sorts_ipv4_before_ipv6_and_numerically() -> None:
    rs = [RealServer("10.0.0.10", 80), RealServer("fd00::1", 80), RealServer("10.0.0.9", 81)]
    assert [r.address for r in canonical_order(rs)] == ["10.0.0.9", "10.0.0.10", "fd00::1"]


def test_a_real_server_changed_to_direct_routing_is_edited_back_to_nat() -> None:
    """``ipvsadm -e -t VIP:80 -r POD:80 -g`` on one of ours: the weight is as desired, the
    forwarding method is not; the diff updates that real server (only it), as for a weight.
    A foreign virtual server with direct routing is left alone."""
    a, b = RealServer("10.244.1.1", 80), RealServer("10.244.1.2", 80)
    desired = VirtualServer.create("TCP", "10.96.0.10", 80, [a, b], owner="ns/a")
    routed = RealServer("10.244.1.2", 80, forward="route")
    observed = make_table([
        desired.without_reals().with_reals([a, routed]),
        VirtualServer("TCP", "192.0.2.1", 80, "rr",
                      real_servers=(RealServer("192.0.2.9", 80, forward="route"),)),
    ])
    ops = diff(make_table([desired]), observed, {desired.key})
    assert [(op.kind, op.real_server) for op in ops] == [(OpKind.UPDATE_RS, b)]
    assert ops[0].real_server is not None and ops[0].real_server.forward == "masq"
    result = apply(observed, ops)
    assert result[desired.key].real_servers == (a, b)
    assert result[VSKey("TCP", "192.0.2.1", 80)] == observed[VSKey("TCP", "192.0.2.1", 80)]
    # Tunnelling (-i) and a weight change at once: still one update.
    tunnel = RealServer("10.244.1.2", 80, 5, "tunnel")
    tunnelled = make_table([desired.without_reals().with_reals([a, tunnel])])
    assert [op.kind for op in diff(make_table([desired]), tunnelled, set(tunnelled))] == [OpKind.UPDATE_RS]


def test_settings_svcproxy_never_makes_make_a_service_differ() -> None:
    """One-packet scheduling, a wider persistence netmask, a persistence engine: read back
    into ``other``; the update (which sends every setting) is the repair."""
    want = VirtualServer.create("UDP", "10.96.0.10", 53, [RealServer("10.244.1.1", 53)],
                                persistence=10800, owner="ns/a")
    for other in ({"ops"}, {"netmask 255.255.255.0"}, {"pe sip"}, {"flags 0x20"}):
        have = make_table([VirtualServer("UDP", "10.96.0.10", 53, "rr", persistence=10800,
                                         other=frozenset(other), real_servers=want.real_servers)])
        ops = diff(make_table([want]), have, set(have))
        assert [op.kind for op in ops] == [OpKind.UPDATE_VS], other
        assert apply(have, ops)[want.key].other == frozenset()
    # A changed persistence timeout and sh flags were compared before: still are.
    for changed in ({"persistence": 60}, {"persistence": 10800, "flags": frozenset({"sh-port"})}):
        have = make_table([VirtualServer("UDP", "10.96.0.10", 53, **changed,  # type: ignore[arg-type]
                                         real_servers=want.real_servers)])
        assert OpKind.UPDATE_VS in [op.kind for op in diff(make_table([want]), have, set(have))]
