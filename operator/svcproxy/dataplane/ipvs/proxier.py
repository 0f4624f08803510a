"""The ``ipvs`` mode: virtual servers in the kernel's IPVS, VIPs on ``svcproxy0``.

Built by :func:`svcproxy.dataplane.modes.build_proxier` (``host.create``, with the
kernel adapters) on a real node, or directly with the fakes from ``kernel.py`` in unit
tests; it probes nothing and runs no tool itself.
Ownership: an IPVS virtual server is ours when its VIP is on the dummy
interface (``svcproxy0``); that survives an agent restart, so a restarted
agent adopts its services on the first full sync instead of rebuilding
them. Foreign virtual servers (VIP not on the interface) are never
touched. Partial syncs diff against an in-memory mirror of what was
applied (cost independent of the number of services); full syncs re-read
the kernel and sweep owned leftovers. The agent's periodic full sync calls
:meth:`IpvsProxier.sync_full`, which reads the kernel and diffs without the
write lock while the agent runs partial syncs, then writes minus what those
partial syncs touched.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from svcproxy.base import Mode
from svcproxy.dataplane.capabilities import ModeCapabilities, ModeCounts
from svcproxy.dataplane.conntrack import ConntrackCleaner, clear_stale
from svcproxy.dataplane.diff import Operation, OpKind, apply_one, count_kinds, diff
from svcproxy.dataplane.ipvs.kernel import AddressKernel, Failure, IpvsKernel
from svcproxy.dataplane.mirror import Mirror
from svcproxy.dataplane.proxier import (
    Between,
    BlockingProxier,
    DataplaneError,
    ForeignObjectError,
    KernelError,
    SchedulerUnavailableError,
    SyncResult,
    read_beside,
)
from svcproxy.dataplane.table import Table, VirtualServer, VSKey

MODE: Mode = "ipvs"


@dataclass(frozen=True)
class ReadBack:
    """A full sync's kernel read-back and its diff, made without the write lock."""

    vips: set[str]
    observed: dict[VSKey, VirtualServer]
    owned: set[VSKey]
    ops: list[Operation]
    setup_errors: list[DataplaneError]  # of the node setup (sysctls, masquerade) run with it


@dataclass
class _View:
    """What one sync works from: the desired services it may program, what it has of
    them (from the kernel or the mirror) and owns, the kernel's read-back (full syncs)
    and what it keeps as partial syncs left it. The diff steps update it in place."""

    want: dict[VSKey, VirtualServer]
    have: dict[VSKey, VirtualServer]
    owned: set[VSKey]
    observed: dict[VSKey, VirtualServer] = field(default_factory=dict)
    kept: dict[VSKey, VirtualServer] = field(default_factory=dict)

    def diff(self) -> list[Operation]:
        return diff(self.want, self.have, self.owned)


class IpvsProxier(BlockingProxier):
    """One IPVS proxier per node (see module docstring)."""

    MODE = MODE

    def __init__(
        self,
        kernel: IpvsKernel,
        addresses: AddressKernel,
        *,
        interface: str = "svcproxy0",
        prepare: Callable[[], list[DataplaneError]] | None = None,
        unprepare: Callable[[], None] | None = None,
        conntrack: ConntrackCleaner | None = None,
    ) -> None:
        super().__init__()
        # Deletes the UDP/SCTP entries a sync leaves stale (None: never, e.g. a fake kernel).
        self.conntrack = conntrack
        self._kernel = kernel
        self._addresses = addresses
        self._interface = interface
        # Node setup (sysctls, masquerade rules) run on each full sync / cleanup.
        self._prepare = prepare
        self._unprepare = unprepare
        self._mirror = Mirror()
        self._vip_users: Counter[str] = Counter()
        self._vips: set[str] = set()  # addresses on the interface (re-read on full syncs)
        self._synced = False
        # Keys partial syncs wrote while a full sync read the kernel (None: not reading).
        self._written: set[VSKey] | None = None
        reason = kernel.available()
        self._caps = ModeCapabilities(
            mode=MODE,
            available=not reason,
            reason=reason,
            schedulers=kernel.schedulers() if not reason else frozenset(),
            protocols=frozenset({"TCP", "UDP", "SCTP"}),
            backend="netlink",
        )

    def counts(self) -> ModeCounts:
        return ModeCounts(virtual_servers=len(self._mirror), real_servers=self._mirror.real_servers)

    async def sync_full(self, desired: Table, between: Between) -> SyncResult:
        """A full sync whose kernel read-back and diff do not hold up partial syncs.

        The agent calls this for its periodic full sync (``svcproxy.agent.agent``). The
        VIPs and the IPVS table are read (each on a netlink socket of its own, opened
        for the read) and diffed in a worker thread WITHOUT the write lock, while
        ``between`` (the agent) applies the partial syncs that come due (each takes the
        lock: one writer at a time). The operations then run under the lock, minus
        every virtual server those partial syncs wrote and every one of the owners
        ``between`` returns: those are newer than the read-back and stay as the partial
        syncs left them. The first full sync after start is a plain one.
        """
        if not self._synced or not self._caps.available:
            return await self.sync(desired, None)
        self._written = set()

        def read_back() -> ReadBack | None:
            try:
                return self._read_back(desired)
            except Exception:  # read again (and reported) under the lock
                return None

        read, touched = await read_beside(read_back, between)
        async with self._lock:
            written, self._written = self._written, None
            skip = written | {k for k, v in desired.items() if v.owner in touched}
            skip |= self._mirror.keys_of(touched)
            return await asyncio.to_thread(self.sync_blocking, desired, None, read, skip)

    def _read_back(self, desired: Table) -> ReadBack:
        """VIPs + IPVS table + diff: no IPVS write, no mirror access (runs beside partial
        syncs). The node setup runs here too: it touches sysctls and its own nat chain
        (iptables-restore -w waits for other writers), nothing a partial sync writes, and
        under the lock it would hold back every change landing late in a full sync."""
        setup = self._prepare() if self._prepare is not None else []
        vips = self._addresses.addresses(self._interface)
        observed = self._kernel.dump()
        owned = {k for k in observed if k.address in vips}
        want, _refused = self._programmable(desired, None)
        want = {k: v for k, v in want.items() if k not in observed or k in owned}
        return ReadBack(vips, observed, owned, diff(want, {k: observed[k] for k in owned}, owned), setup)

    # The blocking halves: run in a worker thread by the agent, directly by benchmarks.

    def sync_blocking(
        self,
        desired: Table,
        only: frozenset[str] | None = None,
        read: ReadBack | None = None,
        skip: frozenset[VSKey] | set[VSKey] = frozenset(),
    ) -> SyncResult:
        """``read``/``skip``: see :meth:`sync_full` (full syncs only)."""
        start = time.monotonic()
        full = only is None or not self._synced
        if not self._caps.available:
            return self._unavailable(desired, full, start, "IPVS")
        errors: list[DataplaneError] = []
        if read is not None:
            errors.extend(read.setup_errors)
        elif full and self._prepare is not None:
            errors.extend(self._prepare())
        want, refused = self._programmable(desired, only)
        errors.extend(refused)
        if only is None:
            view = self._full_view(want, read, skip, errors)
            ops = self._diff_again(view, read, skip, errors) if read is not None else view.diff()
        else:
            view = self._partial_view(want, only)
            ops = view.diff()
        done = self._write(view, ops, errors, full=only is None)
        self._synced = True
        return SyncResult(
            MODE,
            full,
            count_kinds(done),
            tuple(errors),
            frozenset(e.owner for e in errors if e.owner),
            time.monotonic() - start,
            self.counts(),
        )

    def _full_view(
        self,
        want: dict[VSKey, VirtualServer],
        read: ReadBack | None,
        skip: frozenset[VSKey] | set[VSKey],
        errors: list[DataplaneError],
    ) -> _View:
        """A full sync's starting point: the kernel (read now, or by ``read``) minus the
        foreign services and minus ``skip``, which stays as the partial syncs left it."""
        self._addresses.ensure_interface(self._interface)
        if read is None:
            vips = self._addresses.addresses(self._interface)
            self._vips = set(vips)
            observed = self._kernel.dump()
        else:  # read earlier; the VIPs again (cheap), as partial syncs left them
            vips, observed = read.vips, read.observed
            self._vips = set(self._addresses.addresses(self._interface))
        owned = {k for k in observed if k.address in vips}
        for key in [k for k in want if k in observed and k not in owned]:
            errors.append(_foreign(want.pop(key)))
        kept: dict[VSKey, VirtualServer] = {}
        if skip:  # written by partial syncs during the read: as they left them
            want = {k: v for k, v in want.items() if k not in skip}
            owned -= skip
            kept = {k: self._mirror[k] for k in skip if k in self._mirror}
        return _View(want, {k: observed[k] for k in owned}, owned, observed, kept)

    def _partial_view(self, want: dict[VSKey, VirtualServer], only: frozenset[str]) -> _View:
        """A partial sync's starting point: the mirror of the given owners' services."""
        if not self._synced:
            self._adopt()
        keys = self._mirror.keys_of(only)
        keys |= {k for k in want if k in self._mirror}  # moved from another owner
        have = {k: self._mirror[k] for k in keys}
        if self._written is not None:  # a full sync is reading: it must leave these alone
            self._written |= keys | set(want)
        return _View(want, have, set(have))

    def _diff_again(
        self, view: _View, read: ReadBack, skip: frozenset[VSKey] | set[VSKey], errors: list[DataplaneError]
    ) -> list[Operation]:
        """Diffed without the lock, from a dump that ran beside partial syncs: a dump in
        several parts can miss or repeat a service that changed meanwhile. So the
        services it would change are read again now (few: what drifted) and diffed from
        that; the steady state reads nothing more."""
        again = {op.key for op in read.ops if op.key not in skip}
        fresh = self._kernel.read(again) if again else {}
        want, have, owned, observed = view.want, view.have, view.owned, view.observed
        for key in again:
            observed.pop(key, None)
            have.pop(key, None)
            owned.discard(key)
            if key in fresh:
                observed[key] = fresh[key]
                if key.address in self._vips:
                    have[key] = fresh[key]
                    owned.add(key)
                elif key in want:
                    errors.append(_foreign(want.pop(key)))
        return diff({k: want[k] for k in again if k in want}, {k: have[k] for k in again if k in have},
                    owned & again)

    def _write(
        self, view: _View, ops: list[Operation], errors: list[DataplaneError], *, full: bool
    ) -> list[Operation]:
        """Run ``ops``, then bring the mirror and the VIPs in line; returns the operations
        the kernel took."""
        failures = self._kernel.execute(ops)
        failed_ops = {id(f.operation) for f in failures}
        errors.extend(_error(f) for f in failures)
        done = [op for op in ops if id(op) not in failed_ops]
        applied = _apply_lenient(view.have, done)
        # Owners from the desired table: the kernel stores none.
        for key, vs in applied.items():
            if key in view.want:
                applied[key] = _owned(vs, view.want[key])
        if full:
            self._reset_mirror()
            self._replace({}, view.kept)
        self._replace(view.have, applied)
        clear_stale(self.conntrack, view.have, applied)  # view.have: kernel or mirror, as it was
        present = {**view.kept, **applied} if view.kept else applied
        errors.extend(self._sync_vips(present, set(view.have) - set(applied), full=full))
        return done

    def _reset_mirror(self) -> None:
        self._mirror.clear()
        self._vip_users.clear()

    def cleanup_blocking(self) -> SyncResult:
        start = time.monotonic()
        errors: list[DataplaneError] = []
        ops: list[Operation] = []
        if self._caps.available:
            vips = self._addresses.addresses(self._interface)
            observed = self._kernel.dump()
            ops = [Operation(OpKind.DELETE_VS, v) for k, v in observed.items() if k.address in vips]
            errors.extend(_error(f) for f in self._kernel.execute(ops))
        self._addresses.delete_interface(self._interface)
        if self._unprepare is not None:
            self._unprepare()
        self._reset_mirror()
        self._vips.clear()
        self._synced = False
        return SyncResult(
            MODE, True, count_kinds(ops), tuple(errors), frozenset(), time.monotonic() - start
        )

    # Internals.

    def _programmable(
        self, desired: Table, only: frozenset[str] | None
    ) -> tuple[dict[VSKey, VirtualServer], list[DataplaneError]]:
        want: dict[VSKey, VirtualServer] = {}
        refused: list[DataplaneError] = []
        for key, vs in desired.items():
            if only is not None and vs.owner not in only:
                continue
            if vs.scheduler not in self._caps.schedulers:
                refused.append(
                    SchedulerUnavailableError(
                        f"{key}: IPVS scheduler {vs.scheduler!r} does not load on this node"
                        f" (modprobe ip_vs_{vs.scheduler}); usable:"
                        f" {', '.join(sorted(self._caps.schedulers))}",
                        owner=vs.owner,
                    )
                )
                continue
            want[key] = vs
        return want, refused

    def _adopt(self) -> None:
        """First sync was partial: learn what we own in the kernel (no sweep)."""
        self._addresses.ensure_interface(self._interface)
        vips = self._addresses.addresses(self._interface)
        self._vips = set(vips)
        observed = self._kernel.dump()
        self._replace({}, {k: v for k, v in observed.items() if k.address in vips})

    def _replace(self, old: Table, new: dict[VSKey, VirtualServer]) -> None:
        for key in old:
            if self._mirror.drop(key) is not None:
                self._vip_users[key.address] -= 1
        for key, vs in new.items():
            if self._mirror.put(key, vs) is None:
                self._vip_users[key.address] += 1

    def _sync_vips(self, present: Table, gone: set[VSKey], full: bool) -> list[DataplaneError]:
        """Add VIPs of present virtual servers, drop VIPs no virtual server uses."""
        have = self._vips
        add = sorted({k.address for k in present} - have)
        drop = sorted({k.address for k in gone if self._vip_users[k.address] <= 0} & have)
        if full:  # also addresses left on the interface without any virtual server
            drop = sorted(a for a in have if self._vip_users[a] <= 0)
        for vip in drop:
            self._vip_users.pop(vip, None)
        # In place: a new set per sync would copy every VIP (O(services) per change).
        have.update(add)
        have.difference_update(drop)
        errors: list[DataplaneError] = []
        # No request at all when nothing changes (the common endpoint change): even an
        # empty address update costs an interface lookup per address.
        for vip in self._addresses.add_addresses(self._interface, add) if add else ():
            have.discard(vip)
            errors.append(KernelError(f"could not add VIP {vip} to {self._interface}"))
        for vip in self._addresses.delete_addresses(self._interface, drop) if drop else ():
            errors.append(KernelError(f"could not remove VIP {vip} from {self._interface}"))
        return errors


def _owned(have: VirtualServer, want: VirtualServer) -> VirtualServer:
    """What the mirror keeps of ``have`` (as the kernel holds it), owned as ``want``.

    When the kernel holds exactly what was wanted (the usual case after a full sync),
    the desired object itself: the mirror then shares the agent's real servers instead
    of keeping a second copy read back from the kernel.
    """
    if have.real_servers == want.real_servers and have.same_service(want):
        return want
    return replace(have, owner=want.owner)


def _apply_lenient(table: Table, ops: Sequence[Operation]) -> dict[VSKey, VirtualServer]:
    out = dict(table)
    for op in ops:
        try:
            apply_one(out, op)  # in place: a copy per operation would be O(ops x services)
        except (KeyError, ValueError):
            continue  # the kernel refused it too; reported as a failure already
    return out


def _foreign(vs: VirtualServer) -> DataplaneError:
    return ForeignObjectError(
        f"{vs.key} already exists in IPVS and was not created by svcproxy (its VIP is not on"
        " svcproxy0): remove it or pick another ClusterIP",
        owner=vs.owner,
    )


def _error(failure: Failure) -> DataplaneError:
    op = failure.operation
    if op.kind is OpKind.ADD_VS and failure.errno == errno.EEXIST:
        return _foreign(op.virtual_server)
    if op.kind in (OpKind.ADD_VS, OpKind.UPDATE_VS) and failure.errno == errno.ENOENT:
        return SchedulerUnavailableError(
            f"{op.key}: IPVS refused scheduler {op.virtual_server.scheduler!r} (ENOENT):"
            " its module does not load on this node",
            owner=op.owner,
        )
    return KernelError(
        f"IPVS refused {op}: {failure.message} (errno {failure.errno}); retried on the next sync",
        owner=op.owner,
        errno=failure.errno,
    )
