"""The netfilter kernel surface the iptables and userspace proxiers (and the ipvs node
setup) need, as a protocol, with the iptables-save format it is read in.

:class:`NetfilterKernel` is what a proxier holds: restore one atomic
``iptables-restore --noflush`` batch, read back our chains and the jumps into them,
insert missing jumps, remove what a mode owns, and say which backend runs. Two
implementations: ``netfilter.Netfilter`` runs the real tools, ``nffake.FakeNetfilter``
keeps the tables in memory; one conformance suite (``tests/dataplane/nf_cases.py``)
runs on both. Reads stream iptables-save's lines through :func:`scan`, which keeps
only what a caller asks for; :class:`SaveRestore` builds every read and write on two
primitives (save lines, restore a batch), so both implementations share them. Pure:
no subprocess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# Every chain of the project starts with this (DESIGN: netfilter chains); the jumps
# into them from built-in chains are what scan() keeps of the built-in chains.
PROJECT_PREFIX = "SVCPROXY-"
_TARGETS = (f"-j {PROJECT_PREFIX}", f"-g {PROJECT_PREFIX}")


def _jumps_to_project(spec: str) -> bool:
    """Whether a rule's spec jumps (or goes) to a project chain."""
    return _TARGETS[0] in spec or _TARGETS[1] in spec


T = TypeVar("T")


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of our chains."""

    table: str
    chain: str  # built-in chain (PREROUTING, OUTPUT, POSTROUTING)
    rule: str  # rule spec after "-A CHAIN ", e.g. "-m comment --comment svcproxy -j SVCPROXY-SERVICES"

    def __post_init__(self) -> None:
        # scan() keeps only the built-in rules that name a project chain: a jump elsewhere
        # would never be seen as present and be inserted again on every sync.
        if not _jumps_to_project(self.rule):
            raise ValueError(f"jump {self.rule!r} targets no {PROJECT_PREFIX}* chain")

    @property
    def line(self) -> str:
        """The rule as iptables-save prints it."""
        return f"-A {self.chain} {self.rule}"


@dataclass
class SavedTable(Generic[T]):
    """What :func:`scan` keeps of one table of iptables-save's output."""

    present: bool = False  # the table was in the output (a table nothing created is not)
    chains: dict[str, T] = field(default_factory=dict)  # chains under the prefix -> fold(name, rules)
    jumps: set[str] = field(default_factory=set)  # rules of built-in chains jumping to a project chain
    problem: str | None = None  # the first thing a strict reader refuses, e.g. a cut-short table


_CHAIN = re.compile(r"^:(\S+) (\S+)")


def scan(
    lines: Iterable[str],
    tables: Collection[str],
    prefix: str | None,
    fold: Callable[[str, list[str]], T],
    keep: Callable[[str], bool] | None = None,
) -> dict[str, SavedTable[T]]:
    """iptables-save output -> per table in ``tables``: the chains whose name starts with
    ``prefix`` (None: none) as ``fold(name, their "-A" lines in order)``, the rules of
    built-in chains that jump to a project chain (exact lines), and whether it parsed.

    ``keep``: chains under the prefix for which it is False are folded but not kept,
    nor are their names: for a caller whose fold sums them up. ``fold`` sees such a
    chain at its declaration (with no rules) and once per run of its rules; the checks
    below that need the chain's name are the caller's to make (comparing its sums of
    declarations and runs with what it expects does).

    One pass; it holds one chain's lines at a time, never the output: iptables-save
    prints each chain's rules together, after every chain's declaration, and a table
    where that does not hold is flagged as a ``problem`` (as are an unknown line, a
    rule in an undeclared chain of ours, a table printed twice, a missing COMMIT).
    Lines of other tables, and rules of foreign chains, are skipped unread.
    """
    out = {t: SavedTable[T]() for t in tables}
    state = _Scan(out, prefix, fold, keep)
    rules = state.rules  # cleared in place, never replaced
    for line in lines:
        if line.startswith("-A ") and state.table is not None:  # most lines (320k at 10k Services)
            parts = line.split(" ", 2)
            name = parts[1] if len(parts) == 3 else ""
            if name == state.current:
                rules.append(line)
            else:
                state.rule(state.table, line, name, parts)
        elif line.startswith("*"):
            state.start(line)
        elif state.table is None:
            continue  # comments, and every line of a table nobody asked for
        elif line == "COMMIT":
            state.close(state.table)
            state.table = None
        elif match := _CHAIN.match(line):
            state.declare(match.group(1), match.group(2))
        elif line and not line.startswith("#"):
            _flag(state.table, f"unknown line in iptables-save output: {line!r}")
    if state.table is not None:
        _flag(state.table, "no COMMIT at the end of the table: the output was cut short")
        state.close(state.table)
    return out


def _flag(table: SavedTable[T], problem: str) -> None:
    """Keep the first problem of a table."""
    table.problem = table.problem or problem


class _Scan(Generic[T]):
    """:func:`scan`'s state between lines: the table being read, its declared chains
    of ours and built-in chains, and the chain of ours whose rules are being collected."""

    def __init__(
        self,
        out: dict[str, SavedTable[T]],
        prefix: str | None,
        fold: Callable[[str, list[str]], T],
        keep: Callable[[str], bool] | None,
    ) -> None:
        self.out, self.prefix, self.fold, self.keep = out, prefix, fold, keep
        self.table: SavedTable[T] | None = None
        self.kept: dict[str, T | None] = {}  # declared chains of ours; None until folded
        self.builtins: set[str] = set()
        self.current: str | None = None
        self.current_kept = False
        self.rules: list[str] = []

    def rule(self, table: SavedTable[T], line: str, name: str, parts: list[str]) -> None:
        """A rule of a chain other than the one being collected."""
        if self.prefix is not None and name.startswith(self.prefix):
            self.flush()
            self.current_kept = self.keep is None or self.keep(name)
            if self.current_kept and (name not in self.kept or self.kept[name] is not None):
                _flag(table, f"rules of chain {name} undeclared or apart: {line!r}")
            self.current = name
            self.rules.append(line)
        elif name in self.builtins:
            if _jumps_to_project(parts[2]):
                table.jumps.add(line)
        elif not name:
            _flag(table, f"rule without a chain and spec: {line!r}")

    def start(self, line: str) -> None:
        """A ``*table`` line."""
        if self.table is not None:  # a new table before this one's COMMIT
            _flag(self.table, "no COMMIT at the end of the table: the output was cut short")
            self.close(self.table)
        self.table = self.out.get(line[1:])
        if self.table is not None:
            if self.table.present:
                _flag(self.table, f"table {line} printed twice")
            self.table.present = True

    def declare(self, name: str, policy: str) -> None:
        """A ``:chain policy`` line."""
        if policy != "-":
            self.builtins.add(name)
        if self.prefix is not None and name.startswith(self.prefix):
            if self.keep is None or self.keep(name):
                self.kept[name] = None
            else:
                self.fold(name, [])

    def flush(self) -> None:
        if self.current is not None:
            value = self.fold(self.current, self.rules)
            if self.current_kept:
                self.kept[self.current] = value
            self.rules.clear()
            self.current = None

    def close(self, table: SavedTable[T]) -> None:
        self.flush()
        fold = self.fold
        table.chains = {name: fold(name, []) if value is None else value for name, value in self.kept.items()}
        self.kept.clear()
        self.builtins.clear()


def keep_rules(name: str, rules: list[str]) -> list[str]:
    """A :func:`scan` fold that keeps a chain's rule lines as they are."""
    del name
    return list(rules)


def names_only(name: str, rules: list[str]) -> None:
    """A :func:`scan` fold that keeps only the chain's name (the dict key)."""
    del name, rules


class NetfilterKernel(Protocol):
    """One address family's netfilter, as the proxiers use it (see module docstring)."""

    @property
    def legacy(self) -> bool:
        """The x_tables (-legacy) tools: each commit replaces a whole table."""
        ...

    @property
    def read_beside_for(self) -> float | None:
        """How long partial syncs may commit beside a read (None: unbounded)."""
        ...

    def backend(self) -> tuple[str, str]:
        """("iptables-nft" | "iptables-legacy", "") or ("", why netfilter is not usable)."""
        ...

    def family(self, ipv6: bool) -> NetfilterKernel:
        """The same node's netfilter for IPv4 (False) or IPv6 (True)."""
        ...

    def read(
        self,
        tables: Sequence[str],
        prefix: str | None,
        fold: Callable[[str, list[str]], T],
        keep: Callable[[str], bool] | None = None,
    ) -> dict[str, SavedTable[T]]:
        """``tables`` from one consistent read, through :func:`scan`."""
        ...

    def restore(self, text: str) -> None:
        """Apply one atomic batch (``*table`` ... ``COMMIT``) without flushing anything
        else; a refused batch changes nothing and raises ``KernelError``."""
        ...

    def chains(self, table: str, prefix: str) -> dict[str, list[str]]:
        """Our chains (name starts with ``prefix``) and their rules as saved."""
        ...

    def jumps(self, table: str) -> set[str]:
        """The rules of ``table``'s built-in chains that jump to a project chain."""
        ...

    def ensure_jumps(self, jumps: Iterable[Jump], present: Collection[str] | None = None) -> None:
        """Insert missing jump rules (first position) into built-in chains."""
        ...

    def remove(self, table: str, prefix: str, jumps: Iterable[Jump]) -> None:
        """Delete our jumps and every chain under ``prefix`` in ``table``."""
        ...


class SaveRestore:
    """Reads and writes of :class:`NetfilterKernel` on two primitives: ``save_lines``
    (iptables-save's output for some tables, streamed) and ``restore`` (one batch)."""

    def save_lines(self, tables: Sequence[str]) -> Iterator[str]:
        raise NotImplementedError

    def restore(self, text: str) -> None:
        raise NotImplementedError

    def read(
        self,
        tables: Sequence[str],
        prefix: str | None,
        fold: Callable[[str, list[str]], T],
        keep: Callable[[str], bool] | None = None,
    ) -> dict[str, SavedTable[T]]:
        """``tables`` from ONE save, streamed through :func:`scan` (see there for
        ``prefix``, ``fold`` and ``keep``). A table the kernel does not have yet comes
        back empty."""
        return scan(self.save_lines(tables), tables, prefix, fold, keep)

    def chains(self, table: str, prefix: str) -> dict[str, list[str]]:
        """Our chains (name starts with ``prefix``) and their rules as saved."""
        return self.read((table,), prefix, keep_rules)[table].chains

    def jumps(self, table: str) -> set[str]:
        """The rules of ``table``'s built-in chains that jump to a project chain."""
        return self.read((table,), None, names_only)[table].jumps

    def ensure_jumps(self, jumps: Iterable[Jump], present: Collection[str] | None = None) -> None:
        """Insert missing jump rules (first position) into built-in chains.

        ``present``: the jump rules the caller read already (:attr:`SavedTable.jumps` of
        the jumps' table, when all are in one table; saves one read)."""
        by_table: dict[str, list[Jump]] = {}
        for jump in jumps:
            by_table.setdefault(jump.table, []).append(jump)
        for table, items in by_table.items():
            have = present if present is not None and len(by_table) == 1 else self.jumps(table)
            missing = [j for j in items if j.line not in have]
            if missing:
                body = "\n".join(f"-I {j.chain} 1 {j.rule}" for j in missing)
                self.restore(f"*{table}\n{body}\nCOMMIT\n")

    def remove(self, table: str, prefix: str, jumps: Iterable[Jump]) -> None:
        """Delete our jumps and every chain under ``prefix`` in ``table``."""
        saved = self.read((table,), prefix, names_only)[table]
        out = [f"*{table}"]
        out += [f"-D {j.chain} {j.rule}" for j in jumps if j.line in saved.jumps]
        out += [f":{name} - [0:0]" for name in saved.chains]  # flush first: -X needs empty chains
        out += [f"-X {name}" for name in saved.chains]
        if len(out) > 1:
            self.restore("\n".join(out) + "\nCOMMIT\n")
