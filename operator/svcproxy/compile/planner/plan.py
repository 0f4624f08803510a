"""Plan one namespace: programs to write, handover steps, policy statuses (pure).

The operator's reconciler gathers what it knows about one namespace into a
:class:`NamespaceView` (raw policies, Services, EndpointSlices, Pod labels,
existing ProxyVirtualServers, every ProxyNode report, the clock) and calls
:func:`plan_namespace`. The returned :class:`NamespacePlan` says exactly what to do:
which ProxyVirtualServers to write (only those whose content changed) or
delete, which Services to label or unlabel for the handover with kube-proxy,
the status of every policy and the Events of condition transitions. Nothing
here talks to the API server, so every rule is unit-tested directly. The
caller may pass a :class:`~svcproxy.compile.planner.memo.PlanMemo` kept between passes
so one change costs one Service's work, not the namespace's.

Handover order: a Service is labelled ``service.kubernetes.io/service-proxy-name``
only once every node reports its current program; when no live policy
selects it any more, the label goes first, and its ProxyVirtualServer is
deleted only ``handover_delay`` seconds later, so kube-proxy has programmed
the Service again before the agents withdraw.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from svcproxy.api.common import HANDOVER_LABEL, HANDOVER_VALUE, Condition
from svcproxy.api.node import ProxyNode
from svcproxy.api.policy import ServiceProxyPolicy, ServiceProxyPolicyStatus
from svcproxy.api.program import ProxyVirtualServerSpec
from svcproxy.compile.cluster import ClusterPart, cluster_name, is_cluster
from svcproxy.compile.conflicts import selects, winner
from svcproxy.compile.events import transition
from svcproxy.compile.planner.memo import (
    Compiled,
    CompiledSpecs,
    Derived,
    PackedProgram,
    ParsedPolicy,
    PlanMemo,
    PolicyRows,
    ServiceRecord,
    resource_version,
    spec_digest,
)
from svcproxy.compile.planner.status import changed_reports, cluster_part, policy_rows, policy_status
from svcproxy.compile.program import NotProxied, not_proxied

JSON = dict[str, Any]
CONDITION_TYPES = ("Accepted", "Programmed", "Conflicted", "Degraded")
__all__ = ["Event", "NamespacePlan", "NamespaceView", "plan_namespace", "program_summary"]
# The key that marks a stored program given as its summary (see program_summary).
SPEC_DIGEST = "specDigest"


@dataclass(frozen=True)
class NamespaceView:
    """Everything the planner reads about one namespace (plain API objects)."""

    namespace: str
    policies: Sequence[JSON]
    services: Mapping[str, JSON]
    slices: Mapping[str, Sequence[JSON]]  # Service name -> its EndpointSlices
    pod_labels: Mapping[str, Mapping[str, str]]
    programs: Mapping[str, JSON]  # existing ProxyVirtualServers by name (or their program_summary)
    nodes: Sequence[ProxyNode]
    now: float  # seconds, the reconciler's monotonic-ish clock
    now_iso: str  # RFC 3339, for lastTransitionTime
    unlabelled_at: Mapping[str, float] = field(default_factory=dict)
    handover_delay: float = 3.0
    # Names of the Nodes that should run an agent (Ready, matching the agents' node
    # selector); None when the operator cannot list Nodes: then the ProxyNode reports
    # alone say how many nodes there are, and a node whose agent never started is missed.
    expected_nodes: frozenset[str] | None = None
    # Stand-ins of the cluster policies that select this namespace (compile/cluster.py's
    # for_namespace): planned below every namespaced policy, reported in ``cluster``.
    cluster_policies: Sequence[JSON] = ()

    def counted_nodes(self) -> list[ProxyNode]:
        """The reports that count: those of expected nodes (a deleted Node's report does not)."""
        if self.expected_nodes is None:
            return list(self.nodes)
        return [n for n in self.nodes if n.metadata.name in self.expected_nodes]

    def nodes_total(self) -> int:
        return len(self.nodes) if self.expected_nodes is None else len(self.expected_nodes)

    def silent_nodes(self) -> list[str]:
        """Expected nodes with no ProxyNode report (their agent is missing or never reported)."""
        if self.expected_nodes is None:
            return []
        return sorted(self.expected_nodes - {n.metadata.name for n in self.nodes})


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on a policy."""

    policy: str
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class NamespacePlan:
    """What the reconciler does for one namespace, in this order."""

    writes: Mapping[str, ProxyVirtualServerSpec] = field(default_factory=dict)  # built on read
    label: list[str] = field(default_factory=list)
    unlabel: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    statuses: dict[str, JSON] = field(default_factory=dict)  # policy -> status (wire form)
    events: list[Event] = field(default_factory=list)
    unlabelled_at: dict[str, float] = field(default_factory=dict)
    recheck_at: float | None = None  # run again then: a handover delay ends
    owned_after: dict[str, str] = field(default_factory=dict)  # PVS name -> policy, once applied
    compiled: Mapping[str, ProxyVirtualServerSpec] = field(default_factory=dict)  # built on read
    cluster: dict[str, ClusterPart] = field(default_factory=dict)  # cluster policy -> its part here


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _labelled(service: JSON) -> str | None:
    labels = (service.get("metadata") or {}).get("labels") or {}
    value = labels.get(HANDOVER_LABEL)
    return value if isinstance(value, str) else None


def program_summary(program: JSON) -> JSON:
    """What the planner reads of a stored ProxyVirtualServer: name, resourceVersion, the policy
    that wrote it and the digest of its spec. The operator's cache keeps this instead of the
    program, which is as large as the compiled program itself (a view may hold either)."""
    meta = program.get("metadata") or {}
    spec = program.get("spec")
    return {
        "metadata": {k: meta[k] for k in ("name", "namespace", "resourceVersion") if k in meta},
        "policy": _owner_of(program),
        SPEC_DIGEST: spec_digest(spec) if isinstance(spec, dict) else None,
    }


def _stored_digest(program: JSON) -> str | None:
    if SPEC_DIGEST in program:
        digest = program[SPEC_DIGEST]
        return digest if isinstance(digest, str) else None
    spec = program.get("spec")
    return spec_digest(spec) if isinstance(spec, dict) and spec else None


def _owner_of(program: JSON) -> str | None:
    if SPEC_DIGEST in program:
        name = program.get("policy")
    else:
        spec = program.get("spec") or {}
        name = (spec.get("policy") or {}).get("name")
    return name if isinstance(name, str) else None


def plan_namespace(view: NamespaceView, memo: PlanMemo | None = None) -> NamespacePlan:
    """Decide programs, handover steps and statuses for every policy in ``view``.

    ``memo`` (one per namespace, kept by the caller between passes) lets a pass
    reuse what it derived for Services whose objects did not change; the result
    is the same as with no memo (see :mod:`svcproxy.compile.planner.memo`).
    """
    memo = memo if memo is not None else PlanMemo()
    memo.begin()
    try:
        plan = _plan(view, memo)
    except BaseException:
        memo.reset()  # half-updated sets cannot be trusted by the next pass
        raise
    return plan


def _plan(view: NamespaceView, memo: PlanMemo) -> NamespacePlan:
    plan = NamespacePlan(unlabelled_at=dict(view.unlabelled_at))
    # From here on ``view.nodes`` holds only the reports that count.
    view = replace(view, nodes=view.counted_nodes())
    raws = [*view.policies, *view.cluster_policies]
    raw_by_name = {str((raw.get("metadata") or {}).get("name", "")): raw for raw in raws}
    every = memo.parse_policies(raws)
    parsed = {n: p.policy for n, p in every.items() if p.policy is not None}
    # A cluster policy that does not parse never gets here (its own status says so).
    invalid = {n: p.error for n, p in every.items() if p.policy is None and not is_cluster(n)}
    token = memo.policies_token(every)
    # Who selects what, who wins, and the program: kept for Services whose objects are
    # the very ones of the last pass (one identity check each), derived again for the others.
    changed, gone = _rederive(view, memo, every, parsed, token)
    derived, touched = _update_derived(memo, memo.records, changed, gone, token)
    plan.compiled = CompiledSpecs(dict(derived.specs))
    _plan_programs(view, derived, touched, memo, plan)
    _policy_statuses(view, memo, parsed, raw_by_name=raw_by_name, derived=derived, touched=touched, plan=plan)
    for name, error in invalid.items():
        generation = (raw_by_name[name].get("metadata") or {}).get("generation")
        status = ServiceProxyPolicyStatus(
            observed_generation=generation,
            conditions=[
                Condition(type="Accepted", status="False", reason="InvalidSpec", message=error),
                Condition(type="Programmed", status="False", reason="InvalidSpec", message="spec is invalid"),
            ],
        )
        _finish_status(view, name, raw_by_name[name], status, plan, rows=None)
    memo.last_nodes = tuple(view.nodes)
    return plan


def _suspects(view: NamespaceView, memo: PlanMemo, token: object) -> Iterable[str]:
    """Which Services to look at: those whose Service object or slice list is not the one
    of the last pass (object ids compared in C; the memo keeps last pass' objects
    alive, so an id cannot have been reused), plus, when Pod labels changed, those
    whose program read them. Everything when the policies changed.

    Equal dicts compare value by value, identity first: the usual pass (nothing or one
    thing changed) costs a few C-speed sweeps, and a Python step per changed Service."""
    services = view.services
    if memo.derived is None or memo.derived.token is not token:
        return services
    found = set()
    if services != memo.last_services:
        found.update(_replaced(services, memo.last_services))
    if view.slices != memo.last_slices:
        found.update(_replaced(view.slices, memo.last_slices))
    if memo.weighted and view.pod_labels != memo.last_pod_labels:
        found.update(memo.weighted)
    return [n for n in found if n in services]


def _rederive(
    view: NamespaceView,
    memo: PlanMemo,
    every: Mapping[str, ParsedPolicy],
    parsed: Mapping[str, ServiceProxyPolicy],
    token: object,
) -> tuple[list[tuple[str, ServiceRecord | None]], list[tuple[str, ServiceRecord]]]:
    """Derive the records of the suspect Services again; returns the changed ones (with
    their old record) and the gone ones, and remembers this pass' objects."""
    records, services, slices_of, pod_labels = memo.records, view.services, view.slices, view.pod_labels
    changed: list[tuple[str, ServiceRecord | None]] = []
    for svc_name in _suspects(view, memo, token):
        svc = services[svc_name]
        rec = records.get(svc_name)
        slices = slices_of.get(svc_name)
        if (
            rec is not None
            and rec.service is svc
            and rec.token is token
            and rec.slices == slices  # lists compare element by element, identity first
            and (rec.entry is None or not rec.entry.pods or _pods_same(rec.entry, pod_labels))
        ):
            continue
        new = _derive(svc_name, svc, slices, every, parsed, token, pod_labels, memo, rec)
        records[svc_name] = new
        changed.append((svc_name, rec))
        if new.entry is not None and new.entry.pods:
            memo.weighted.add(svc_name)
        else:
            memo.weighted.discard(svc_name)
    gone = []
    if len(records) != len(services):
        gone = [(n, records.pop(n)) for n in [n for n in records if n not in services]]
        memo.weighted.difference_update(n for n, _ in gone)
    memo.last_services, memo.last_slices = dict(services), dict(slices_of)
    if memo.weighted:
        memo.last_pod_labels = dict(pod_labels)
    return changed, gone


def _policy_statuses(
    view: NamespaceView,
    memo: PlanMemo,
    parsed: Mapping[str, ServiceProxyPolicy],
    *,
    raw_by_name: Mapping[str, JSON],
    derived: Derived,
    touched: set[str] | None,
    plan: NamespacePlan,
) -> None:
    """The status of every valid policy, from its per-Service rows."""
    reports = changed_reports(memo.last_nodes, view.nodes)
    total = view.nodes_total()
    silent = view.silent_nodes()
    for name, policy in parsed.items():
        rows = policy_rows(
            namespace=view.namespace,
            nodes=view.nodes,
            total=total,
            policy=policy,
            parsed=parsed,
            records=memo.records,
            derived=derived,
            touched=touched,
            reports=reports,
            memo=memo,
        )
        if is_cluster(name):
            plan.cluster[cluster_name(name)] = cluster_part(
                namespace=view.namespace, nodes=view.nodes, policy=policy, rows=rows, records=memo.records
            )
            continue
        status = policy_status(
            namespace=view.namespace,
            nodes=view.nodes,
            total=total,
            silent=silent,
            services=view.services,
            policy=policy,
            rows=rows,
        )
        _finish_status(view, name, raw_by_name[name], status, plan, rows=rows)
    for name in [n for n in memo.policy_rows if n not in parsed]:
        del memo.policy_rows[name]


def _replaced(now: Mapping[str, object], before: Mapping[str, object]) -> set[str]:
    """Keys whose value is not the very object it was (or that came or went).

    Compares object ids, in C; ``before`` holds the old objects, so no id was reused."""
    ids = dict(zip(now.keys(), map(id, now.values()), strict=True))
    old = dict(zip(before.keys(), map(id, before.values()), strict=True))
    return {k for k, _ in ids.items() ^ old.items()}


def _pods_same(entry: Compiled, pod_labels: Mapping[str, Mapping[str, str]]) -> bool:
    return all(pod_labels.get(p) == labels for p, labels in entry.pods)


def _derive(  # noqa: PLR0917 - one call site, every argument a different input
    svc_name: str,
    svc: JSON,
    slices: Sequence[JSON] | None,
    every: Mapping[str, ParsedPolicy],
    parsed: Mapping[str, ServiceProxyPolicy],
    token: object,
    pod_labels: Mapping[str, Mapping[str, str]],
    memo: PlanMemo,
    old: ServiceRecord | None,
) -> ServiceRecord:
    """Selection, handover state, winner and program of one Service (``old``: its last record)."""
    rv = resource_version(svc)
    if old is not None and rv is not None and old.rv == rv and old.token is token:
        names = old.names  # same Service version, same policies: same selection
    else:
        names = tuple(n for n, policy in parsed.items() if selects(policy, svc))
    labelled = _labelled(svc)
    rec = ServiceRecord(svc, slices, token, rv, names, None, None, None, labelled)
    if not names:
        return rec
    why = not_proxied(svc)
    if why is None and labelled is not None and labelled != HANDOVER_VALUE:
        why = NotProxied(
            "OtherProxy", f"the Service is handed to proxy {labelled!r} by its {HANDOVER_LABEL} label"
        )
    if why is not None:
        rec.why = why
        return rec
    pols = [parsed[n] for n in names]
    win = pols[0] if len(pols) == 1 else winner(pols)
    rec.winner = win.metadata.name
    previous = old.entry if old is not None else None
    rec.entry = memo.compile(svc_name, every[rec.winner], svc, slices or (), pod_labels, old=previous)
    if isinstance(rec.entry.result, NotProxied):
        rec.why = rec.entry.result
    return rec


def _update_derived(
    memo: PlanMemo,
    records: Mapping[str, ServiceRecord],
    changed: list[tuple[str, ServiceRecord | None]],
    gone: list[tuple[str, ServiceRecord]],
    token: object,
) -> tuple[Derived, set[str] | None]:
    """Bring the namespace-wide sets up to date; the Services touched (None: all)."""
    derived = memo.derived
    if derived is None or derived.token is not token:
        derived = Derived(token)
        for name, rec in records.items():
            derived.add(name, rec, HANDOVER_VALUE)
        memo.derived = derived
        return derived, None
    touched = set()
    for name, old in [*changed, *gone]:
        touched.add(name)
        if old is not None:
            derived.drop(name, old)
        if name in records:
            derived.add(name, records[name], HANDOVER_VALUE)
    return derived, touched


def _plan_programs(
    view: NamespaceView, derived: Derived, touched: set[str] | None, memo: PlanMemo, plan: NamespacePlan
) -> None:
    """Writes, labels, unlabels and deletes, in handover order."""
    programs = view.programs
    desired = derived.desired
    # Only a changed Service, a replaced stored program or a write not done yet can need a write.
    if touched is None:
        candidates: Iterable[str] = desired
    else:
        replaced = _replaced(programs, memo.last_programs) if programs != memo.last_programs else ()
        candidates = {n for n in (*touched, *memo.last_writes, *replaced) if n in desired}
    writes: dict[str, PackedProgram] = {}
    for svc_name in sorted(candidates):
        entry = desired[svc_name]
        if _needs_write(programs.get(svc_name), entry):
            assert isinstance(entry.result, PackedProgram)
            writes[svc_name] = entry.result
    # Each spec is built when the reconciler writes it: 10k at once (a cold start) would
    # be the whole namespace's programs as pydantic objects again.
    plan.writes = CompiledSpecs(writes)
    memo.last_programs = dict(programs)
    memo.last_writes = set(plan.writes)
    plan.owned_after = dict(derived.owners)
    for svc_name in [n for n in plan.unlabelled_at if n in desired]:
        del plan.unlabelled_at[svc_name]
    for svc_name in sorted(derived.to_label):
        spec = derived.specs[svc_name]
        if _all_nodes_applied(view, svc_name, spec.content_hash):
            plan.label.append(svc_name)
    for svc_name in sorted(derived.to_unlabel):
        plan.unlabel.append(svc_name)
        plan.unlabelled_at[svc_name] = view.now
    for pvs_name in sorted(programs.keys() - desired.keys()):
        program = programs[pvs_name]
        if pvs_name not in view.services:
            plan.delete.append(pvs_name)  # its Service is gone; garbage collection races us
            plan.unlabelled_at.pop(pvs_name, None)
            continue
        # kube-proxy needs time to program the Service again before agents withdraw;
        # an orphan found unlabelled (e.g. after an operator restart) waits too.
        since = plan.unlabelled_at.setdefault(pvs_name, view.now)
        if view.now >= since + view.handover_delay:
            plan.delete.append(pvs_name)
            plan.unlabelled_at.pop(pvs_name, None)
        else:
            owner = _owner_of(program)
            if owner is not None:
                plan.owned_after[pvs_name] = owner
            due = since + view.handover_delay
            plan.recheck_at = due if plan.recheck_at is None else min(plan.recheck_at, due)
    for svc_name in list(plan.unlabelled_at):
        if svc_name not in programs and svc_name not in plan.unlabel:
            plan.unlabelled_at.pop(svc_name)


def _needs_write(existing: JSON | None, entry: Compiled) -> bool:
    """True unless the stored program equals the compiled one (a hand edit is put back)."""
    return existing is None or _stored_digest(existing) != entry.digest


def _all_nodes_applied(view: NamespaceView, svc_name: str, content_hash: str) -> bool:
    key = _key(view.namespace, svc_name)
    total = view.nodes_total()
    return bool(total) and sum(1 for n in view.nodes if n.status.applied.get(key) == content_hash) == total


def _finish_status(
    view: NamespaceView,
    name: str,
    raw: JSON,
    status: ServiceProxyPolicyStatus,
    plan: NamespacePlan,
    *,
    rows: PolicyRows | None,
) -> None:
    """Carry lastTransitionTime over unchanged conditions; Events for transitions.

    ``rows`` holds the status rows in wire form (``status`` itself holds none)."""
    stored = raw.get("status")
    old_conditions = {
        c.get("type"): c for c in ((stored or {}).get("conditions") or []) if isinstance(c, dict)
    }
    generation = status.observed_generation
    conditions = []
    for cond in status.conditions:
        old = old_conditions.get(cond.type)
        same = old is not None and old.get("status") == cond.status
        stamp = old.get("lastTransitionTime") if same and old is not None else view.now_iso
        conditions.append(
            cond.model_copy(update={"last_transition_time": stamp, "observed_generation": generation})
        )
        event = transition(old, cond.type, cond.status, cond.reason, cond.message)
        if event is not None:
            plan.events.append(Event(name, event.type, event.reason, event.message))
    top = status.model_copy(update={"conditions": conditions}).wire()
    wires = rows.wires if rows is not None and rows.wires is not None else []
    if rows is not None and stored is rows.equal_raw and wires is rows.equal_rows and top == rows.equal_top:
        return  # the very stored status was found equal to these very rows before
    wire = {**top, "services": wires}
    if (stored or {}) != wire:
        plan.statuses[name] = wire
    elif rows is not None:
        rows.equal_raw, rows.equal_rows, rows.equal_top = stored, wires, top
