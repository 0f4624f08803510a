"""An in-memory kernel and proxier for the agent's unit tests (no root, no network).

``FakeKernel`` holds one table per mode plus the marks that say which
virtual servers the agent owns (as the real modes mark theirs: a VIP on
svcproxy0, a rule in SVCPROXY- chains), so a second agent over the same
kernel adopts what the first one programmed. ``FakeProxier`` follows the
Proxier contract: full syncs re-read the kernel and diff, partial syncs
diff against the mirror of the given owners only. Also tests the fake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from svcproxy.dataplane import diff as dpdiff
from svcproxy.dataplane.capabilities import ModeCapabilities, ModeCounts
from svcproxy.dataplane.proxier import DataplaneError, Proxier, SyncResult
from svcproxy.dataplane.table import Table, VirtualServer, VSKey


@dataclass
class FakeKernel:
    tables: dict[str, dict[VSKey, VirtualServer]] = field(default_factory=dict)
    owned: dict[str, dict[VSKey, str]] = field(default_factory=dict)  # mode -> key -> owner mark
    by_owner: dict[str, dict[str, set[VSKey]]] = field(default_factory=dict)
    reals: dict[str, int] = field(default_factory=dict)  # mode -> real servers held by owned keys
    # Called after every sync of any mode (for invariants across modes).
    observers: list[Callable[[FakeKernel], None]] = field(default_factory=list)

    def table(self, mode: str) -> dict[VSKey, VirtualServer]:
        return self.tables.setdefault(mode, {})

    def marks(self, mode: str) -> dict[VSKey, str]:
        return self.owned.setdefault(mode, {})

    def serving(self) -> dict[VSKey, set[str]]:
        """key -> modes whose table holds it."""
        out: dict[VSKey, set[str]] = {}
        for mode, table in self.tables.items():
            for key in table:
                out.setdefault(key, set()).add(mode)
        return out


class FakeProxier:
    def __init__(self, mode: str, kernel: FakeKernel, caps: ModeCapabilities | None = None) -> None:
        self._mode = mode
        self.kernel = kernel
        self.caps = caps or ModeCapabilities(mode, True, schedulers=frozenset({"rr", "wrr", "sh", "lc"}))
        self.fail: dict[str, DataplaneError] = {}  # owner -> error its next syncs raise
        self.desired_sizes: list[int] = []  # entries handed in, per partial sync (cost check)
        self.syncs: list[frozenset[str] | None] = []

    @property
    def mode(self) -> str:
        return self._mode

    def capabilities(self) -> ModeCapabilities:
        return self.caps

    async def sync(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult:
        self.syncs.append(only)
        table = self.kernel.table(self._mode)
        marks = self.kernel.marks(self._mode)
        # An owner fails where it is being programmed (withdrawing it always works).
        failed = {vs.owner for vs in desired.values() if vs.owner in self.fail}
        errors = tuple(self.fail[o] for o in sorted(failed))
        want = {k: v for k, v in desired.items() if v.owner not in failed}
        by_owner = self.kernel.by_owner.setdefault(self._mode, {})
        if only is None:
            owned = {k for k in marks if marks[k] not in failed}
            observed: dict[VSKey, VirtualServer] = dict(table)
        else:
            self.desired_sizes.append(len(desired))
            # Like the real proxiers' mirrors: per-owner lookups, nothing that scans the table.
            owned = {k for o in only - failed for k in by_owner.get(o, ())}
            observed = {k: table[k] for k in owned}
            observed.update({k: table[k] for k in want if k in table})
        ops = dpdiff.diff(want, observed, owned)
        touched = {op.key for op in ops}
        new = dpdiff.apply({k: table[k] for k in touched if k in table}, ops)
        for key in touched:
            old = table.pop(key, None)
            delta = -len(old.real_servers) if old is not None else 0
            if key in new:
                table[key] = new[key]
                delta += len(new[key].real_servers)
            self.kernel.reals[self._mode] = self.kernel.reals.get(self._mode, 0) + delta
        for op in ops:
            if op.kind is dpdiff.OpKind.DELETE_VS:
                owner = marks.pop(op.key, None)
                if owner is not None:
                    by_owner.get(owner, set()).discard(op.key)
            elif op.kind is dpdiff.OpKind.ADD_VS:
                marks[op.key] = op.owner
                by_owner.setdefault(op.owner, set()).add(op.key)
        for observer in self.kernel.observers:
            observer(self.kernel)
        return SyncResult(
            mode=self._mode,
            full=only is None,
            operations=dpdiff.count_kinds(ops),
            errors=errors,
            failed_owners=frozenset(failed),
            counts=self.counts(),
        )

    async def cleanup(self) -> SyncResult:
        table = self.kernel.table(self._mode)
        marks = self.kernel.marks(self._mode)
        for key in list(marks):
            old = table.pop(key, None)
            if old is not None:
                self.kernel.reals[self._mode] = self.kernel.reals.get(self._mode, 0) - len(old.real_servers)
            del marks[key]
        self.kernel.by_owner.pop(self._mode, None)
        return SyncResult(mode=self._mode, full=True, operations={})

    def counts(self) -> ModeCounts:
        # Kept up to date per operation (not counted by a scan): real proxiers count from
        # their mirrors the same way, and the cost test must not see a hidden O(N).
        return ModeCounts(virtual_servers=len(self.kernel.marks(self._mode)),
                      real_servers=self.kernel.reals.get(self._mode, 0))

    async def close(self) -> None:
        return None


def test_fake_is_a_proxier() -> None:
    assert isinstance(FakeProxier("iptables", FakeKernel()), Proxier)
