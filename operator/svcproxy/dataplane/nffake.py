"""An in-memory netfilter: the stateful fake of :class:`~svcproxy.dataplane.nfkernel.NetfilterKernel`.

Used by the unit tests of the iptables and userspace proxiers (and of the agent with
those proxiers), which then run without root and without the tools. It keeps tables
of chains of rules, applies ``iptables-restore --noflush`` batches to them and prints
them as ``iptables-save`` does, so the proxiers' parsers and drift comparison read it
as they read the kernel. It refuses what the kernel refuses (a rule in or a jump to a
missing chain, deleting a rule that is not there, deleting a chain that is missing,
not empty or still jumped to), and a refused batch changes nothing. Rules are saved
as written, with the two rewrites the real tools make that the proxiers must cope
with: comments quoted unless they are a plain word, and ``--probability`` as the
kernel holds it (a 31-bit fraction). The conformance suite
(``tests/dataplane/nf_cases.py``) checks all of that against the real kernel.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from svcproxy.dataplane.nfkernel import SaveRestore
from svcproxy.dataplane.proxier import KernelError, ModeUnavailableError

BUILTIN: dict[str, tuple[str, ...]] = {
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}
# Targets that are extensions, not chains (what the proxiers and tests use, and a few more).
TARGETS = frozenset({
    "ACCEPT", "DROP", "RETURN", "REJECT", "DNAT", "SNAT", "MASQUERADE", "REDIRECT", "MARK",
    "CONNMARK", "LOG", "NOTRACK", "CT",
})
_PLAIN = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass
class Chain:
    """One chain: its policy ("-" for a user chain) and rules as iptables-save prints
    them, without the leading ``-A NAME``."""

    policy: str = "-"
    rules: list[str] = field(default_factory=list)


class _RefusedError(Exception):
    pass


def saved_rule(spec: str) -> str:
    """A rule spec as written -> as iptables-save prints it (see module docstring)."""
    words = shlex.split(spec)
    out: list[str] = []
    for i, word in enumerate(words):
        before = words[i - 1] if i else ""
        if before == "--comment" and not (word and set(word) <= _PLAIN):
            out.append('"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"')
        elif before == "--probability":
            out.append(f"{int(float(word) * 0x80000000 + 0.5) / 0x80000000:.11f}")
        else:
            out.append(word)
    return " ".join(out)


def _target(spec: str) -> str | None:
    words = spec.split()
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "-g"):
            return words[i + 1]
    return None


class FakeNetfilter(SaveRestore):
    """One address family's tables in memory (``tables``: name -> chain name -> Chain).

    ``backend``: what :meth:`backend` reports ("" with ``reason``: netfilter unusable,
    every read and write then fails as the tools would). :meth:`family` gives the other
    address family of the same fake node."""

    def __init__(
        self,
        ipv6: bool = False,
        *,
        backend: str = "iptables-nft",
        reason: str = "",
        read_beside_for: float | None = None,
        _families: dict[bool, FakeNetfilter] | None = None,
    ) -> None:
        self.ipv6 = ipv6
        self.legacy = backend == "iptables-legacy"
        self.read_beside_for = read_beside_for
        self._backend = (backend, reason if not backend else "")
        self.tables: dict[str, dict[str, Chain]] = {}
        self.commits = 0  # batches applied: a real kernel's rule handles change only with these
        self._families = _families if _families is not None else {}
        self._families[ipv6] = self

    def backend(self) -> tuple[str, str]:
        return self._backend

    def family(self, ipv6: bool) -> FakeNetfilter:
        found = self._families.get(ipv6)
        if found is None:
            found = FakeNetfilter(ipv6, backend=self._backend[0], reason=self._backend[1],
                                  read_beside_for=self.read_beside_for, _families=self._families)
        return found

    # State, as tests read and change it.

    def rules(self, table: str, chain: str) -> list[str]:
        """The chain's rules as ``-A CHAIN ...`` lines ([] when it does not exist)."""
        found = self.tables.get(table, {}).get(chain)
        return [f"-A {chain} {r}" for r in found.rules] if found else []

    def save(self, tables: Sequence[str] = ()) -> str:
        """iptables-save's output (of every table the fake holds, or of ``tables``)."""
        return "".join(line + "\n" for line in self.save_lines(tables or tuple(self.tables)))

    # The two primitives of SaveRestore.

    def save_lines(self, tables: Sequence[str]) -> Iterator[str]:
        if not self._backend[0]:
            raise ModeUnavailableError(f"iptables-save failed: {self._backend[1]}")
        # Like iptables-nft-save: one table asked for is printed even when nothing made it
        # (its built-in chains only); of several, only those that exist.
        names = list(tables) if len(tables) == 1 else [t for t in self.tables if t in tables]
        lines = ["# Generated by the in-memory netfilter"]
        for name in names:
            chains = self.tables.get(name) or _new_table(name)
            order = [c for c in BUILTIN.get(name, ()) if c in chains]
            order += sorted(c for c in chains if c not in order)
            lines.append(f"*{name}")
            lines += [f":{c} {chains[c].policy} [0:0]" for c in order]
            lines += [f"-A {c} {r}" for c in order for r in chains[c].rules]
            lines.append("COMMIT")
        return iter(lines)

    def restore(self, text: str) -> None:
        if not self._backend[0]:
            raise KernelError(f"iptables-restore failed: {self._backend[1]}", errno=1)
        tables = copy.deepcopy(self.tables)
        chains: dict[str, Chain] | None = None
        number = 0
        try:
            for number, raw in enumerate(text.splitlines(), start=1):  # noqa: B007
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                if line.startswith("*"):
                    if chains is not None:
                        raise _RefusedError("a table starts before the last one's COMMIT")
                    if line[1:] not in BUILTIN:
                        raise _RefusedError(f"table '{line[1:]}' does not exist")
                    chains = tables.setdefault(line[1:], _new_table(line[1:]))
                elif chains is None:
                    raise _RefusedError("no table given")
                elif line == "COMMIT":
                    chains = None
                else:
                    _apply(chains, line)
            if chains is not None:
                number += 1
                raise _RefusedError("COMMIT expected")
        except _RefusedError as err:
            raise KernelError(
                f"iptables-restore --noflush refused the batch: line {number} failed: {err}"
                " (retried on the next sync)", errno=1,
            ) from None
        self.tables = tables
        self.commits += 1


def _new_table(name: str) -> dict[str, Chain]:
    return {c: Chain("ACCEPT") for c in BUILTIN.get(name, ())}


def _apply(chains: dict[str, Chain], line: str) -> None:
    """One line of a restore batch inside a table (anything but ``*table``/``COMMIT``)."""
    if line.startswith(":"):
        name, _, rest = line[1:].partition(" ")
        policy = rest.split(" ")[0] if rest else "-"
        if policy == "-":
            if chains.get(name, Chain()).policy != "-":
                raise _RefusedError(f"built-in chain {name} needs a policy")
            chains.setdefault(name, Chain()).rules.clear()  # --noflush: a declared chain is flushed
        elif name in chains and chains[name].policy != "-":
            chains[name].policy = policy
        else:
            raise _RefusedError(f"chain {name} is not a built-in chain: it takes no policy")
        return
    command, _, rest = line.partition(" ")
    name, _, spec = rest.partition(" ")
    if command == "-N":
        if name in chains:
            raise _RefusedError("Chain already exists")
        chains[name] = Chain()
        return
    chain = chains.get(name)
    if chain is None:
        raise _RefusedError(f"Chain '{name}' does not exist")
    if command == "-F":
        chain.rules.clear()
    elif command == "-X":
        if chain.policy != "-":
            raise _RefusedError(f"cannot delete built-in chain {name}")
        if chain.rules or any(_target(r) == name for c in chains.values() for r in c.rules):
            raise _RefusedError(f"CHAIN_DEL failed (Device or resource busy): chain {name}")
        del chains[name]
    elif command in ("-A", "-I", "-D"):
        position = 1
        if command == "-I" and spec.split(" ", 1)[0].isdigit():
            first, _, spec = spec.partition(" ")
            position = int(first)
        rule = saved_rule(spec)
        target = _target(rule)
        if target is not None and target not in TARGETS and target not in chains:
            raise _RefusedError(f"Chain '{target}' does not exist")
        if command == "-A":
            chain.rules.append(rule)
        elif command == "-I":
            if position > len(chain.rules) + 1:
                raise _RefusedError("Index of insertion too big")
            chain.rules.insert(position - 1, rule)
        elif rule in chain.rules:
            chain.rules.remove(rule)
        else:
            raise _RefusedError("Bad rule (does a matching rule exist in that chain?)")
    else:
        raise _RefusedError(f"unknown command {command!r}")
