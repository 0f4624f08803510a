"""What one proxy mode has applied, indexed the way partial syncs need it.

Every proxier keeps one :class:`Mirror`: the virtual servers it programmed (as
the kernel took them), the keys of each owner, and running counts of real
servers and rules. A partial sync finds its owners' services through
:meth:`Mirror.keys_of` and ``counts()`` reads the totals, so neither scans the
table (that would make one change cost O(services)). Pure; used by the ipvs,
iptables and userspace proxiers, so none keeps an index of its own.
"""

from __future__ import annotations

from collections.abc import Callable, ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView

from svcproxy.dataplane.table import VirtualServer, VSKey


class Mirror(Mapping[VSKey, VirtualServer]):
    """key -> virtual server, with owner -> keys and running totals kept in step.

    ``rules``: how many kernel rules one virtual server takes (for ``rules``; modes
    without rules leave it out)."""

    def __init__(self, rules: Callable[[VirtualServer], int] | None = None) -> None:
        self._servers: dict[VSKey, VirtualServer] = {}
        self._by_owner: dict[str, set[VSKey]] = {}
        self._rules_of = rules
        self.real_servers = 0
        self.rules = 0

    # Mapping, at dict speed (the ABC's defaults go through __getitem__ and exceptions).
    def __getitem__(self, key: VSKey) -> VirtualServer:
        return self._servers[key]

    def __iter__(self) -> Iterator[VSKey]:
        return iter(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def __contains__(self, key: object) -> bool:
        return key in self._servers

    def get(self, key: VSKey, default: VirtualServer | None = None) -> VirtualServer | None:  # type: ignore[override]
        return self._servers.get(key, default)

    def keys(self) -> KeysView[VSKey]:
        return self._servers.keys()

    def values(self) -> ValuesView[VirtualServer]:
        return self._servers.values()

    def items(self) -> ItemsView[VSKey, VirtualServer]:
        return self._servers.items()

    # Updates.
    def put(self, key: VSKey, vs: VirtualServer) -> VirtualServer | None:
        """Hold ``vs`` at ``key``; returns what it replaced."""
        old = self.drop(key)
        self._servers[key] = vs
        self._by_owner.setdefault(vs.owner, set()).add(key)
        self.real_servers += len(vs.real_servers)
        if self._rules_of is not None:
            self.rules += self._rules_of(vs)
        return old

    def drop(self, key: VSKey) -> VirtualServer | None:
        """Forget ``key``; returns what was held there."""
        old = self._servers.pop(key, None)
        if old is not None:
            self.real_servers -= len(old.real_servers)
            if self._rules_of is not None:
                self.rules -= self._rules_of(old)
            keys = self._by_owner.get(old.owner)
            if keys is not None:
                keys.discard(key)
                if not keys:  # only this owner's entry: a sweep of all owners is O(services)
                    del self._by_owner[old.owner]
        return old

    def clear(self) -> None:
        self._servers.clear()
        self._by_owner.clear()
        self.real_servers = self.rules = 0

    def keys_of(self, owners: Iterable[str]) -> set[VSKey]:
        """The keys the given owners hold here."""
        return set().union(*(self._by_owner.get(o, ()) for o in owners))

    def owners(self) -> Mapping[str, set[VSKey]]:
        return self._by_owner
