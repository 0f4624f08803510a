"""Which policies select which Services, and who wins when several do (pure).

``selects(policy, service)`` applies a policy's ``serviceSelector`` or
``services`` list; ``winner(policies)`` settles a Service selected by more than
one policy: any namespaced policy beats every cluster policy's stand-in (see
:mod:`svcproxy.compile.cluster`); among the rest the higher ``priority`` wins,
then the older policy (creation time), then the smaller name, so every
operator replica picks the same one.
Called by :mod:`svcproxy.compile.planner.plan` and by ``svcproxy plan``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.compile.cluster import is_cluster

_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def selects(policy: ServiceProxyPolicy, service: dict[str, Any]) -> bool:
    """True when ``policy`` picks ``service`` (same namespace is the caller's job)."""
    meta = service.get("metadata") or {}
    spec = policy.spec
    if spec.services is not None:
        return meta.get("name") in spec.services
    if spec.service_selector is not None:
        labels = meta.get("labels") or {}
        return spec.service_selector.matches({str(k): str(v) for k, v in labels.items()})
    return False


def created_at(policy: ServiceProxyPolicy) -> datetime:
    """The policy's creation time; unknown times sort last (a policy not yet stored)."""
    stamp = policy.metadata.creation_timestamp
    if not stamp:
        return _FAR_FUTURE
    try:
        parsed = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return _FAR_FUTURE
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def precedence(policy: ServiceProxyPolicy) -> tuple[bool, int, datetime, str]:
    """Sort key: the first in this order wins (namespaced before cluster, whatever the priority)."""
    return (is_cluster(policy.metadata.name), -policy.spec.priority, created_at(policy), policy.metadata.name)


def winner(policies: Sequence[ServiceProxyPolicy]) -> ServiceProxyPolicy:
    """The policy that programs a Service all of ``policies`` select."""
    if not policies:
        raise ValueError("winner() needs at least one policy")
    return min(policies, key=precedence)


def why_wins(win: ServiceProxyPolicy, lose: ServiceProxyPolicy) -> str:
    """Plain words for the loser's status: why ``win`` beats ``lose``."""
    if is_cluster(win.metadata.name) != is_cluster(lose.metadata.name):
        return "a ServiceProxyPolicy in the Service's namespace beats every ClusterServiceProxyPolicy"
    if win.spec.priority != lose.spec.priority:
        return f"higher priority ({win.spec.priority} > {lose.spec.priority})"
    if created_at(win) != created_at(lose):
        return "same priority, older policy"
    return "same priority and age, name sorts first"
