"""What a periodic full sync must rewrite: desired chains vs chains read back; pure.

Called by ``svcproxy.dataplane.iptables.proxier`` (its full sync) and the
unit tests. kube-proxy restores only the chains that changed; here the
"last written" state is what ``iptables-save`` prints now, so drift made by
hand (a rule deleted, altered, a chain flushed) is seen too. The comparison
is per chain, on normalised rule text: iptables-save quotes some comments
(``"ns/name"``) and prints the statistic match's probability as the kernel
holds it (a 31-bit fraction: ``0.33333333333`` is read back as
``0.33333333349``), so both sides are normalised before comparing.
``SVCPROXY-SERVICES``, ``SVCPROXY-NODEPORTS`` and ``SVCPROXY-NO-ENDPOINTS`` hold one
independent rule per service (disjoint matches), so they are compared as multisets and
repaired rule by rule, never flushed, and are kept as rules; every other
chain is compared in order (the probability chain depends on it) and
rewritten whole when it differs, so of those only a digest of the normalised
rules is kept (:func:`fold`), and of the per-service ones, after the first sync,
only sums per group (:class:`Summary`; the groups whose sums differ are read
again per chain). The read-back streams through
:func:`svcproxy.dataplane.nfkernel.scan` and never holds every rule of a node
at once.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.nfkernel import SavedTable, scan
from svcproxy.dataplane.table import VirtualServer

# A chain as read back: its normalised rules (the multiset chains) or their digest.
Chain = list[str] | bytes
# Chains compared as multisets, rule by rule: kept whole (10k rules each at 10k Services).
MULTISET = frozenset({*rules.JUMP_CHAINS, rules.NO_ENDPOINTS})
# The per-service chains (rules.service_chain, rules.cluster_chain, rules.firewall_chain,
# rules.endpoint_chain): 110k at 10k Services. Every prefix has the same length (see group).
PER_SERVICE = ("SVCPROXY-SVC-", "SVCPROXY-SEP-", "SVCPROXY-CLU-", "SVCPROXY-FWL-")
_MASK = (1 << 128) - 1

_PROBABILITY = re.compile(r"--probability (\S+)")
_COMMENT = re.compile(r"--comment (\S+)")


def _kernel_probability(match: re.Match[str]) -> str:
    # xt_statistic keeps lround(p * 2^31); iptables-save prints that / 2^31 with %.11f.
    fraction = int(float(match.group(1)) * 0x80000000 + 0.5)
    return f"--probability {fraction / 0x80000000:.11f}"


def normalise(line: str) -> str:
    """One rule line ("-A CHAIN ...") in the form compared: no quotes (our comments hold
    none of their own), the probability as the kernel holds it, single spaces."""
    if '"' not in line and "--probability" not in line and "  " not in line:
        return line.rstrip()  # the common case, kept cheap: 320k lines at 10k services
    text = " ".join(line.replace('"', "").split())
    if "--probability" in text:
        text = _PROBABILITY.sub(_kernel_probability, text)
    return text


def jump_owner(line: str) -> str | None:
    """The owner ("ns/name") a jump (SVCPROXY-SERVICES, -NODEPORTS) or NO-ENDPOINTS rule
    names in its comment."""
    match = _COMMENT.search(line)
    return match.group(1).replace('"', "") if match else None


class SavedParseError(ValueError):
    """iptables-save printed a line this parser does not know: compare nothing, rewrite all."""


def digest(normalised: Iterable[str]) -> bytes:
    """What an ordered chain is compared by: 16 bytes for its normalised rules (a chance
    collision, 2^-128 per chain, would leave one drifted chain unrepaired)."""
    text = "\n".join(normalised).encode(errors="surrogateescape")
    return hashlib.blake2b(text, digest_size=16).digest()


def fold(name: str, lines: list[str]) -> Chain:
    """The :func:`~svcproxy.dataplane.nfkernel.scan` fold of the read-back: a multiset
    chain's normalised rules, any other chain's :func:`digest`."""
    if name in MULTISET:
        return [normalise(line) for line in lines]
    return digest(normalise(line) for line in lines)


def group(name: str) -> str:
    """The group of a per-service chain: the first two characters of its name's hash
    (base32: 1024 groups, each ~1/1000 of the chains)."""
    return name[len(PER_SERVICE[0]) : len(PER_SERVICE[0]) + 2]


@dataclass
class Summary:
    """Per-service chains summed up per :func:`group`: a sum, mod 2^128, of a 128-bit
    hash of each chain's name and rules, and counts of the runs of rules summed and of
    the chains declared. The steady-state full sync
    compares these with the desired chains' sums, so its read-back holds nothing per
    chain (a digest per chain, with its name, is the largest thing it would keep).
    Only the groups whose sums differ are read again with a digest per chain, to find
    which services drifted: what that holds follows the drift, not the table."""

    # group -> (sum of the hashes of its chains' rules, runs of rules summed, chains declared)
    sums: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def declare(self, name: str) -> None:
        key = group(name)
        total, runs, declared = self.sums.get(key, (0, 0, 0))
        self.sums[key] = (total, runs, declared + 1)

    def add(self, name: str, chain: bytes) -> None:
        """One chain's rules (its :func:`digest`), which must not be empty."""
        term = int.from_bytes(hashlib.blake2b(name.encode() + chain, digest_size=16).digest(), "big")
        key = group(name)
        total, runs, declared = self.sums.get(key, (0, 0, 0))
        self.sums[key] = ((total + term) & _MASK, runs + 1, declared)

    def differing(self, other: Summary) -> frozenset[str]:
        return frozenset(g for g in self.sums.keys() | other.sums.keys()
                         if self.sums.get(g) != other.sums.get(g))


@dataclass(frozen=True)
class Deferred:
    """:func:`plan_full` on a summed read-back whose per-service chains differ from the
    desired ones: read back again, with a digest per chain of ``groups``."""

    groups: frozenset[str]


class Reader:
    """``fold`` and ``keep`` for ``NetfilterKernel.read(..., rules.PREFIX, reader, reader.keep)``.

    ``summarise``: the per-service chains go into :attr:`summary` and are not kept
    (the steady state's read). Otherwise owned chains are kept as :func:`fold` makes
    them; of the per-service chains only those of ``groups`` (None: all; the first
    sync, or the read that finds which chains of a :class:`Deferred` differ). One
    reader serves both tables of a read: only nat holds per-service chains (one named
    so in filter would be summed too, and the sync would always read twice)."""

    def __init__(self, summarise: bool, groups: frozenset[str] | None = None) -> None:
        self.summary = Summary() if summarise else None
        self.groups = groups

    def keep(self, name: str) -> bool:
        if not name.startswith(PER_SERVICE):
            return True
        return self.summary is None and (self.groups is None or group(name) in self.groups)

    def __call__(self, name: str, lines: list[str]) -> Chain:
        if self.keep(name):
            return fold(name, lines)
        if self.summary is not None and not lines:  # scan: a declaration, not kept
            self.summary.declare(name)
        elif self.summary is not None:
            self.summary.add(name, digest(normalise(line) for line in lines))
        return b""  # not kept: the value is dropped


def observed(saved: SavedTable[Chain]) -> dict[str, Chain]:
    """Owned chains (``SVCPROXY-`` prefix) of one table as :func:`fold` keeps them, from
    ``NetfilterKernel.read(..., rules.PREFIX, fold)``; a table the kernel lacks is empty.

    Strict: a table that did not parse (a missing COMMIT, an unknown line, a rule in an
    undeclared chain of ours: ``saved.problem``) raises :class:`SavedParseError` (the
    caller then rewrites every chain instead of trusting a comparison).
    """
    if saved.problem:
        raise SavedParseError(saved.problem)
    return saved.chains


def parse_saved(text: str, table: str) -> dict[str, Chain]:
    """:func:`observed` of ``table`` in iptables-save output given as text (tests); the
    table must be in it."""
    saved = scan(text.splitlines(), (table,), rules.PREFIX, fold)[table]
    if not saved.present:
        raise SavedParseError(f"no *{table} section in iptables-save output")
    return observed(saved)


def multiset(chains: Mapping[str, Chain], name: str) -> list[str] | None:
    """The rules of a :data:`MULTISET` chain as read back (None: the chain is missing)."""
    value = chains.get(name)
    if isinstance(value, bytes):  # not kept as rules: only a fold other than fold() does that
        raise TypeError(f"{name} was read back as a digest, not as rules")
    return value


def desired_chains(
    vs: VirtualServer, cluster_cidrs: tuple[str, ...], masquerade_all: bool
) -> dict[str, list[str]]:
    """``vs``'s service and endpoint chains -> their normalised rules, in order."""
    out: dict[str, list[str]] = {name: [] for name in rules.chains_of(vs)}
    for line in rules.service_rules(vs, cluster_cidrs, masquerade_all):
        out[line.split(" ", 2)[1]].append(normalise(line))
    return out


@dataclass
class FullPlan:
    """The restore work of one full sync (empty when nothing drifted)."""

    dirty: list[VirtualServer] = field(default_factory=list)  # services whose chains are rewritten
    add_jumps: set[str] = field(default_factory=set)  # normalised jumps to append (of dirty services)
    base: bool = False  # rewrite SVCPROXY-MARK-MASQ and SVCPROXY-POSTROUTING
    declare_services: bool = False  # SVCPROXY-SERVICES is missing
    declare_nodeports: bool = False  # SVCPROXY-NODEPORTS is missing
    delete_jumps: list[str] = field(default_factory=list)  # "-D SVCPROXY-SERVICES ..." lines
    stale: list[str] = field(default_factory=list)  # owned chains nobody needs
    filter_rules: list[str] | None = None  # the whole NO_ENDPOINTS chain, when it differs

    @property
    def empty(self) -> bool:
        return not (self.dirty or self.base or self.declare_services or self.declare_nodeports
                    or self.delete_jumps or self.stale or self.filter_rules is not None)

    def declares(self, chain: str) -> bool:
        """The first batch declares ``chain``: a jump chain only when missing (a declaration
        flushes it), the others when the base chains are rewritten."""
        if chain == rules.SERVICES:
            return self.declare_services
        if chain == rules.NODEPORTS:
            return self.declare_nodeports
        return self.base


def plan_full(
    servers: Sequence[VirtualServer],
    nat: Mapping[str, Chain],
    filter_chain: Sequence[str] | None,
    cluster_cidrs: tuple[str, ...],
    masquerade_all: bool,
    *,
    rewrite_all: bool = False,
    keep: Iterable[str] = (),
    summary: Summary | None = None,
    groups: frozenset[str] | None = None,
) -> FullPlan | Deferred:
    """Desired ``servers`` x observed chains -> what to restore.

    ``nat``: owned nat chains as read back (:func:`observed`); ``filter_chain``: the
    rules of SVCPROXY-NO-ENDPOINTS (None: missing). ``rewrite_all`` marks every service
    dirty (first sync after start, unparsable read-back). ``keep``: chains never to
    delete even if no desired service names them (written meanwhile by a partial sync).
    ``summary``: the per-service chains were read back only as a :class:`Summary`
    (``nat`` lacks them); when they differ from
    the desired ones a :class:`Deferred` is returned: read those groups back per chain
    and plan from that. ``groups``: ``nat`` holds only these groups' per-service chains
    (the others were found equal by the summed read).
    """
    plan = FullPlan()
    plan.base = rewrite_all or _base_differs(nat)
    plan.declare_services = rules.SERVICES not in nat
    plan.declare_nodeports = rules.NODEPORTS not in nat
    have_jumps = Counter(multiset(nat, rules.SERVICES) or ())
    have_jumps.update(multiset(nat, rules.NODEPORTS) or ())
    # Jumps read back that no desired service wants; a dict sharing the read-back's strings
    # (a set of the desired jumps would be one new string per Service).
    unwanted = dict(have_jumps)
    needed = set(rules.BASE_CHAINS) | set(keep)
    want_sum = Summary()
    for vs in servers:
        jump = normalise(rules.service_jump(vs))
        unwanted.pop(jump, None)
        rendered = desired_chains(vs, cluster_cidrs, masquerade_all)
        chains = {c: digest(want) for c, want in rendered.items() if groups is None or group(c) in groups}
        if summary is None:
            needed.update(chains)
            differs = any(nat.get(c) != want for c, want in chains.items())
        else:  # decided for all services at once, below
            for c, want in chains.items():
                want_sum.declare(c)
                if rendered[c]:
                    want_sum.add(c, want)
            differs = False
        if jump not in have_jumps:
            plan.add_jumps.add(jump)
        if rewrite_all or jump not in have_jumps or differs:
            plan.dirty.append(vs)
    if summary is not None and summary != want_sum:
        return Deferred(summary.differing(want_sum))
    _sweep(plan, nat, have_jumps, unwanted, needed)
    rejects = [normalise(r) for vs in servers if (r := rules.reject_rule(vs))]
    if rewrite_all or filter_chain is None or Counter(filter_chain) != Counter(rejects):
        plan.filter_rules = [r for vs in servers if (r := rules.reject_rule(vs))]
    return plan


def _base_differs(nat: Mapping[str, Chain]) -> bool:
    """SVCPROXY-MARK-MASQ or SVCPROXY-POSTROUTING differ from what they should hold."""
    base_want: dict[str, list[str]] = {rules.MARK_MASQ: [], rules.POSTROUTING: []}
    for line in rules.base_rules():
        base_want[line.split(" ", 2)[1]].append(normalise(line))
    return any(nat.get(c) != digest(want) for c, want in base_want.items())


def _sweep(
    plan: FullPlan,
    nat: Mapping[str, Chain],
    have_jumps: Counter[str],
    unwanted: Mapping[str, int],
    needed: set[str],
) -> None:
    """Jumps no service wants (and duplicates) deleted, owned chains nobody needs dropped."""
    for jump, count in have_jumps.items():
        extra = count if jump in unwanted else count - 1
        plan.delete_jumps += ["-D" + jump[2:]] * extra
    plan.stale = sorted(c for c in nat if rules.owned_chain(c) and c not in needed)


def without_owners(
    plan: FullPlan, owners: frozenset[str], keep: set[str], filter_rules: list[str]
) -> FullPlan:
    """``plan`` minus everything of ``owners``, which a partial sync wrote after the
    read-back the plan came from (their state now is the partial's, not the read-back's).

    ``keep``: those owners' chains now (never stale); ``filter_rules``: the whole
    NO_ENDPOINTS chain as it must be now, used only if the plan rewrites that chain.
    """
    return FullPlan(
        dirty=[vs for vs in plan.dirty if vs.owner not in owners],
        add_jumps={j for j in plan.add_jumps if jump_owner(j) not in owners},
        base=plan.base,
        declare_services=plan.declare_services,
        declare_nodeports=plan.declare_nodeports,
        delete_jumps=[j for j in plan.delete_jumps if jump_owner(j) not in owners],
        stale=[c for c in plan.stale if c not in keep],
        filter_rules=None if plan.filter_rules is None else filter_rules,
    )
