"""The ``iptables`` mode: kube-proxy-style NAT chains applied with iptables-restore.

Built by :func:`svcproxy.dataplane.modes.build_proxier` (``create``). A full
sync reads the nat and filter tables back (one iptables-save, streamed: only
our chains and jumps are kept, most chains as a digest), compares our chains
with the desired ones per chain (``drift.py``) and restores only the
services whose chains differ, stale owned chains and jumps, and drifted base
chains, with ``iptables-restore --noflush`` (nothing at all in the steady
state). The first full sync after start, or one whose read-back does not
parse, rewrites every chain this mode owns, in batches of whole services
(see ``_full``). A partial sync rewrites only the changed services' chains
and adds/removes their single jump rule in ``SVCPROXY-SERVICES`` (node ports:
``SVCPROXY-NODEPORTS``), against an
in-memory mirror (the agent's cost is independent of the number of services;
the kernel's commit is not). Services with no ready endpoint get a REJECT
rule in the filter chain ``SVCPROXY-NO-ENDPOINTS``. Other chains and tables
are never flushed. IPv4 and IPv6 virtual servers go to iptables and
ip6tables respectively. Rule text: ``rules.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from svcproxy.base import IPFamily, Mode
from svcproxy.dataplane.capabilities import ModeCapabilities, ModeCounts
from svcproxy.dataplane.conntrack import ConntrackCleaner, clear_stale
from svcproxy.dataplane.iptables import drift, rules
from svcproxy.dataplane.mirror import Mirror
from svcproxy.dataplane.nfkernel import NetfilterKernel, SavedTable, names_only
from svcproxy.dataplane.proxier import (
    Between,
    BlockingProxier,
    DataplaneError,
    SyncResult,
    read_beside,
)
from svcproxy.dataplane.table import Table, VirtualServer, VSKey

MODE: Mode = "iptables"
# Services per iptables-nft-restore input in a full sync (see IptablesProxier._full).
NFT_BATCH = 200


@dataclass
class FullStats:
    """What the last full sync restored (read by tests and benchmarks)."""

    rewrite_all: bool = False  # first sync after start, or a read-back that did not parse
    dirty_services: int = 0  # services whose chains were rewritten
    restores: int = 0  # iptables-restore inputs
    lines: int = 0  # lines in them


@dataclass(frozen=True)
class Prepared:
    """One address family's read-back and the plan made from it (see ``_prepare``)."""

    plan: drift.FullPlan
    nat_jumps: frozenset[str]  # our jumps in the nat and filter built-in chains, as read back
    filter_jumps: frozenset[str]
    rewrite_all: bool


class IptablesProxier(BlockingProxier):
    """One iptables proxier per node (see module docstring)."""

    MODE = MODE

    def __init__(
        self,
        netfilter: NetfilterKernel | None = None,
        netfilter6: NetfilterKernel | None = None,
        *,
        cluster_cidrs: tuple[str, ...] = ("10.244.0.0/16",),
        masquerade_all: bool = False,
        conntrack: ConntrackCleaner | None = None,
    ) -> None:
        super().__init__()
        if netfilter is None:  # the real tools (``create``); unit tests pass a fake
            from svcproxy.dataplane.netfilter import Netfilter

            netfilter = Netfilter()
            conntrack = conntrack or ConntrackCleaner()
        # Deletes the UDP/SCTP entries a sync leaves stale (None: never, e.g. a fake kernel).
        self.conntrack = conntrack
        self._nf = {False: netfilter, True: netfilter6 or netfilter.family(True)}
        backend, reason = netfilter.backend()
        self._cidrs = cluster_cidrs
        self._masq_all = masquerade_all
        self._mirror = Mirror(self._rule_count)
        self._synced = False
        self.last_full = FullStats()
        self._caps = ModeCapabilities(
            mode=MODE,
            available=bool(backend),
            reason=reason,
            schedulers=frozenset({"random"}),
            protocols=frozenset({"TCP", "UDP", "SCTP"}),
            backend=backend,
        )

    def counts(self) -> ModeCounts:
        mirror = self._mirror
        return ModeCounts(virtual_servers=len(mirror), real_servers=mirror.real_servers, rules=mirror.rules)

    def _rule_count(self, vs: VirtualServer) -> int:
        return rules.rule_count(vs, self._cidrs, self._masq_all)

    async def sync_full(self, desired: Table, between: Between) -> SyncResult:
        """A full sync whose read-back and planning do not hold up partial syncs.

        The agent calls this for its periodic full sync (``svcproxy.agent.agent``).
        iptables-save and the comparison run in a worker thread WITHOUT the write lock
        while ``between`` (the agent) applies the partial syncs that come due meanwhile
        (each takes the lock, so there is still one writer at a time); ``between``
        returns the owners it synced. The restore of what drifted then runs under the
        lock, minus those owners (their chains, jumps and reject rules are as the
        partial sync left them: newer than the read-back). The first full sync after
        start is a plain one (it rewrites everything, nothing runs beside it).
        """
        if not self._synced or not self._caps.available:
            return await self.sync(desired, None)
        families = [v6 for v6 in (False, True) if v6 is False or self._has_family(desired, v6)]

        def prepare() -> dict[bool, Prepared]:
            prepared: dict[bool, Prepared] = {}
            for v6 in families:
                with contextlib.suppress(DataplaneError):  # sync_blocking reads again and reports
                    want = {k: v for k, v in desired.items() if IPFamily.is_v6(k.address) == v6}
                    prepared[v6] = self._prepare(v6, want)
            return prepared

        prepared, touched = await read_beside(prepare, between, self._nf[False].read_beside_for)
        async with self._lock:
            return await asyncio.to_thread(self.sync_blocking, desired, None, prepared, touched)

    def _has_family(self, desired: Table, v6: bool) -> bool:
        return any(IPFamily.is_v6(k.address) == v6 for k in desired) or any(
            IPFamily.is_v6(k.address) == v6 for k in self._mirror
        )

    def sync_blocking(
        self,
        desired: Table,
        only: frozenset[str] | None = None,
        prepared: Mapping[bool, Prepared] | None = None,
        touched: frozenset[str] = frozenset(),
    ) -> SyncResult:
        """``prepared``/``touched``: see :meth:`sync_full` (full syncs only)."""
        start = time.monotonic()
        full = only is None or not self._synced
        if not self._caps.available:
            return self._unavailable(desired, full, start, "iptables mode")
        errors: list[DataplaneError] = []
        failed: set[str] = set()
        ops: dict[str, int] = defaultdict(int)
        if only is None:
            self.last_full = FullStats()
        known = self._synced  # the mirror holds what the kernel had: stale flows are known
        for v6 in (False, True):
            tables = self._family(v6, desired, only, touched)
            if tables is None:
                continue  # no IPv6 services: leave ip6tables alone
            want, have = tables
            try:
                if only is None:
                    self._full(v6, want, (prepared or {}).get(v6), touched)
                    for key in set(have) - set(want):
                        self._forget(key)
                    ops["delete_virtual_server"] += len(set(have) - set(want))
                else:
                    self._partial(v6, want, have)
                    for key in set(have) - set(want):
                        self._forget(key)
                    ops["delete_virtual_server"] += len(set(have) - set(want))
            except DataplaneError as err:
                errors.append(err)
                failed |= {v.owner for v in want.values()} | {v.owner for v in have.values()}
                continue
            if known:
                clear_stale(self.conntrack, have, want)
            for key, vs in want.items():
                old = have.get(key)
                if old is None:
                    ops["add_virtual_server"] += 1
                elif old != vs:
                    ops["update_virtual_server"] += 1
                self._remember(vs)
        if only is None:
            self._synced = True
        return SyncResult(
            MODE,
            full,
            {k: n for k, n in ops.items() if n},
            tuple(errors),
            frozenset(failed),
            time.monotonic() - start,
            self.counts(),
        )

    def _family(
        self, v6: bool, desired: Table, only: frozenset[str] | None, touched: frozenset[str]
    ) -> tuple[dict[VSKey, VirtualServer], dict[VSKey, VirtualServer]] | None:
        """One address family's desired services and what the mirror has of them (all,
        or the given owners'); None for IPv6 when neither has any."""
        if only is None:
            want = {k: v for k, v in desired.items() if IPFamily.is_v6(k.address) == v6}
            have = {k: v for k, v in self._mirror.items() if IPFamily.is_v6(k.address) == v6}
            if not want and not have and v6:
                return None
            if touched:  # synced by a partial sync during this one: left alone
                want = {k: v for k, v in want.items() if v.owner not in touched}
                have = {k: v for k, v in have.items() if v.owner not in touched}
            return want, have
        want = {k: v for k, v in desired.items() if v.owner in only and IPFamily.is_v6(k.address) == v6}
        keys = self._mirror.keys_of(only)
        keys |= {k for k in want if k in self._mirror}
        return want, {k: self._mirror[k] for k in keys if IPFamily.is_v6(k.address) == v6}

    def cleanup_blocking(self) -> SyncResult:
        start = time.monotonic()
        errors: list[DataplaneError] = []
        count = len(self._mirror)
        if self._caps.available:
            for v6 in (False, True):
                nf = self._nf[v6]
                try:
                    saved = nf.read(("nat",), rules.PREFIX, names_only)["nat"]
                    ours = [c for c in saved.chains if rules.owned_chain(c)]
                    out = ["*nat"]
                    out += [f"-D {j.chain} {j.rule}" for j in rules.JUMPS if j.line in saved.jumps]
                    out += [f":{c} - [0:0]" for c in ours]
                    out += [f"-X {c}" for c in ours]
                    if len(out) > 1:
                        nf.restore("\n".join(out) + "\nCOMMIT\n")
                    nf.remove("filter", rules.NO_ENDPOINTS, rules.FILTER_JUMPS)
                except DataplaneError as err:
                    if not v6:
                        errors.append(err)
        self._mirror.clear()
        self._synced = False
        ops = {"delete_virtual_server": count} if count else {}
        return SyncResult(MODE, True, ops, tuple(errors), frozenset(), time.monotonic() - start)

    # Internals.

    def _remember(self, vs: VirtualServer) -> None:
        self._mirror.put(vs.key, vs)

    def _forget(self, key: VSKey) -> None:
        self._mirror.drop(key)

    def _service_lines(self, servers: Iterable[VirtualServer]) -> tuple[list[str], list[str]]:
        chains: list[str] = []
        body: list[str] = []
        for vs in servers:
            chains += rules.chains_of(vs)
            body += rules.service_rules(vs, self._cidrs, self._masq_all)
        return [f":{c} - [0:0]" for c in chains], body

    def _observe(self, v6: bool, reader: drift.Reader) -> dict[str, SavedTable[drift.Chain]]:
        """Our chains of the nat and filter tables, as ``reader`` keeps them, and our
        jumps, from one streamed iptables-save (a read: no lock needed)."""
        return self._nf[v6].read(("nat", "filter"), rules.PREFIX, reader, reader.keep)

    def _prepare(self, v6: bool, want: dict[VSKey, VirtualServer]) -> Prepared:
        """Read back and plan: no write, no mirror access.

        After the first sync the per-service chains are first read back as sums
        (``drift.Summary``: nothing held per chain); only when they differ from the
        desired chains' (drift) is the table read again, keeping a digest per chain
        of the groups that differ."""
        servers = [want[k] for k in sorted(want)]
        reader = drift.Reader(summarise=self._synced)
        while True:
            saved = self._observe(v6, reader)
            rewrite_all = not self._synced
            try:
                nat = drift.observed(saved["nat"])
                filter_rules = drift.multiset(drift.observed(saved["filter"]), rules.NO_ENDPOINTS)
            except drift.SavedParseError:
                if reader.summary is not None or reader.groups is not None:
                    reader = drift.Reader(summarise=False)  # the rewrite needs every chain's name
                    continue
                # Compare nothing (rewrite everything); what did parse still names the
                # chains and jumps to sweep.
                rewrite_all = True
                nat, filter_rules = saved["nat"].chains, None
            plan = drift.plan_full(
                servers, nat, filter_rules, self._cidrs, self._masq_all, rewrite_all=rewrite_all,
                summary=reader.summary, groups=reader.groups,
            )
            if isinstance(plan, drift.FullPlan):
                break
            reader = drift.Reader(summarise=False, groups=plan.groups)
        return Prepared(plan, frozenset(saved["nat"].jumps), frozenset(saved["filter"].jumps), rewrite_all)

    def _full(
        self,
        v6: bool,
        want: dict[VSKey, VirtualServer],
        prepared: Prepared | None = None,
        touched: frozenset[str] = frozenset(),
    ) -> None:
        """Restore only the chains that differ from the desired ones (see ``drift``).

        The first full sync after start, and any full sync whose read-back does not
        parse, rewrites every chain of ours (restart safety: nothing is trusted). Big
        rewrites go in batches: iptables-nft-restore's own work grows with the square
        of the chains in one input, so nft gets batches of ``NFT_BATCH``
        services. Each service (its chains and its jump) is in one batch, so each
        changes atomically; the jump chain SVCPROXY-SERVICES is never flushed (that
        would cut services whose batch comes later): missing jumps are appended, stale
        ones deleted in the last batch with the chains nobody needs. The -legacy tools
        replace the whole table on every commit, so there one batch is cheapest. A
        steady-state full sync restores nothing. ``prepared``: read back and planned
        earlier (:meth:`sync_full`); ``touched``: owners a partial sync wrote since
        then, left as the partial left them (``want`` holds none of theirs).
        """
        nf = self._nf[v6]
        prepared = prepared or self._prepare(v6, want)
        plan, rewrite_all = prepared.plan, prepared.rewrite_all
        if touched:
            kept = [self._mirror[k] for k in self._mirror.keys_of(touched)]
            kept = [vs for vs in kept if IPFamily.is_v6(vs.address) == v6]
            rejects = [r for vs in [*want.values(), *kept] if (r := rules.reject_rule(vs))]
            keep = {c for vs in kept for c in rules.chains_of(vs)}
            plan = drift.without_owners(plan, touched, keep, rejects)
        self.last_full.rewrite_all |= rewrite_all
        self.last_full.dirty_services += len(plan.dirty)
        size = (len(plan.dirty) or 1) if nf.legacy else NFT_BATCH
        for start in range(0, max(len(plan.dirty), 1), size):
            part = plan.dirty[start : start + size]
            text = self._batch(plan, part, first=start == 0, last=start + size >= len(plan.dirty))
            if len(text) > 1:
                batch = "\n".join([*text, "COMMIT"]) + "\n"
                nf.restore(batch)
                self.last_full.restores += 1
                self.last_full.lines += len(text) + 1
        nf.ensure_jumps(rules.JUMPS, prepared.nat_jumps)
        nf.ensure_jumps(rules.FILTER_JUMPS, prepared.filter_jumps)

    def _batch(
        self, plan: drift.FullPlan, part: list[VirtualServer], *, first: bool, last: bool
    ) -> list[str]:
        """The lines of one batch of a full sync (without the final COMMIT): the base
        chains in the first, the services of ``part``, the sweep in the last."""
        declare, body = self._service_lines(part)
        text = ["*nat"]
        if first:
            text += [f":{c} - [0:0]" for c in rules.BASE_CHAINS if plan.declares(c)]
        text += declare
        if last:
            text += [f":{c} - [0:0]" for c in plan.stale]
        if first and plan.base:
            text += rules.base_rules()
        jumps = [rules.service_jump(vs) for vs in part]
        text += [j for j in jumps if drift.normalise(j) in plan.add_jumps]
        text += body
        if last:
            text += plan.delete_jumps
            text += [f"-X {c}" for c in plan.stale]
            if plan.filter_rules is not None:
                text += ["COMMIT", "*filter", f":{rules.NO_ENDPOINTS} - [0:0]", *plan.filter_rules]
        return text

    def _partial(self, v6: bool, want: dict[VSKey, VirtualServer], have: dict[VSKey, VirtualServer]) -> None:
        changed = [want[k] for k in sorted(want) if have.get(k) != want[k]]
        gone = [have[k] for k in sorted(have) if k not in want]
        if not changed and not gone:
            return
        present: set[str] = set()
        base: list[str] = []  # declarations of missing base chains
        base_rules: list[str] = []
        filter_present: set[str] | None = None  # None: the mirror knows the filter rules
        if not self._synced:
            # Partial sync before any full one (agent restart): adopt, never flush.
            saved = self._jump_chains(v6)
            present = {rules.same_rule(line) for c in rules.JUMP_CHAINS for line in saved.get(c, ())}
            if rules.SERVICES not in saved:
                base = [f":{c} - [0:0]" for c in rules.BASE_CHAINS]
                base_rules = rules.base_rules()
            elif rules.NODEPORTS not in saved:  # written by a version without node ports
                base = [f":{rules.NODEPORTS} - [0:0]"]
            filter_present = self._adopt_filter(v6)
        rejects = self._reject_lines(changed, gone, have, filter_present)
        declare, body = self._service_lines(changed)
        needed = {line[1:].split(" ")[0] for line in declare}
        jumps: list[str] = []
        drop: list[str] = []
        for vs in changed:
            old = have.get(vs.key)
            # The jump changes with the owner, and with source ranges coming or going.
            if old is None or rules.service_jump(old) != rules.service_jump(vs):
                if old is not None:
                    jumps.append("-D" + rules.service_jump(old)[2:])
                if rules.same_rule(rules.service_jump(vs)) not in present:
                    jumps.append(rules.service_jump(vs))
            if old is not None:
                drop += [c for c in rules.chains_of(old) if c not in needed]
        for vs in gone:
            jumps.append("-D" + rules.service_jump(vs)[2:])
            drop += rules.chains_of(vs)
        text = [
            "*nat",
            *base,
            *declare,
            *[f":{c} - [0:0]" for c in drop],
            *base_rules,
            *jumps,
            *body,
            *[f"-X {c}" for c in drop],
            "COMMIT",
        ]
        if rejects:
            text += ["*filter", *rejects, "COMMIT"]
        self._nf[v6].restore("\n".join(text) + "\n")
        if base:
            self._nf[v6].ensure_jumps(rules.JUMPS)

    def _jump_chains(self, v6: bool) -> dict[str, list[str]]:
        """SVCPROXY-SERVICES and SVCPROXY-NODEPORTS as saved (a chain that is missing is
        not in the result), from one iptables-save."""
        saved = self._nf[v6].read(("nat",), rules.PREFIX, _jump_rules, _is_jump_chain)
        return saved["nat"].chains

    def _reject_lines(
        self,
        changed: list[VirtualServer],
        gone: list[VirtualServer],
        have: dict[VSKey, VirtualServer],
        present: set[str] | None,
    ) -> list[str]:
        """filter-table edits for services that gained or lost their last ready endpoint."""
        lines: list[str] = []
        pairs = [(have.get(vs.key), vs) for vs in changed] + [(vs, None) for vs in gone]
        for old, new in pairs:
            before = rules.reject_rule(old) if old is not None else None
            after = rules.reject_rule(new) if new is not None else None
            if present is None:  # the mirror says what the chain holds
                if before != after:
                    lines += (["-D" + before[2:]] if before else []) + ([after] if after else [])
                continue
            if before and before != after and rules.same_rule(before) in present:
                lines.append("-D" + before[2:])
            if after and rules.same_rule(after) not in present:
                lines.append(after)
        return lines

    def _adopt_filter(self, v6: bool) -> set[str]:
        """The filter chain's rules now (made, with its jumps, if missing); not flushed."""
        nf = self._nf[v6]
        chains = nf.chains("filter", rules.NO_ENDPOINTS)
        if rules.NO_ENDPOINTS not in chains:
            nf.restore(f"*filter\n:{rules.NO_ENDPOINTS} - [0:0]\nCOMMIT\n")
        nf.ensure_jumps(rules.FILTER_JUMPS)
        return {rules.same_rule(line) for line in chains.get(rules.NO_ENDPOINTS, [])}


def _is_jump_chain(name: str) -> bool:
    return name in rules.JUMP_CHAINS


def _jump_rules(name: str, lines: list[str]) -> list[str]:
    """A scan fold keeping the jump chains' rules; the per-service chains (folded too, not
    kept) cost no copy."""
    return list(lines) if name in rules.JUMP_CHAINS else []


def create(config: object) -> IptablesProxier:
    """The real-kernel proxier (called by ``modes.build_proxier``)."""
    return IptablesProxier(
        cluster_cidrs=tuple(getattr(config, "cluster_cidrs", ("10.244.0.0/16",))),
        masquerade_all=bool(getattr(config, "masquerade_all", False)),
    )
