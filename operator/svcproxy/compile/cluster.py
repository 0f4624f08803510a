"""Cluster policies in the per-namespace planner, and their status folded back (pure).

A ClusterServiceProxyPolicy is planned namespace by namespace: for each
namespace its namespaceSelector matches, :func:`for_namespace` hands the
planner a stand-in ServiceProxyPolicy named ``ClusterServiceProxyPolicy/<name>``
(no namespaced policy can have a ``/`` in its name), whose serviceSelector is
the cluster policy's (absent: every Service). :func:`svcproxy.compile.conflicts.precedence`
puts every stand-in below every namespaced policy. The planner reports one
:class:`ClusterPart` (counts, a few problem rows) per cluster policy and
namespace; :func:`cluster_status` folds the parts of every namespace into the
cluster policy's status, which stays small however many Services it selects.
Called by the operator's cache and reconciler (svcproxy.controller).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from svcproxy.api.clusterpolicy import (
    MAX_PROBLEM_ROWS,
    ClusterPolicyProblem,
    ClusterPolicySummary,
    ClusterServiceProxyPolicy,
    ClusterServiceProxyPolicyStatus,
)
from svcproxy.api.common import API_VERSION, Condition

JSON = dict[str, Any]
CLUSTER_PREFIX = "ClusterServiceProxyPolicy/"
_META = ("uid", "generation", "creationTimestamp")
_CONDITION_TEXT = 4000


def is_cluster(policy_name: str) -> bool:
    """True for the planner's stand-in of a cluster policy."""
    return policy_name.startswith(CLUSTER_PREFIX)


def cluster_name(policy_name: str) -> str:
    """The cluster policy's own name, from its stand-in's."""
    return policy_name[len(CLUSTER_PREFIX) :] if is_cluster(policy_name) else policy_name


@dataclass(frozen=True)
class ParsedCluster:
    """One stored cluster policy: the raw object, and its parse or why it does not parse."""

    raw: JSON
    policy: ClusterServiceProxyPolicy | None
    error: str

    @property
    def name(self) -> str:
        return str((self.raw.get("metadata") or {}).get("name", ""))

    @property
    def deleting(self) -> bool:
        return bool((self.raw.get("metadata") or {}).get("deletionTimestamp"))


def parse_cluster(raw: JSON) -> ParsedCluster:
    """Parse a stored cluster policy (its status is left out: the operator writes it)."""
    body = {k: v for k, v in raw.items() if k != "status"}
    try:
        return ParsedCluster(raw, ClusterServiceProxyPolicy.parse(body), "")
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        text = f"invalid spec ({err.error_count()} problem(s)); first at {where}: {first.get('msg')}"
        return ParsedCluster(raw, None, text[:1000])


def selects_namespace(policy: ClusterServiceProxyPolicy, labels: Mapping[str, str]) -> bool:
    """True when the policy's namespaceSelector (absent: every namespace) matches ``labels``."""
    selector = policy.spec.namespace_selector
    return selector is None or selector.matches(dict(labels))


def stand_in(policy: ClusterServiceProxyPolicy) -> JSON:
    """The ServiceProxyPolicy the planner sees for ``policy`` in one namespace."""
    spec = policy.spec.wire()
    spec.pop("namespaceSelector", None)
    spec.setdefault("serviceSelector", {})
    meta = policy.metadata.model_dump(by_alias=True, exclude_none=True)
    return {
        "apiVersion": API_VERSION,
        "kind": "ServiceProxyPolicy",
        "metadata": {
            "name": CLUSTER_PREFIX + policy.metadata.name,
            **{k: meta[k] for k in _META if k in meta},
        },
        "spec": spec,
    }


def for_namespace(policies: Iterable[ParsedCluster], labels: Mapping[str, str]) -> list[JSON]:
    """Stand-ins of the valid cluster policies, not being deleted, that select a namespace
    with ``labels``."""
    return [
        stand_in(p.policy)
        for p in policies
        if p.policy is not None and not p.deleting and selects_namespace(p.policy, labels)
    ]


@dataclass(frozen=True)
class ClusterPart:
    """What one cluster policy does in one namespace (made by the planner)."""

    selected: int = 0
    programmed: int = 0
    pending: int = 0
    overridden: int = 0
    conflicted: int = 0
    not_proxied: int = 0
    complete: frozenset[str] = frozenset()  # reporting nodes holding every program it proxies here
    problems: tuple[tuple[str, str, str], ...] = ()  # (Service, state, message), first few by name
    degraded: tuple[str, ...] = ()  # node problems with its Services, fallbacks

    @property
    def proxied(self) -> int:
        return self.programmed + self.pending


def _sum(parts: Iterable[ClusterPart]) -> ClusterPolicySummary:
    fields = ("selected", "programmed", "pending", "overridden", "conflicted", "not_proxied")
    totals = dict.fromkeys(fields, 0)
    namespaces = 0
    for part in parts:
        namespaces += part.selected > 0
        for f in fields:
            totals[f] += getattr(part, f)
    return ClusterPolicySummary(namespaces=namespaces, **totals)


def _problems(parts: Mapping[str, ClusterPart]) -> list[ClusterPolicyProblem]:
    rows = ((ns, *row) for ns, part in parts.items() for row in part.problems)
    first = heapq.nsmallest(MAX_PROBLEM_ROWS, rows)
    return [ClusterPolicyProblem(namespace=ns, name=n, state=s, message=m[:256]) for ns, n, s, m in first]


def _accepted(summary: ClusterPolicySummary) -> Condition:
    if summary.selected:
        message = f"selects {summary.selected} Service(s) in {summary.namespaces} namespace(s)"
        return Condition(type="Accepted", status="True", reason="Accepted", message=message)
    return Condition(
        type="Accepted",
        status="False",
        reason="NoServicesFound",
        message="no Service in the selected namespaces matches the policy",
    )


def _programmed(summary: ClusterPolicySummary, nodes_reporting: int, total: int) -> Condition:
    proxied = summary.programmed + summary.pending
    if not proxied:
        status, reason, message = "False", "NothingToProgram", "no Service is proxied by this policy"
    elif not nodes_reporting:
        status, reason, message = "False", "NoAgents", "no ProxyNode reports yet"
    elif summary.pending:
        status, reason = "False", "Pending"
        message = f"{summary.pending} of {proxied} Service(s) not reported by every node yet"
    else:
        status, reason = "True", "Programmed"
        message = f"{proxied} Service(s) programmed on {total}/{total} nodes"
    return Condition(type="Programmed", status=status, reason=reason, message=message)


def _conditions(
    summary: ClusterPolicySummary, parts: Mapping[str, ClusterPart], nodes_reporting: int, total: int
) -> list[Condition]:
    conflicted = Condition(
        type="Conflicted",
        status="True" if summary.conflicted else "False",
        reason="OtherPolicyWins" if summary.conflicted else "NoConflict",
        message=(
            f"{summary.conflicted} Service(s) taken by another ClusterServiceProxyPolicy"
            if summary.conflicted
            else ""
        ),
    )
    troubles = [f"{ns}: {text}" for ns in sorted(parts) for text in parts[ns].degraded]
    degraded = Condition(
        type="Degraded",
        status="True" if troubles else "False",
        reason="NodeProblems" if troubles else "AllNodesHealthy",
        message="; ".join(troubles)[:_CONDITION_TEXT],
    )
    return [_accepted(summary), _programmed(summary, nodes_reporting, total), conflicted, degraded]


def _carry(
    stored: JSON | None, conditions: Sequence[Condition], now_iso: str, generation: int | None
) -> list[Condition]:
    """Keep lastTransitionTime of conditions whose status did not change."""
    old = {c.get("type"): c for c in ((stored or {}).get("conditions") or []) if isinstance(c, dict)}
    out = []
    for cond in conditions:
        before = old.get(cond.type)
        same = before is not None and before.get("status") == cond.status
        stamp = before.get("lastTransitionTime") if same and before is not None else now_iso
        out.append(cond.model_copy(update={"last_transition_time": stamp, "observed_generation": generation}))
    return out


def cluster_status(
    parsed: ParsedCluster,
    parts: Mapping[str, ClusterPart],
    *,
    nodes_reporting: int,
    nodes_total: int,
    now_iso: str,
) -> JSON:
    """The cluster policy's status (wire form) from its per-namespace ``parts``."""
    generation = (parsed.raw.get("metadata") or {}).get("generation")
    stored = parsed.raw.get("status")
    if parsed.policy is None:
        conditions = [
            Condition(type="Accepted", status="False", reason="InvalidSpec", message=parsed.error),
            Condition(type="Programmed", status="False", reason="InvalidSpec", message="spec is invalid"),
        ]
        status = ClusterServiceProxyPolicyStatus(
            observed_generation=generation, conditions=_carry(stored, conditions, now_iso, generation)
        )
        return status.wire()
    summary = _sum(parts.values())
    proxying = [p.complete for p in parts.values() if p.proxied]
    complete = len(frozenset.intersection(*proxying)) if proxying else 0
    conditions = _conditions(summary, parts, nodes_reporting, nodes_total)
    status = ClusterServiceProxyPolicyStatus(
        observed_generation=generation,
        conditions=_carry(stored, conditions, now_iso, generation),
        programmed=f"{complete}/{nodes_total}",
        summary=summary,
        problems=_problems(parts),
    )
    return status.wire()
