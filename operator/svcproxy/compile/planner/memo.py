"""What the namespace planner keeps between passes, so one change costs one recompile (pure).

A :class:`PlanMemo` belongs to one namespace; the operator's reconciler holds
one per namespace and hands it to :func:`svcproxy.compile.planner.plan.plan_namespace`
on every pass (``svcproxy plan`` and the tests may pass none: a fresh memo
then lives for one pass). It keeps, per Service, the last compiled program
together with the key of everything compile read to make it:

* the Service's ``resourceVersion`` (spec, labels, uid all change it),
* the ``(name, resourceVersion)`` of each of its EndpointSlices,
* the winning policy's fingerprint (name, uid, generation, creation time and
  the spec as JSON: everything compile and conflict resolution read of it),
* when that policy has ``weights``: the labels of every Pod compile looked up.

A pass looks again only at Services whose Service object or slice list is
not the very object of the last pass (the operator's cache replaces objects,
never edits them), and recompiles one only when its key differs, so a
memoised pass returns exactly what a pass with an empty memo returns (the
property tests check this over random change sequences). Objects without a
``resourceVersion`` (hand-built views) are never reused across versions. The
memo also keeps policy parses, each policy's status rows and counts
(:class:`PolicyRows`, see :mod:`svcproxy.compile.planner.status`) and the
namespace-wide sets (programs wanted, Services to label or unlabel). Nothing
here is global: all state lives in the memo object, Services that are gone
drop out, and a pass that raises resets it.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.api.program import ProxyVirtualServerSpec
from svcproxy.base import Mode
from svcproxy.compile.program import NotProxied, compile_program

JSON = dict[str, Any]
# The policy metadata compile, conflicts and status read; the rest (resourceVersion,
# managedFields, status) changes on every status write and must not invalidate anything.
_POLICY_META = ("name", "namespace", "uid", "generation", "creationTimestamp")
# etcd refuses objects over ~1.5 MiB; stay well below so the write cannot fail for size.
MAX_PROGRAM_BYTES = 1_000_000


@dataclass(frozen=True)
class ParsedPolicy:
    """One policy as the planner uses it: parsed (or why not) and its fingerprint."""

    fingerprint: str
    policy: ServiceProxyPolicy | None
    error: str


@dataclass(frozen=True, slots=True)
class PackedProgram:
    """A compiled program as the memo keeps it: what a pass reads of it, and the spec as
    compressed JSON text: a ProxyVirtualServerSpec holds every real server as a pydantic
    object, the largest thing the operator would keep, so the spec is rebuilt from the
    text only to be written (or shown: ``NamespacePlan.compiled``)."""

    content_hash: str
    mode: Mode
    policy: str
    packed: bytes  # spec_text() of the spec's wire form, zlib-compressed (~5x smaller)

    def spec(self) -> ProxyVirtualServerSpec:
        return ProxyVirtualServerSpec.model_validate_json(zlib.decompress(self.packed))


class CompiledSpecs(Mapping[str, ProxyVirtualServerSpec]):
    """Programs by Service name, each spec built when it is read."""

    def __init__(self, programs: Mapping[str, PackedProgram]) -> None:
        self._programs = programs

    def __getitem__(self, name: str) -> ProxyVirtualServerSpec:
        return self._programs[name].spec()

    def __iter__(self) -> Iterator[str]:
        return iter(self._programs)

    def __len__(self) -> int:
        return len(self._programs)


@dataclass
class Compiled:
    """One Service's program (or why it has none) and the key it was made from."""

    key: tuple[Any, ...] | None
    pods: tuple[tuple[str, Mapping[str, str] | None], ...]
    result: PackedProgram | NotProxied
    # Digest of the program's wire form (None when not proxied): compared with the stored
    # program's, so neither side keeps a second copy of the program as dicts.
    digest: str | None


@dataclass
class MemoStats:
    """Counters for tests and benchmarks: what the last pass compiled, what it reused."""

    compiles: int = 0  # compile_program calls, over the memo's life
    reused: int = 0  # programs reused although their Service's objects were replaced
    last_compiled: list[str] = field(default_factory=list)  # Services compiled by the last pass
    last_reused: int = 0


@dataclass
class PlanMemo:
    """Per-namespace planner memo; see the module docstring. Not thread-safe (one owner)."""

    policies: dict[str, ParsedPolicy] = field(default_factory=dict)
    records: dict[str, ServiceRecord] = field(default_factory=dict)  # updated in place
    derived: Derived | None = None
    policy_rows: dict[str, PolicyRows] = field(default_factory=dict)
    last_nodes: tuple[Any, ...] = ()
    last_programs: dict[str, JSON] = field(default_factory=dict)
    last_writes: set[str] = field(default_factory=set)
    last_services: dict[str, JSON] = field(default_factory=dict)
    last_slices: dict[str, Any] = field(default_factory=dict)
    last_pod_labels: dict[str, Any] = field(default_factory=dict)
    weighted: set[str] = field(default_factory=set)  # Services whose program read Pod labels
    stats: MemoStats = field(default_factory=MemoStats)
    _token: object = field(default=None, repr=False)
    _token_value: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    def begin(self) -> None:
        self.stats.last_compiled = []
        self.stats.last_reused = 0

    def reset(self) -> None:
        """Forget everything (a pass failed half-way: its partial updates cannot be trusted)."""
        stats = self.stats
        self.__dict__.update(PlanMemo().__dict__)
        self.stats = stats

    # -- policies ---------------------------------------------------------------
    def parse_policies(self, raws: Sequence[JSON]) -> dict[str, ParsedPolicy]:
        """Parse every policy not being deleted (by name), reusing unchanged parses."""
        out: dict[str, ParsedPolicy] = {}
        for raw in raws:
            meta = raw.get("metadata") or {}
            if meta.get("deletionTimestamp"):
                continue  # going away: it no longer selects anything
            name = str(meta.get("name", ""))
            body = {k: v for k, v in raw.items() if k not in ("status", "metadata")}
            body["metadata"] = {k: meta[k] for k in _POLICY_META if k in meta}
            fingerprint = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
            old = self.policies.get(name)
            if old is not None and old.fingerprint == fingerprint:
                out[name] = old
                continue
            try:
                out[name] = ParsedPolicy(fingerprint, ServiceProxyPolicy.parse(body), "")
            except ValidationError as err:
                out[name] = ParsedPolicy(fingerprint, None, _invalid_text(err))
        self.policies = out
        return out

    def policies_token(self, parsed: Mapping[str, ParsedPolicy]) -> object:
        """An object that stays the same (``is``) while the set of valid policies does."""
        value = tuple((n, p.fingerprint) for n, p in parsed.items() if p.policy is not None)
        if self._token is None or value != self._token_value:
            self._token, self._token_value = object(), value
        return self._token

    # -- programs ---------------------------------------------------------------
    def compile(
        self,
        svc_name: str,
        policy: ParsedPolicy,
        service: JSON,
        slices: Sequence[JSON],
        pod_labels: Mapping[str, Mapping[str, str]],
        *,
        old: Compiled | None,
    ) -> Compiled:
        """The Service's program under ``policy``: ``old`` when its key is unchanged."""
        assert policy.policy is not None
        key = _compile_key(service, slices, policy.fingerprint)
        if (
            key is not None
            and old is not None
            and old.key == key
            and all(pod_labels.get(p) == labels for p, labels in old.pods)
        ):
            self.stats.reused += 1
            self.stats.last_reused += 1
            return old
        # Without weights compile ignores Pod labels: they cannot invalidate the program.
        seen = _Recorder(pod_labels) if policy.policy.spec.weights else None
        result = compile_program(policy.policy, service, slices, seen if seen is not None else {})
        digest: str | None = None
        kept: PackedProgram | NotProxied
        if isinstance(result, NotProxied):
            kept = result
        else:
            text = spec_text(result.wire())
            if len(text) > MAX_PROGRAM_BYTES:
                kept = NotProxied(
                    "TooLarge",
                    f"the program would be {len(text)} bytes (limit {MAX_PROGRAM_BYTES}): "
                    "split the Service's ports or endpoints across Services",
                )
            else:
                digest = text_digest(text)
                packed = zlib.compress(text.encode(), 1)  # level 1: cheap, most of the gain
                kept = PackedProgram(result.content_hash, result.mode, result.policy.name, packed)
        self.stats.compiles += 1
        self.stats.last_compiled.append(svc_name)
        return Compiled(key, seen.seen() if seen is not None else (), kept, digest)


@dataclass
class ServiceRecord:
    """What a pass derived for one Service from its objects (reused while they are the same).

    The objects are compared by identity: the operator's cache replaces an object on
    every change and never edits one in place. When they differ, the resourceVersions
    decide whether the selection and the program can still be reused."""

    service: JSON
    slices: Sequence[JSON] | None  # as the view gave them
    token: object
    rv: str | None
    names: tuple[str, ...]  # the policies selecting it, in the view's order
    winner: str | None  # the policy that programs it (None when not proxied)
    why: NotProxied | None  # why it is not proxied
    entry: Compiled | None  # its program, when proxied
    labelled: str | None  # its handover label's value


@dataclass
class Derived:
    """Namespace-wide sets kept in step with the records (changed per changed Service)."""

    token: object
    desired: dict[str, Compiled] = field(default_factory=dict)
    specs: dict[str, PackedProgram] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)  # desired Service -> its policy
    to_label: set[str] = field(default_factory=set)  # desired, not labelled yet
    to_unlabel: set[str] = field(default_factory=set)  # labelled for svcproxy, not desired
    selected: dict[str, set[str]] = field(default_factory=dict)  # policy -> Services it selects

    def add(self, name: str, rec: ServiceRecord, handover_value: str) -> None:
        for policy in rec.names:
            self.selected.setdefault(policy, set()).add(name)
        if rec.entry is not None and isinstance(rec.entry.result, PackedProgram):
            self.desired[name] = rec.entry
            self.specs[name] = rec.entry.result
            self.owners[name] = rec.entry.result.policy
            if rec.labelled is None:
                self.to_label.add(name)
        elif rec.labelled == handover_value:
            self.to_unlabel.add(name)

    def drop(self, name: str, rec: ServiceRecord) -> None:
        for policy in rec.names:
            self.selected.get(policy, set()).discard(name)
        self.desired.pop(name, None)
        self.specs.pop(name, None)
        self.owners.pop(name, None)
        self.to_label.discard(name)
        self.to_unlabel.discard(name)


@dataclass
class Row:
    """One status row and what it adds to its policy's counts."""

    state: tuple[Any, ...]
    wire: JSON
    mine: bool  # the policy programs this Service
    mask: int  # bit i set: node i reports the current program
    pending: str | None
    conflict: str | None


@dataclass
class PolicyRows:
    """One policy's rows and counts, updated row by row between passes."""

    token: object
    shape: Any
    names: list[str]
    rows: dict[str, Row]
    missing: list[int]  # per node: proxied rows whose program it does not report
    mine: int = 0
    pending: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)
    wires: list[JSON] | None = None  # the rows as last handed out (reused while unchanged)
    index: dict[str, int] = field(default_factory=dict)  # Service -> its place in ``wires``
    equal_raw: Any = None  # the stored status object last found equal to ours
    equal_top: JSON | None = None  # our status without rows, then
    equal_rows: list[JSON] | None = None  # and our rows


class _Recorder(Mapping[str, Mapping[str, str]]):
    """Pod labels as compile sees them, noting every Pod it looks up (its inputs)."""

    def __init__(self, labels: Mapping[str, Mapping[str, str]]) -> None:
        self._labels = labels
        self._seen: dict[str, Mapping[str, str] | None] = {}

    def __getitem__(self, key: str) -> Mapping[str, str]:
        value = self._labels.get(key)
        self._seen[key] = dict(value) if value is not None else None
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def seen(self) -> tuple[tuple[str, Mapping[str, str] | None], ...]:
        return tuple(self._seen.items())


def spec_text(spec: JSON) -> str:
    """A program spec as JSON with sorted keys (the API server serves a custom object's keys
    sorted; sorting does not change the length, which the size limit reads)."""
    return json.dumps(spec, sort_keys=True)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def spec_digest(spec: JSON) -> str:
    """What tells two program specs apart (equal JSON, equal digest)."""
    return text_digest(spec_text(spec))


def resource_version(obj: JSON) -> str | None:
    value = (obj.get("metadata") or {}).get("resourceVersion")
    return value if isinstance(value, str) and value else None


def _compile_key(service: JSON, slices: Sequence[JSON], policy_fingerprint: str) -> tuple[Any, ...] | None:
    rv = resource_version(service)
    if rv is None:
        return None
    versions = []
    for slice_ in slices:
        srv = resource_version(slice_)
        if srv is None:
            return None
        versions.append((str((slice_.get("metadata") or {}).get("name", "")), srv))
    versions.sort()
    return (rv, tuple(versions), policy_fingerprint)


def _invalid_text(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"invalid spec ({err.error_count()} problem(s)); first at {where}: {first.get('msg')}"[:1000]
