"""Policy status for one planning pass: rows, conditions, Events (pure).

Called by :func:`svcproxy.compile.planner.plan.plan_namespace` once per policy.
A policy's rows (one per selected Service) and its counts are kept in the
planner memo (:class:`~svcproxy.compile.planner.memo.PolicyRows`) and only the rows
whose inputs changed are rebuilt: the Services whose record changed this
pass, and those whose program a node reports differently (a ProxyNode
report is folded in by comparing its ``applied`` map with the previous one,
against the content hashes already compiled; nothing is recompiled). When the
policies, the set of nodes or their modes change, every row is rebuilt.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from svcproxy.api.clusterpolicy import MAX_PROBLEM_ROWS
from svcproxy.api.common import Condition
from svcproxy.api.node import ProxyNode
from svcproxy.api.policy import PolicyServiceStatus, ServiceProxyPolicy, ServiceProxyPolicyStatus
from svcproxy.base import Mode
from svcproxy.compile.cluster import ClusterPart, is_cluster
from svcproxy.compile.conflicts import why_wins
from svcproxy.compile.planner.memo import Derived, PackedProgram, PlanMemo, PolicyRows, Row, ServiceRecord

JSON = dict[str, Any]


def changed_reports(previous: tuple[ProxyNode, ...], nodes: Sequence[ProxyNode]) -> set[str] | None:
    """``namespace/name`` keys whose applied hash differs on some node; None: the nodes differ."""
    if len(previous) != len(nodes):
        return None
    keys: set[str] = set()
    for old, new in zip(previous, nodes, strict=True):
        if old is new:
            continue
        if old.metadata.name != new.metadata.name:
            return None
        keys.update(k for k, _ in old.status.applied.items() ^ new.status.applied.items())
    return keys


def fallback_nodes(nodes: Sequence[ProxyNode], mode: Mode) -> list[str]:
    out = []
    for node in nodes:
        if any(m.requested == mode and m.effective != m.requested for m in node.status.modes):
            out.append(node.metadata.name)
    return out


def fallback_text(nodes: Sequence[ProxyNode], mode: Mode, names: list[str]) -> str:
    effective = sorted(
        {m.effective for n in nodes for m in n.status.modes if m.requested == mode and m.effective != mode}
    )
    return f"{','.join(effective)} on {', '.join(names)}"


class _Pass:
    """What every row of one policy reads in this pass."""

    def __init__(
        self,
        namespace: str,
        nodes: Sequence[ProxyNode],
        total: int,
        policy: ServiceProxyPolicy,
        parsed: Mapping[str, ServiceProxyPolicy],
    ) -> None:
        self.namespace = namespace
        self.nodes = nodes
        self.applied = [n.status.applied for n in nodes]
        self.total = total
        self.policy = policy
        self.parsed = parsed
        self.fallback = fallback_nodes(nodes, policy.spec.mode)
        self.fallback_texts: dict[str, str] = {}

    def mode_text(self, mode: Mode) -> str:
        if not self.fallback:
            return mode
        if mode not in self.fallback_texts:
            self.fallback_texts[mode] = fallback_text(self.nodes, mode, self.fallback)
        return f"{mode} ({self.fallback_texts[mode]})"

    def row(self, svc_name: str, rec: ServiceRecord) -> Row:
        name = self.policy.metadata.name
        total = self.total
        if rec.why is not None:
            state: tuple[Any, ...] = ("NotProxied", rec.why.message)
            return Row(state, _wire(svc_name, rec.service, total, state), False, 0, None, None)
        assert rec.winner is not None and rec.entry is not None
        if rec.winner != name:
            win = self.parsed[rec.winner]
            text = f"Service {svc_name}: policy {win.metadata.name} wins ({why_wins(win, self.policy)})"
            state = ("Conflicted", text)
            return Row(state, _wire(svc_name, rec.service, total, state), False, 0, None, text)
        spec = rec.entry.result
        assert isinstance(spec, PackedProgram)
        key = f"{self.namespace}/{svc_name}"
        mask = 0
        for i, report in enumerate(self.applied):
            if report.get(key) == spec.content_hash:
                mask |= 1 << i
        done = mask.bit_count()
        programmed = bool(total) and done == total
        message = "" if programmed else f"{done}/{total} nodes report content {spec.content_hash}"
        state = ("Programmed" if programmed else "Pending", self.mode_text(spec.mode), done, message)
        pending = None if programmed else f"{svc_name}: {done}/{total} nodes"
        return Row(state, _wire(svc_name, rec.service, total, state), True, mask, pending, None)


def _wire(svc_name: str, svc: JSON, total: int, state: tuple[Any, ...]) -> JSON:
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


def _count(rows: PolicyRows, name: str, row: Row, sign: int) -> None:
    if row.mine:
        rows.mine += sign
        for i in range(len(rows.missing)):
            if not row.mask >> i & 1:
                rows.missing[i] += sign
    for texts, text in ((rows.pending, row.pending), (rows.conflicts, row.conflict)):
        if text is None:
            continue
        if sign > 0:
            texts[name] = text
        else:
            texts.pop(name, None)


def _redo(
    rows: PolicyRows,
    namespace: str,
    selected: Collection[str],
    touched: Collection[str],
    reports: Collection[str],
) -> set[str]:
    """The rows to rebuild: touched Services this policy selects or has a row of, and
    those whose node reports changed; resets the names when the selection changed."""
    redo = {n for n in touched if n in selected or n in rows.rows}
    prefix = f"{namespace}/"
    for key in reports:
        svc_name = key[len(prefix) :] if key.startswith(prefix) else None
        old = rows.rows.get(svc_name) if svc_name is not None else None
        if svc_name is not None and old is not None and old.mine:
            redo.add(svc_name)
    if any((n in selected) != (n in rows.rows) for n in redo):
        rows.names = sorted(selected)
        rows.wires = None  # rebuilt by the caller
    return redo


def policy_rows(
    *,
    namespace: str,
    nodes: Sequence[ProxyNode],
    total: int,
    policy: ServiceProxyPolicy,
    parsed: Mapping[str, ServiceProxyPolicy],
    records: Mapping[str, ServiceRecord],
    derived: Derived,
    touched: Collection[str] | None,
    reports: Collection[str] | None,
    memo: PlanMemo,
) -> PolicyRows:
    """The policy's rows, rebuilt where ``touched`` Services or changed ``reports`` say.

    ``touched`` (Services whose record changed or that are gone) or ``reports``
    (changed ``namespace/name`` keys) being None means: rebuild every row.
    """
    name = policy.metadata.name
    selected = derived.selected.get(name, set())
    shape = (total, [(n.metadata.name, n.status.modes) for n in nodes])
    rows = memo.policy_rows.get(name)
    work = _Pass(namespace, nodes, total, policy, parsed)
    if (
        rows is None
        or rows.token is not derived.token
        or rows.shape != shape
        or touched is None
        or reports is None
    ):
        rows = PolicyRows(
            token=derived.token, shape=shape, names=sorted(selected), rows={}, missing=[0] * len(nodes)
        )
        redo: Collection[str] = rows.names
    else:
        redo = _redo(rows, namespace, selected, touched, reports)
    for svc_name in redo:
        old = rows.rows.pop(svc_name, None)
        if old is not None:
            _count(rows, svc_name, old, -1)
        if svc_name in selected:
            row = work.row(svc_name, records[svc_name])
            rows.rows[svc_name] = row
            _count(rows, svc_name, row, +1)
    if rows.wires is None or len(rows.wires) != len(rows.names):
        rows.wires = [rows.rows[n].wire for n in rows.names]
        rows.index = {n: i for i, n in enumerate(rows.names)}
    elif redo:
        rows.wires = list(rows.wires)  # a new list: the status compares by identity first
        for svc_name in redo:
            rows.wires[rows.index[svc_name]] = rows.rows[svc_name].wire
    memo.policy_rows[name] = rows
    return rows


def policy_status(
    *,
    namespace: str,
    nodes: Sequence[ProxyNode],
    total: int,
    silent: list[str],
    services: Collection[str],
    policy: ServiceProxyPolicy,
    rows: PolicyRows,
) -> ServiceProxyPolicyStatus:
    """The policy's status without its rows (they are ``rows.wires``)."""
    fallback = fallback_nodes(nodes, policy.spec.mode)
    missing = sorted(s for s in set(policy.spec.services or ()) if s not in services)
    conflicts = [rows.conflicts[n] for n in sorted(rows.conflicts)]
    conditions = [
        _accepted(len(rows.names), missing),
        _programmed(nodes, total, silent, rows),
        Condition(
            type="Conflicted",
            status="True" if conflicts else "False",
            reason="OtherPolicyWins" if conflicts else "NoConflict",
            message="; ".join(conflicts)[:4000],
        ),
        _degraded(namespace, nodes, rows, fallback, policy.spec.mode),
    ]
    nodes_all = sum(1 for count in rows.missing if rows.mine and count == 0)
    return ServiceProxyPolicyStatus(
        observed_generation=policy.metadata.generation,
        conditions=conditions,
        programmed=f"{nodes_all}/{total}",
    )


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


def _programmed(nodes: Sequence[ProxyNode], total: int, silent: list[str], rows: PolicyRows) -> Condition:
    if not rows.mine:
        return Condition(
            type="Programmed",
            status="False",
            reason="NothingToProgram",
            message="no Service is proxied by this policy",
        )
    if not nodes:
        text = "no ProxyNode reports yet"
        if silent:
            text += f" (no agent report from {', '.join(silent)})"
        return Condition(type="Programmed", status="False", reason="NoAgents", message=text[:4000])
    if rows.pending:
        text = "; ".join(rows.pending[n] for n in sorted(rows.pending))
        if silent:
            text = f"no agent report from {', '.join(silent)}; {text}"
        return Condition(type="Programmed", status="False", reason="Pending", message=text[:4000])
    return Condition(
        type="Programmed",
        status="True",
        reason="Programmed",
        message=f"{rows.mine} Service(s) programmed on {total}/{total} nodes",
    )


def _degraded(
    namespace: str, nodes: Sequence[ProxyNode], rows: PolicyRows, fallback: list[str], mode: Mode
) -> Condition:
    problems: list[str] = []
    if rows.mine and fallback:
        problems.append(f"{mode} fell back to {fallback_text(nodes, mode, fallback)}")
    for node in nodes:
        for err in node.status.errors:
            ns, _, svc_name = err.service.partition("/")
            row = rows.rows.get(svc_name) if ns == namespace else None
            if row is not None and row.mine:
                problems.append(f"{node.metadata.name}: {err.service}: {err.message}")
    if problems:
        return Condition(
            type="Degraded", status="True", reason="NodeProblems", message="; ".join(problems)[:4000]
        )
    return Condition(type="Degraded", status="False", reason="AllNodesHealthy", message="")


def cluster_part(
    *,
    namespace: str,
    nodes: Sequence[ProxyNode],
    policy: ServiceProxyPolicy,
    rows: PolicyRows,
    records: Mapping[str, ServiceRecord],
) -> ClusterPart:
    """A cluster policy's counts in one namespace, from its rows (its stand-in's, in
    ``policy``): a Service another policy wins is overridden when a namespaced policy
    takes it, conflicted when another cluster policy does. Costs the number of
    pending and lost Services, not of selected ones."""
    overridden = conflicted = 0
    problems: list[tuple[str, str, str]] = []
    for svc_name, text in rows.conflicts.items():
        rec = records.get(svc_name)
        taken_by_cluster = rec is not None and rec.winner is not None and is_cluster(rec.winner)
        conflicted += taken_by_cluster
        overridden += not taken_by_cluster
        problems.append((svc_name, "Conflicted" if taken_by_cluster else "Overridden", text))
    problems.extend((svc_name, "Pending", text) for svc_name, text in rows.pending.items())
    complete = frozenset(n.metadata.name for n, gaps in zip(nodes, rows.missing, strict=False) if gaps == 0)
    degraded = _degraded(namespace, nodes, rows, fallback_nodes(nodes, policy.spec.mode), policy.spec.mode)
    return ClusterPart(
        selected=len(rows.names),
        programmed=rows.mine - len(rows.pending),
        pending=len(rows.pending),
        overridden=overridden,
        conflicted=conflicted,
        not_proxied=len(rows.names) - rows.mine - len(rows.conflicts),
        complete=complete,
        problems=tuple(heapq.nsmallest(MAX_PROBLEM_ROWS, problems)),
        degraded=(degraded.message,) if degraded.status == "True" else (),
    )
