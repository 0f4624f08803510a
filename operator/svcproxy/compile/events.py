"""Which condition changes of a policy deserve a Kubernetes Event (pure).

Shared by both policy kinds: the namespace planner (ServiceProxyPolicy) and the
reconciler's fold of cluster policy statuses (ClusterServiceProxyPolicy), so an
operator reading ``kubectl get events`` sees the same transitions for either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

# Conditions whose "True" is bad news (no Event when they start out False).
BAD_WHEN_TRUE = frozenset({"Conflicted", "Degraded"})
# Transitions worth a Warning Event; the rest are Normal.
WARNINGS = frozenset({("Accepted", "False"), ("Conflicted", "True"), ("Degraded", "True")})


class Transition(NamedTuple):
    """An Event to post: Normal or Warning, its reason and message."""

    type: str
    reason: str
    message: str


def transition(
    old: Mapping[str, Any] | None, type_: str, status: str, reason: str | None, message: str
) -> Transition | None:
    """The Event for condition ``type_`` now at ``status`` (``old``: its stored form), or None.

    A changed status or reason posts one; so does a new message while Conflicted (another
    policy took over). A bad-news condition that starts out False posts nothing."""
    same = old is not None and old.get("status") == status
    changed = not same or (old is not None and old.get("reason") != reason)
    if type_ == "Conflicted" and status == "True" and old is not None:
        changed = changed or old.get("message") != message
    if not changed or (old is None and status == "False" and type_ in BAD_WHEN_TRUE):
        return None
    return Transition(
        "Warning" if (type_, status) in WARNINGS else "Normal",
        reason or f"{type_}{status}",
        f"{type_}={status}: {message}"[:1000],
    )


def transitions(
    stored: Mapping[str, Any] | None, conditions: Iterable[Mapping[str, Any]]
) -> list[Transition]:
    """The Events between a stored status and new wire-form conditions."""
    old = {c.get("type"): c for c in ((stored or {}).get("conditions") or []) if isinstance(c, dict)}
    out = []
    for cond in conditions:
        type_ = str(cond.get("type"))
        event = transition(
            old.get(type_), type_, str(cond.get("status")), cond.get("reason"), str(cond.get("message") or "")
        )
        if event is not None:
            out.append(event)
    return out
