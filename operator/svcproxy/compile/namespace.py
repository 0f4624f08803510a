"""Plan one namespace: programs to write, handover steps, policy statuses (pure).

The operator's reconciler gathers what it knows about one namespace into a
:class:`NamespaceView` (raw policies, Services, EndpointSlices, Pod labels,
existing ProxyVirtualServers, every ProxyNode report, the clock) and calls
:func:`plan_namespace`. The returned :class:`Plan` says exactly what to do:
which ProxyVirtualServers to write (only those whose content changed) or
delete, which Services to label or unlabel for the handover with kube-proxy,
the status of every policy and the Events of condition transitions. Nothing
here talks to the API server, so every rule is unit-tested directly.

Handover order: a Service is labelled ``service.kubernetes.io/service-proxy-name``
only once every node reports its current program; when no live policy
selects it any more, the label goes first, and its ProxyVirtualServer is
deleted only ``handover_delay`` seconds later, so kube-proxy has programmed
the Service again before the agents withdraw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from svcproxy.api.common import HANDOVER_LABEL, HANDOVER_VALUE, Condition
from svcproxy.api.node import ProxyNode
from svcproxy.api.policy import PolicyServiceStatus, ServiceProxyPolicy, ServiceProxyPolicyStatus
from svcproxy.api.program import ProxyVirtualServerSpec
from svcproxy.compile.conflicts import selects, why_wins, winner
from svcproxy.compile.memo import MAX_PROGRAM_BYTES, Compiled, PlanMemo, resource_version
from svcproxy.compile.program import NotProxied, not_proxied

JSON = dict[str, Any]
CONDITION_TYPES = ("Accepted", "Programmed", "Conflicted", "Degraded")
__all__ = ["MAX_PROGRAM_BYTES", "Event", "NamespaceView", "Plan", "PlanMemo", "plan_namespace"]
# Conditions whose "True" is bad news (no Event when they start out False).
_BAD_WHEN_TRUE = {"Conflicted", "Degraded"}
# Transitions worth a Warning Event; the rest are Normal.
_WARNINGS = {("Accepted", "False"), ("Conflicted", "True"), ("Degraded", "True")}


@dataclass(frozen=True)
class NamespaceView:
    """Everything the planner reads about one namespace (plain API objects)."""

    namespace: str
    policies: Sequence[JSON]
    services: Mapping[str, JSON]
    slices: Mapping[str, Sequence[JSON]]  # Service name -> its EndpointSlices
    pod_labels: Mapping[str, Mapping[str, str]]
    programs: Mapping[str, JSON]  # existing ProxyVirtualServers by name
    nodes: Sequence[ProxyNode]
    now: float  # seconds, the reconciler's monotonic-ish clock
    now_iso: str  # RFC 3339, for lastTransitionTime
    unlabelled_at: Mapping[str, float] = field(default_factory=dict)
    handover_delay: float = 3.0
    # Names of the Nodes that should run an agent (Ready, matching the agents' node
    # selector); None when the operator cannot list Nodes: then the ProxyNode reports
    # alone say how many nodes there are, and a node whose agent never started is missed.
    expected_nodes: frozenset[str] | None = None

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
class Plan:
    """What the reconciler does for one namespace, in this order."""

    writes: dict[str, ProxyVirtualServerSpec] = field(default_factory=dict)
    label: list[str] = field(default_factory=list)
    unlabel: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    statuses: dict[str, JSON] = field(default_factory=dict)  # policy -> status (wire form)
    events: list[Event] = field(default_factory=list)
    unlabelled_at: dict[str, float] = field(default_factory=dict)
    recheck_at: float | None = None  # run again then: a handover delay ends
    owned_after: dict[str, str] = field(default_factory=dict)  # PVS name -> policy, once applied
    compiled: dict[str, ProxyVirtualServerSpec] = field(default_factory=dict)


def _key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _labelled(service: JSON) -> str | None:
    labels = (service.get("metadata") or {}).get("labels") or {}
    value = labels.get(HANDOVER_LABEL)
    return value if isinstance(value, str) else None


def _owner_of(program: JSON) -> str | None:
    spec = program.get("spec") or {}
    policy = spec.get("policy") or {}
    name = policy.get("name")
    return name if isinstance(name, str) else None


def plan_namespace(view: NamespaceView, memo: PlanMemo | None = None) -> Plan:
    """Decide programs, handover steps and statuses for every policy in ``view``.

    ``memo`` (one per namespace, kept by the caller between passes) lets a pass
    reuse the programs and status rows whose inputs did not change; the result
    is the same as with no memo (see :mod:`svcproxy.compile.memo`).
    """
    memo = memo if memo is not None else PlanMemo()
    memo.begin()
    plan = Plan(unlabelled_at=dict(view.unlabelled_at))
    # From here on ``view.nodes`` holds only the reports that count.
    view = replace(view, nodes=view.counted_nodes())
    raw_by_name = {str((raw.get("metadata") or {}).get("name", "")): raw for raw in view.policies}
    every = memo.parse_policies(view.policies)
    parsed = {n: p.policy for n, p in every.items() if p.policy is not None}
    invalid = {n: p.error for n, p in every.items() if p.policy is None}
    token = memo.policies_token(every)

    # Who selects what, and who wins each Service.
    selected_by: dict[str, list[ServiceProxyPolicy]] = {}
    for svc_name, svc in sorted(view.services.items()):
        rv = resource_version(svc)
        names = memo.selecting(svc_name, rv, token)
        if names is None:
            names = tuple(n for n, policy in parsed.items() if selects(policy, svc))
            memo.remember_selection(svc_name, rv, token, names)
        if names:
            selected_by[svc_name] = [parsed[n] for n in names]

    desired: dict[str, ProxyVirtualServerSpec] = {}
    wires: dict[str, Compiled] = {}
    not_proxied_by_svc: dict[str, NotProxied] = {}
    for svc_name, pols in selected_by.items():
        svc = view.services[svc_name]
        other = _labelled(svc)
        why = not_proxied(svc)
        if why is None and other is not None and other != HANDOVER_VALUE:
            why = NotProxied(
                "OtherProxy", f"the Service is handed to proxy {other!r} by its {HANDOVER_LABEL} label"
            )
        if why is not None:
            not_proxied_by_svc[svc_name] = why
            continue
        win = pols[0] if len(pols) == 1 else winner(pols)
        entry = memo.compile(
            svc_name, every[win.metadata.name], svc, view.slices.get(svc_name, ()), view.pod_labels
        )
        if isinstance(entry.result, NotProxied):
            not_proxied_by_svc[svc_name] = entry.result
        else:
            desired[svc_name] = entry.result
            wires[svc_name] = entry
    plan.compiled = dict(desired)

    _plan_programs(view, desired, wires, plan)
    for name, policy in parsed.items():
        status, rows = _policy_status(view, policy, selected_by, desired, not_proxied_by_svc, memo=memo)
        _finish_status(view, name, raw_by_name[name], status, plan, rows=rows)
    for name, error in invalid.items():
        generation = (raw_by_name[name].get("metadata") or {}).get("generation")
        status = ServiceProxyPolicyStatus(
            observed_generation=generation,
            conditions=[
                Condition(type="Accepted", status="False", reason="InvalidSpec", message=error),
                Condition(type="Programmed", status="False", reason="InvalidSpec", message="spec is invalid"),
            ],
        )
        _finish_status(view, name, raw_by_name[name], status, plan, rows=[])
    memo.end()
    return plan


def _plan_programs(
    view: NamespaceView,
    desired: Mapping[str, ProxyVirtualServerSpec],
    compiled: Mapping[str, Compiled],
    plan: Plan,
) -> None:
    """Writes, labels, unlabels and deletes, in handover order."""
    for svc_name, spec in sorted(desired.items()):
        if _needs_write(view.programs.get(svc_name), compiled[svc_name]):
            plan.writes[svc_name] = spec
        plan.owned_after[svc_name] = spec.policy.name
        plan.unlabelled_at.pop(svc_name, None)
        svc = view.services[svc_name]
        if _labelled(svc) is None and _all_nodes_applied(view, svc_name, spec.content_hash):
            plan.label.append(svc_name)
    for svc_name, svc in sorted(view.services.items()):
        if svc_name not in desired and _labelled(svc) == HANDOVER_VALUE:
            plan.unlabel.append(svc_name)
            plan.unlabelled_at[svc_name] = view.now
    for pvs_name, program in sorted(view.programs.items()):
        if pvs_name in desired:
            continue
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
        if svc_name not in view.programs and svc_name not in plan.unlabel:
            plan.unlabelled_at.pop(svc_name)


def _needs_write(existing: JSON | None, entry: Compiled) -> bool:
    """True unless the stored program equals the compiled one (a hand edit is put back)."""
    if existing is None:
        return True
    rv = resource_version(existing)
    if rv is not None and rv == entry.stored_rv:
        return False  # this very version was compared before
    if (existing.get("spec") or {}) != entry.wire:
        return True
    entry.stored_rv = rv
    return False


def _all_nodes_applied(view: NamespaceView, svc_name: str, content_hash: str) -> bool:
    key = _key(view.namespace, svc_name)
    total = view.nodes_total()
    return bool(total) and sum(1 for n in view.nodes if n.status.applied.get(key) == content_hash) == total


def _fallback_nodes(view: NamespaceView, mode: str) -> list[str]:
    out = []
    for node in view.nodes:
        if any(m.requested == mode and m.effective != m.requested for m in node.status.modes):
            out.append(node.metadata.name)
    return out


def _policy_status(
    view: NamespaceView,
    policy: ServiceProxyPolicy,
    selected_by: Mapping[str, Sequence[ServiceProxyPolicy]],
    desired: Mapping[str, ProxyVirtualServerSpec],
    not_proxied_by_svc: Mapping[str, NotProxied],
    *,
    memo: PlanMemo,
) -> tuple[ServiceProxyPolicyStatus, list[JSON]]:
    """The policy's status without its rows, and the rows (wire form, one per Service).

    A row is rebuilt only when what it shows changed (its key); the node counts come
    from the compiled programs' content hashes, so a ProxyNode report never recompiles.
    """
    name = policy.metadata.name
    total = view.nodes_total()
    rows: list[JSON] = []
    pending: list[str] = []
    conflicts: list[str] = []
    mine: list[str] = []
    fallback = _fallback_nodes(view, policy.spec.mode)
    fallback_text = {policy.spec.mode: _fallback_text(view, policy.spec.mode, fallback)} if fallback else {}
    applied = [n.status.applied for n in view.nodes]
    complete = [0] * len(applied)  # per node: how many of ``mine`` it reports current
    for svc_name in sorted(
        s for s, pols in selected_by.items() if any(p.metadata.name == name for p in pols)
    ):
        svc = view.services[svc_name]
        state: tuple[Any, ...]
        if svc_name in not_proxied_by_svc:
            state = ("NotProxied", not_proxied_by_svc[svc_name].message)
        else:
            win = winner(selected_by[svc_name])
            if win.metadata.name != name:
                text = f"Service {svc_name}: policy {win.metadata.name} wins ({why_wins(win, policy)})"
                conflicts.append(text)
                state = ("Conflicted", text)
            else:
                mine.append(svc_name)
                spec = desired[svc_name]
                key = _key(view.namespace, svc_name)
                done = 0
                for i, report in enumerate(applied):
                    if report.get(key) == spec.content_hash:
                        done += 1
                        complete[i] += 1
                if fallback and spec.mode not in fallback_text:
                    fallback_text[spec.mode] = _fallback_text(view, spec.mode, fallback)
                mode = spec.mode + (f" ({fallback_text[spec.mode]})" if fallback else "")
                programmed = bool(total) and done == total
                message = "" if programmed else f"{done}/{total} nodes report content {spec.content_hash}"
                state = ("Programmed" if programmed else "Pending", mode, done, message)
                if not programmed:
                    pending.append(f"{svc_name}: {done}/{total} nodes")
        rv = resource_version(svc)
        row_key = (rv, total, state) if rv is not None else None
        row = memo.row(name, svc_name, row_key)
        if row is None:
            row = _row(svc_name, svc, total, state)
            memo.remember_row(name, svc_name, row_key, row)
        rows.append(row)
    missing = sorted(set(policy.spec.services or ()) - set(view.services))
    conditions = [
        _accepted(len(rows), missing),
        _programmed(view, pending, mine),
        Condition(
            type="Conflicted",
            status="True" if conflicts else "False",
            reason="OtherPolicyWins" if conflicts else "NoConflict",
            message="; ".join(conflicts)[:4000],
        ),
        _degraded(view, mine, fallback, policy.spec.mode),
    ]
    nodes_all = sum(1 for count in complete if mine and count == len(mine))
    status = ServiceProxyPolicyStatus(
        observed_generation=policy.metadata.generation,
        conditions=conditions,
        programmed=f"{nodes_all}/{total}",
    )
    return status, rows


def _row(svc_name: str, svc: JSON, total: int, state: tuple[Any, ...]) -> JSON:
    """One status row in wire form; ``state`` is (kind, message) or (kind, mode, done, message)."""
    svc_spec = svc.get("spec") or {}
    ports = [
        f"{p.get('port')}/{p.get('protocol') or 'TCP'}"
        for p in svc_spec.get("ports") or []
        if isinstance(p, dict)
    ]
    cluster_ip = svc_spec.get("clusterIP") if isinstance(svc_spec.get("clusterIP"), str) else None
    base: JSON = {"name": svc_name, "cluster_ip": cluster_ip, "ports": ports, "nodes_total": total}
    if state[0] in ("NotProxied", "Conflicted"):
        row = PolicyServiceStatus(**base, state=state[0], message=state[1])
    else:
        kind, mode, done, message = state
        row = PolicyServiceStatus(**base, mode=mode, state=kind, nodes_programmed=done, message=message)
    return row.wire()


def _fallback_text(view: NamespaceView, mode: str, nodes: list[str]) -> str:
    effective = sorted(
        {
            m.effective
            for n in view.nodes
            for m in n.status.modes
            if m.requested == mode and m.effective != mode
        }
    )
    return f"{','.join(effective)} on {', '.join(nodes)}"


def _accepted(rows: int, missing: list[str]) -> Condition:
    if not rows:
        text = "no Service in this namespace matches the policy"
        if missing:
            text = f"Services not found: {', '.join(missing)}"
        return Condition(type="Accepted", status="False", reason="NoServicesFound", message=text[:4000])
    text = f"selects {rows} Service(s)"
    if missing:
        text += f"; not found: {', '.join(missing)}"
    return Condition(type="Accepted", status="True", reason="Accepted", message=text[:4000])


def _programmed(view: NamespaceView, pending: list[str], mine: list[str]) -> Condition:
    if not mine:
        return Condition(
            type="Programmed",
            status="False",
            reason="NothingToProgram",
            message="no Service is proxied by this policy",
        )
    silent = view.silent_nodes()
    if not view.nodes:
        text = "no ProxyNode reports yet"
        if silent:
            text += f" (no agent report from {', '.join(silent)})"
        return Condition(type="Programmed", status="False", reason="NoAgents", message=text[:4000])
    if pending:
        text = "; ".join(pending)
        if silent:
            text = f"no agent report from {', '.join(silent)}; {text}"
        return Condition(type="Programmed", status="False", reason="Pending", message=text[:4000])
    total = view.nodes_total()
    return Condition(
        type="Programmed",
        status="True",
        reason="Programmed",
        message=f"{len(mine)} Service(s) programmed on {total}/{total} nodes",
    )


def _degraded(view: NamespaceView, mine: list[str], fallback: list[str], mode: str) -> Condition:
    problems: list[str] = []
    if mine and fallback:
        problems.append(f"{mode} fell back to {_fallback_text(view, mode, fallback)}")
    keys = {_key(view.namespace, s) for s in mine}
    for node in view.nodes:
        for err in node.status.errors:
            if err.service in keys:
                problems.append(f"{node.metadata.name}: {err.service}: {err.message}")
    if problems:
        return Condition(
            type="Degraded", status="True", reason="NodeProblems", message="; ".join(problems)[:4000]
        )
    return Condition(type="Degraded", status="False", reason="AllNodesHealthy", message="")


def _finish_status(
    view: NamespaceView,
    name: str,
    raw: JSON,
    status: ServiceProxyPolicyStatus,
    plan: Plan,
    *,
    rows: list[JSON],
) -> None:
    """Carry lastTransitionTime over unchanged conditions; Events for transitions.

    ``rows`` are the status rows in wire form (``status`` itself holds none)."""
    old_conditions = {
        c.get("type"): c for c in ((raw.get("status") or {}).get("conditions") or []) if isinstance(c, dict)
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
        changed = not same or (old is not None and old.get("reason") != cond.reason)
        if cond.type == "Conflicted" and cond.status == "True" and old is not None:
            changed = changed or old.get("message") != cond.message
        if changed and not (old is None and cond.status == "False" and cond.type in _BAD_WHEN_TRUE):
            plan.events.append(
                Event(
                    policy=name,
                    type="Warning" if (cond.type, cond.status) in _WARNINGS else "Normal",
                    reason=f"{cond.type}{cond.status}" if not cond.reason else cond.reason,
                    message=f"{cond.type}={cond.status}: {cond.message}"[:1000],
                )
            )
    wire = status.model_copy(update={"conditions": conditions}).wire()
    wire["services"] = rows
    if (raw.get("status") or {}) != wire:
        plan.statuses[name] = wire
