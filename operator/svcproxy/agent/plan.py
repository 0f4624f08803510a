"""What one agent sync does, as a pure plan: which mode gets which owners, what moves.

:func:`plan_sync` takes the batch's owners, their routed placements (the desired
table, split by effective mode) and the agent's :class:`Holdings` (one mirror of
what each mode holds per owner, and which owner claims each key), and returns a
:class:`SyncPlan`: the keys refused for being another owner's, the keys moving between
modes, and the order of modes. The executor in :mod:`svcproxy.agent.agent` asks
the plan for each step (:meth:`SyncPlan.make`, then :meth:`SyncPlan.withdraw` for
make-before-break) and for what each mode holds afterwards (:meth:`SyncPlan.held`).
No I/O and no clock here, so unit tests check plans directly.
"""

from __future__ import annotations

from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass, field, replace

from svcproxy.base import Mode
from svcproxy.dataplane.table import VirtualServer, VSKey

MODE_ORDER: tuple[Mode, ...] = ("iptables", "userspace", "ipvs")

Placement = dict[Mode, dict[VSKey, VirtualServer]]
"""Effective mode -> that mode's virtual servers of one owner."""

Moving = dict[Mode, dict[str, dict[VSKey, VirtualServer]]]
"""Old mode -> owner -> the keys leaving that mode for another one."""


@dataclass
class Holdings:
    """The agent's one mirror of the modes: what each holds of each owner (as far as
    the agent knows), and the owner that claims each key per mode (claims follow the
    plan, holdings follow the results). Pure data; cheap per owner."""

    placement: dict[str, Placement] = field(default_factory=dict)
    key_owner: dict[Mode, dict[VSKey, str]] = field(default_factory=dict)

    def held(self, owner: str) -> Placement:
        return self.placement.get(owner, {})

    def hold(self, owner: str, placement: Placement) -> None:
        if placement:
            self.placement[owner] = placement
        else:
            self.placement.pop(owner, None)

    def release(self, owner: str, placement: Placement) -> None:
        """Drop ``owner``'s claims on the keys of ``placement``."""
        for mode, servers in placement.items():
            index = self.key_owner.get(mode, {})
            for key in servers:
                if index.get(key) == owner:
                    del index[key]

    def claim(self, owner: str, placement: Placement) -> None:
        for mode, servers in placement.items():
            index = self.key_owner.setdefault(mode, {})
            for key in servers:
                index[key] = owner

    def apply(self, claims: Mapping[Mode, Mapping[VSKey, str | None]]) -> None:
        """Apply a plan's claim changes (``None``: released)."""
        for mode, changes in claims.items():
            index = self.key_owner.setdefault(mode, {})
            for key, owner in changes.items():
                if owner is None:
                    index.pop(key, None)
                else:
                    index[key] = owner


@dataclass(frozen=True)
class SyncStep:
    """One proxier call: ``desired`` for ``mode``; ``only`` is None for a full sync.
    ``owners``: whose outcome the result decides."""

    mode: Mode
    desired: dict[VSKey, VirtualServer]
    only: frozenset[str] | None
    owners: frozenset[str]


@dataclass(frozen=True)
class SyncPlan:
    full: bool
    owners: frozenset[str]
    old: Mapping[str, Placement]  # what each mode held of each owner before
    new: Mapping[str, Placement]  # what each mode should hold after
    moving: Mapping[Mode, Mapping[str, dict[VSKey, VirtualServer]]]
    modes: tuple[Mode, ...]  # phase 1 order
    proxier_modes: frozenset[Mode]
    claims: Mapping[Mode, Mapping[VSKey, str | None]]  # key_owner changes
    conflicts: Mapping[str, str]  # owner -> why a key was refused
    conflicted: frozenset[str]  # every owner refused a key, after this sync
    unblock: frozenset[str]  # owners refused earlier that a released key may now let in

    def make(self, mode: Mode) -> SyncStep | None:
        """Phase 1 for ``mode``: the new placement, plus keys moving out of it (they stay
        until their new mode holds them)."""
        desired: dict[VSKey, VirtualServer] = {}
        only: set[str] = set()
        for owner in self.owners:
            desired.update(self.new[owner].get(mode, {}))
            if self.new[owner].get(mode) or self.old[owner].get(mode):
                only.add(owner)
        for moved in self.moving.get(mode, {}).values():
            for key, vs in moved.items():
                desired.setdefault(key, vs)
        if not self.full and not only:
            return None
        if self.full and mode not in self.proxier_modes and not desired:
            return None
        return SyncStep(mode, desired, None if self.full else frozenset(only), frozenset(only))

    def withdrawals(self, failed: Container[str]) -> list[SyncStep]:
        """Phase 2: withdraw moved keys from their old mode, only for owners whose
        make succeeded."""
        steps: list[SyncStep] = []
        for mode in sorted(self.moving, key=_mode_rank):
            ready = frozenset(o for o in self.moving[mode] if o not in failed)
            if ready:
                desired = {k: v for o in ready for k, v in self.new[o].get(mode, {}).items()}
                steps.append(SyncStep(mode, desired, ready, ready))
        return steps

    def held(self, owner: str, ok_modes: Container[Mode], withdrawn: bool) -> Placement:
        """What the modes hold of ``owner``: the new placement where its sync went
        through (``ok_modes``; plus keys still moving out unless ``withdrawn``), the
        old one elsewhere (unknown: the next full sync re-reads)."""
        new, old = self.new[owner], self.old[owner]
        placement: Placement = {}
        for mode in set(new) | set(old):
            if mode in ok_modes:
                held = dict(new.get(mode, {}))
                if not withdrawn:
                    held.update(self.moving.get(mode, {}).get(owner, {}))
            else:
                held = dict(old.get(mode, {}))
            if held:
                placement[mode] = held
        return placement

    def taken_over(self, owners: Collection[str], now: Mapping[str, Placement]) -> SyncPlan:
        """The plan for the rest of a full sync once partial syncs took ``owners`` over:
        they continue from what those left (``now``) and nothing of theirs moves."""
        if not owners:
            return self
        new, old = dict(self.new), dict(self.old)
        for owner in owners:
            if owner in new:
                new[owner] = old[owner] = dict(now.get(owner, {}))
        moving = {
            mode: rest
            for mode, by_owner in self.moving.items()
            if (rest := {o: keys for o, keys in by_owner.items() if o not in owners})
        }
        return replace(self, new=new, old=old, moving=moving)


def _mode_rank(mode: Mode) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def plan_sync(
    *,
    full: bool,
    owners: Iterable[str],
    routed: Mapping[str, Placement],
    holdings: Holdings,
    live: Container[str],
    conflicted: frozenset[str],
    proxier_modes: Collection[Mode],
) -> SyncPlan:
    """Plan one sync of ``owners``. ``routed``: each owner's desired placement (absent:
    withdraw it); ``live``: owners that have a program (only they hold keys against
    others); ``conflicted``: owners refused a key before."""
    owners = frozenset(owners)
    old = {o: holdings.held(o) for o in owners}
    claims = _released(owners, old, holdings)
    new, conflicts = _claim(sorted(owners), routed, holdings, claims, live)
    released = any(k not in new[o].get(m, {}) for o in owners for m, s in old[o].items() for k in s)
    modes = tuple(m for m in MODE_ORDER if m in proxier_modes or any(m in p for p in new.values()))
    return SyncPlan(
        full=full,
        owners=owners,
        old=old,
        new=new,
        moving=_moving(owners, old, new),
        modes=modes,
        proxier_modes=frozenset(proxier_modes),
        claims=claims,
        conflicts=conflicts,
        conflicted=(conflicted - owners) | frozenset(conflicts),
        unblock=conflicted - owners if released else frozenset(),
    )


def _released(
    owners: frozenset[str], old: Mapping[str, Placement], holdings: Holdings
) -> dict[Mode, dict[VSKey, str | None]]:
    """Claim changes that drop each owner's claims on what it held."""
    claims: dict[Mode, dict[VSKey, str | None]] = {}
    for owner in owners:
        for mode, servers in old[owner].items():
            index = holdings.key_owner.get(mode, {})
            for key in servers:
                if index.get(key) == owner:
                    claims.setdefault(mode, {})[key] = None
    return claims


def _claim(
    owners: list[str],
    routed: Mapping[str, Placement],
    holdings: Holdings,
    claims: dict[Mode, dict[VSKey, str | None]],
    live: Container[str],
) -> tuple[dict[str, Placement], dict[str, str]]:
    """Each owner's placement minus keys a live other owner claims (in ``owners``
    order, so the first one keeps a contested key); adds the claims to ``claims``."""
    new: dict[str, Placement] = {}
    conflicts: dict[str, str] = {}
    for owner in owners:
        placement: Placement = {}
        for mode, servers in routed.get(owner, {}).items():
            changes = claims.setdefault(mode, {})
            index = holdings.key_owner.get(mode, {})
            kept: dict[VSKey, VirtualServer] = {}
            for key, vs in servers.items():
                holder = changes[key] if key in changes else index.get(key)
                if holder is not None and holder != owner and holder in live:
                    conflicts[owner] = (
                        f"{key} is already programmed by {holder}: one VIP:port/protocol can belong"
                        " to one ProxyVirtualServer only; remove it from one of them"
                    )
                    continue
                kept[key] = vs
            for key in kept:
                changes[key] = owner
            if kept:
                placement[mode] = kept
        new[owner] = placement
    return new, conflicts


def _moving(owners: Iterable[str], old: Mapping[str, Placement], new: Mapping[str, Placement]) -> Moving:
    """Keys that change mode: they stay in their old mode until the new one holds them."""
    moving: Moving = {}
    for owner in owners:
        new_keys = {k: m for m, s in new[owner].items() for k in s}
        for mode, servers in old[owner].items():
            moved = {k: v for k, v in servers.items() if k in new_keys and new_keys[k] != mode}
            if moved:
                moving.setdefault(mode, {})[owner] = moved
    return moving
