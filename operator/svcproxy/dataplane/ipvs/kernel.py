"""The narrow kernel surface the IPVS proxier needs, and its in-memory fake.

Two protocols: :class:`IpvsKernel` (virtual/real servers) and
:class:`AddressKernel` (the dummy interface holding VIPs). The real ones are
``netlink.NetlinkIpvs`` and ``addresses.NetlinkAddresses`` (kernel adapters,
with ``host.py`` the only modules importing pyroute2); the fakes here are
stateful and refuse what the kernel refuses (EEXIST, ENOENT, an unloadable
scheduler), so the proxier's unit tests and the conformance test
(``tests/unit/test_dataplane_ipvs.py`` vs ``tests/dataplane/``) run the same
cases against both. Called by ``svcproxy.dataplane.ipvs.proxier``.
"""

from __future__ import annotations

import errno
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from svcproxy.dataplane.diff import Operation, OpKind, apply
from svcproxy.dataplane.table import IPVS_SCHEDULERS, VirtualServer, VSKey


@dataclass(frozen=True)
class Failure:
    """One operation the kernel refused."""

    operation: Operation
    errno: int
    message: str


class IpvsKernel(Protocol):
    def available(self) -> str:
        """'' when IPVS is usable, else why not and what to do."""
        ...

    def schedulers(self) -> frozenset[str]:
        """Schedulers whose module loads (probed once)."""
        ...

    def dump(self) -> dict[VSKey, VirtualServer]:
        """Every virtual server (owner ''), real servers in kernel order."""
        ...

    def read(self, keys: Collection[VSKey]) -> dict[VSKey, VirtualServer]:
        """Just these virtual servers, as held now (absent ones left out)."""
        ...

    def execute(self, ops: Sequence[Operation]) -> list[Failure]:
        """Apply operations in order; a failed one does not stop the rest."""
        ...


class AddressKernel(Protocol):
    def ensure_interface(self, name: str) -> None: ...

    def delete_interface(self, name: str) -> None: ...

    def addresses(self, name: str) -> set[str]:
        """Addresses on the interface (normalized; empty if it does not exist)."""
        ...

    def add_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        """Add host addresses; returns the ones that failed."""
        ...

    def delete_addresses(self, name: str, addresses: Sequence[str]) -> list[str]: ...


class AbsentIpvs:
    """A kernel without IPVS, known without opening netlink (see ``host.create``)."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    def available(self) -> str:
        return self._reason

    def schedulers(self) -> frozenset[str]:
        return frozenset()

    def dump(self) -> dict[VSKey, VirtualServer]:
        return {}

    def read(self, keys: Collection[VSKey]) -> dict[VSKey, VirtualServer]:
        return {}

    def execute(self, ops: Sequence[Operation]) -> list[Failure]:
        return [Failure(op, errno.ENOENT, self._reason) for op in ops]


class FakeIpvs:
    """In-memory IPVS: a table plus the kernel's refusals."""

    def __init__(
        self,
        schedulers: frozenset[str] = IPVS_SCHEDULERS,
        unavailable: str = "",
    ) -> None:
        self.table: dict[VSKey, VirtualServer] = {}
        self._schedulers = schedulers
        self._unavailable = unavailable
        self.requests = 0  # netlink requests a real kernel would have seen

    def available(self) -> str:
        return self._unavailable

    def schedulers(self) -> frozenset[str]:
        return self._schedulers

    def dump(self) -> dict[VSKey, VirtualServer]:
        self.requests += 1 + len(self.table)
        return dict(self.table)

    def read(self, keys: Collection[VSKey]) -> dict[VSKey, VirtualServer]:
        self.requests += 2 * len(keys)
        return {k: self.table[k] for k in keys if k in self.table}

    def execute(self, ops: Sequence[Operation]) -> list[Failure]:
        failures: list[Failure] = []
        for op in ops:
            self.requests += 1
            if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS) and (
                op.virtual_server.scheduler not in self._schedulers
            ):
                failures.append(Failure(op, errno.ENOENT, "scheduler not found"))
                continue
            try:
                # The kernel stores no owner.
                stripped = Operation(
                    op.kind,
                    replace(op.virtual_server, owner=""),
                    op.real_server,
                )
                self.table = apply(self.table, [stripped])
            except KeyError as err:
                failures.append(Failure(op, errno.ENOENT, str(err)))
            except ValueError as err:
                failures.append(Failure(op, errno.EEXIST, str(err)))
        return failures


class FakeAddresses:
    """In-memory interfaces and their addresses."""

    def __init__(self) -> None:
        self.interfaces: dict[str, set[str]] = {}

    def ensure_interface(self, name: str) -> None:
        self.interfaces.setdefault(name, set())

    def delete_interface(self, name: str) -> None:
        self.interfaces.pop(name, None)

    def addresses(self, name: str) -> set[str]:
        return set(self.interfaces.get(name, set()))

    def add_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        if name not in self.interfaces:
            return list(addresses)
        self.interfaces[name].update(addresses)
        return []

    def delete_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        have = self.interfaces.get(name, set())
        failed = [a for a in addresses if a not in have]
        have.difference_update(addresses)
        return failed
