"""The diff: desired table + observed table -> smallest list of kernel operations.

Pure (no I/O). The ipvs proxier calls :func:`diff` (full syncs against the
kernel read back, partial syncs against the in-memory mirror) and the IPVS
fake uses :func:`apply` to play the operations onto a table; the netfilter
modes plan rule changes instead (:mod:`svcproxy.dataplane.iptables.drift`,
the userspace proxier's own rules). Property-tested in ``tests/unit/test_diff.py``.

Rules:

* Only keys in ``owned`` (observed virtual servers the agent owns) and keys
  absent from ``observed`` are ever touched; a foreign virtual server at a
  desired key is left alone (:func:`conflicts` lists them).
* Order keeps traffic flowing: new and updated virtual servers first, then
  per virtual server real-server adds and updates before deletes, then
  deletes of whole virtual servers.
* What is compared: a virtual server's scheduler, flags, persistence and
  ``other`` settings (any difference: one update, which sends them all); a
  real server's weight and forwarding method (a real server changed to
  direct routing or tunnelling is updated back to NAT, as a changed weight
  is).
* Hash schedulers (sh, dh, mh) need the kernel's real-server list to be in
  the canonical order. The kernel puts a new real server at the HEAD of its
  list (``list_add_rcu`` in ip_vs_ctl.c; the dump returns that order), so
  real servers are added back to front; when the kept ones are not a suffix
  of the canonical list, those before the first out-of-order position are
  deleted and re-added (those deletes precede the adds).
  For other schedulers order is irrelevant and never causes operations.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from svcproxy.dataplane.table import RealServer, Table, VirtualServer, VSKey, canonical_order


class OpKind(enum.Enum):
    ADD_VS = "add_virtual_server"
    UPDATE_VS = "update_virtual_server"
    DELETE_VS = "delete_virtual_server"
    ADD_RS = "add_real_server"
    UPDATE_RS = "update_real_server"
    DELETE_RS = "delete_real_server"


@dataclass(frozen=True)
class Operation:
    """One kernel operation.

    ``virtual_server`` is the desired virtual server (its own attributes,
    without real servers) for adds/updates, the observed one for deletes,
    and the parent for real-server operations.
    """

    kind: OpKind
    virtual_server: VirtualServer
    real_server: RealServer | None = None

    @property
    def key(self) -> VSKey:
        return self.virtual_server.key

    @property
    def owner(self) -> str:
        return self.virtual_server.owner

    def __str__(self) -> str:
        rs = f" -> {self.real_server.address}:{self.real_server.port}" if self.real_server else ""
        return f"{self.kind.value} {self.key}{rs}"


def count_kinds(ops: Iterable[Operation]) -> dict[str, int]:
    return dict(Counter(op.kind.value for op in ops))


def _real_ops(want: VirtualServer, have: VirtualServer) -> tuple[list[Operation], list[Operation]]:
    """(adds/updates, deletes) that turn ``have``'s real servers into ``want``'s."""
    parent = want.without_reals()
    desired = canonical_order(want.real_servers) if want.hashed else want.real_servers
    want_by_key = {r.key: r for r in desired}
    have_by_key = {r.key: r for r in have.real_servers}
    early: list[Operation] = []  # deletes that must come before adds (hash re-order)
    adds: list[Operation] = []
    deletes: list[Operation] = []
    keep = [r for r in have.real_servers if r.key in want_by_key]
    i, j = len(keep), len(desired)
    if want.hashed:
        # The kernel prepends a new real server to its list, so the kept ones must
        # be a suffix of the desired list; the rest is (re-)added back to front.
        while i and j and keep[i - 1].key == desired[j - 1].key:
            i, j = i - 1, j - 1
    else:
        i = 0
    for r in keep[:i]:
        early.append(Operation(OpKind.DELETE_RS, parent, r))
    readd = {r.key for r in keep[:i]}
    for r in have.real_servers:
        if r.key not in want_by_key:
            # Removing a real server never disturbs the order of the others: delete last.
            deletes.append(Operation(OpKind.DELETE_RS, parent, r))
    for r in reversed(desired) if want.hashed else desired:
        old = have_by_key.get(r.key)
        if old is None or r.key in readd:
            adds.append(Operation(OpKind.ADD_RS, parent, r))
        elif old.weight != r.weight or old.forward != r.forward:
            adds.append(Operation(OpKind.UPDATE_RS, parent, r))
    return early + adds, deletes


def diff(desired: Table, observed: Table, owned: Collection[VSKey]) -> list[Operation]:
    """Operations that make the owned part of ``observed`` equal ``desired``.

    ``owned``: keys of ``observed`` the agent owns; anything else in
    ``observed`` is foreign and never touched (not even when desired).
    Owned keys missing from ``desired`` are deleted.
    """
    vs_ops: list[Operation] = []
    real_ops: list[Operation] = []
    late: list[Operation] = []
    for key in sorted(desired, key=_key_order):
        want = desired[key]
        have = observed.get(key)
        if have is None:
            # A new virtual server carries no traffic yet: its real servers follow it
            # at once (as ipvsadm -R orders them), which the kernel handles faster.
            vs_ops.append(Operation(OpKind.ADD_VS, want.without_reals()))
            reals = canonical_order(want.real_servers) if want.hashed else want.real_servers
            vs_ops.extend(
                Operation(OpKind.ADD_RS, want.without_reals(), r) for r in reversed(reals)
            )
            continue
        if key not in owned:
            continue  # foreign: see conflicts()
        if not want.same_service(have):
            vs_ops.append(Operation(OpKind.UPDATE_VS, want.without_reals()))
        first, last = _real_ops(want, have)
        real_ops.extend(first)
        late.extend(last)
    for key in sorted(observed, key=_key_order):
        if key in owned and key not in desired:
            late.append(Operation(OpKind.DELETE_VS, observed[key].without_reals()))
    return vs_ops + real_ops + late


def conflicts(desired: Table, observed: Table, owned: Collection[VSKey]) -> list[VSKey]:
    """Desired keys held in the kernel by someone else (left alone by :func:`diff`)."""
    return [k for k in desired if k in observed and k not in owned]


def apply(table: Table, ops: Iterable[Operation]) -> dict[VSKey, VirtualServer]:
    """Play operations onto a copy of a table the way the kernel does.

    A real server added goes to the head of its list. Raises ``KeyError`` /
    ``ValueError`` on an operation the kernel would refuse (unknown virtual
    server, duplicate real server), like the kernel's ENOENT/EEXIST. Used by
    the in-memory fakes and the property tests.
    """
    out = dict(table)
    for op in ops:
        apply_one(out, op)
    return out


def apply_one(table: dict[VSKey, VirtualServer], op: Operation) -> None:
    """Play one operation onto ``table`` in place (see :func:`apply`)."""
    key = op.key
    if op.kind is OpKind.ADD_VS:
        if key in table:
            raise ValueError(f"{key} exists (EEXIST)")
        table[key] = op.virtual_server.without_reals()
    elif op.kind is OpKind.UPDATE_VS:
        table[key] = op.virtual_server.with_reals(table[key].real_servers)
    elif op.kind is OpKind.DELETE_VS:
        del table[key]
    else:
        rs = op.real_server
        assert rs is not None, f"{op.kind} without a real server"
        vs = table[key]
        reals = list(vs.real_servers)
        index = next((i for i, r in enumerate(reals) if r.key == rs.key), None)
        if op.kind is OpKind.ADD_RS:
            if index is not None:
                raise ValueError(f"{key} already has {rs.key} (EEXIST)")
            reals.insert(0, rs)  # the kernel's list_add: at the head
        elif index is None:
            raise KeyError(f"{key} has no real server {rs.key} (ENOENT)")
        elif op.kind is OpKind.UPDATE_RS:
            reals[index] = rs
        else:
            del reals[index]
        table[key] = vs.with_reals(reals)


def _key_order(key: VSKey) -> tuple[str, str, int]:
    return (key.protocol, key.address, key.port)
