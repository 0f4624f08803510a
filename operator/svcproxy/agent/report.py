"""The ProxyNode report: status built from the agent's state, sent as a merge patch.

:func:`build_status` turns an :class:`AgentSnapshot` into the wire form of
``ProxyNodeStatus`` (validated through the model, so a bad report fails
here, not at the API server). :func:`merge_patch` computes the RFC 7386
JSON merge patch from the last status sent to the new one: only what
changed, removed keys as null (an owner leaving ``applied`` becomes
``"ns/name": null``). :class:`ReportThrottle` keeps writes to at most one
per ``min_interval`` seconds. Pure; the agent's writer (``kube.py``) does
the I/O.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from svcproxy.agent.routing import Route, modes_summary
from svcproxy.api.node import ProxyNodeStatus
from svcproxy.base import Mode
from svcproxy.dataplane.capabilities import ModeCapabilities

MAX_ERRORS = 100


@dataclass(frozen=True)
class OwnerError:
    owner: str
    message: str
    time: float  # wall clock, seconds since the epoch
    reason: str | None = None  # set for a refused program (svcproxy.agent.trust)


@dataclass(frozen=True)
class AgentSnapshot:
    """Everything the report says, read from the agent in one go."""

    node_name: str
    agent_version: str
    capabilities: Mapping[Mode, ModeCapabilities]
    kernel_release: str
    routes: Sequence[Route]
    applied: Mapping[str, str]
    services: int
    virtual_servers: int
    real_servers: int
    errors: Sequence[OwnerError] = ()
    last_sync_time: float | None = None
    last_sync_duration: float | None = None
    ready: bool = False
    ready_reason: str = "Starting"
    ready_message: str = ""
    extra_errors: Sequence[str] = field(default_factory=tuple)


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _capabilities(snap: AgentSnapshot) -> dict[str, Any]:
    ipvs = snap.capabilities.get("ipvs")
    ipt = snap.capabilities.get("iptables")
    user = snap.capabilities.get("userspace")
    return {
        "ipvs": bool(ipvs and ipvs.available),
        "schedulers": sorted(ipvs.schedulers) if ipvs and ipvs.available else [],
        "netfilterBackend": (ipt.backend or "iptables") if ipt and ipt.available else "none",
        "userspace": bool(user and user.available),
        "kernelRelease": snap.kernel_release,
    }


def build_status(snap: AgentSnapshot, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``status`` of the node's ProxyNode, in wire form.

    ``previous`` (the last status sent) keeps the Ready condition's
    lastTransitionTime while its status does not change.
    """
    now = snap.last_sync_time
    errors: list[dict[str, Any]] = [
        {"service": e.owner, "message": e.message[:32768], "time": rfc3339(e.time)}
        | ({"reason": e.reason} if e.reason else {})
        for e in sorted(snap.errors, key=lambda e: e.owner)[:MAX_ERRORS]
    ]
    for message in snap.extra_errors[: max(0, MAX_ERRORS - len(errors))]:
        errors.append({"service": "", "message": message})
    ready = "True" if snap.ready else "False"
    transition = rfc3339(now) if now is not None else None
    for cond in (previous or {}).get("conditions", []):
        if cond.get("type") == "Ready" and cond.get("status") == ready:
            transition = cond.get("lastTransitionTime", transition)
    condition: dict[str, Any] = {
        "type": "Ready",
        "status": ready,
        "reason": snap.ready_reason,
        "message": snap.ready_message,
    }
    if transition:
        condition["lastTransitionTime"] = transition
    routes = sorted(set(snap.routes), key=lambda r: (r.requested, r.effective, r.reason))
    status = ProxyNodeStatus.model_validate(
        {
            "nodeName": snap.node_name,
            "agentVersion": snap.agent_version,
            "capabilities": _capabilities(snap),
            "modes": [
                {"requested": r.requested, "effective": r.effective, "reason": r.reason} for r in routes
            ],
            "modesSummary": modes_summary(list(routes)),
            "applied": dict(snap.applied),
            "counts": {
                "services": snap.services,
                "virtualServers": snap.virtual_servers,
                "realServers": snap.real_servers,
            },
            "lastSyncTime": rfc3339(now) if now is not None else None,
            "lastSyncDurationSeconds": (
                round(snap.last_sync_duration, 6) if snap.last_sync_duration is not None else None
            ),
            "errors": errors,
            "conditions": [condition],
        }
    )
    return status.wire()


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning ``old`` into ``new`` (lists are replaced whole)."""
    patch: dict[str, Any] = {}
    for key in old:
        if key not in new:
            patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if key in old and before == value:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        else:
            patch[key] = value
    return patch


class ReportThrottle:
    """At most one write per ``min_interval``; never a write when nothing changed."""

    def __init__(self, min_interval: float = 1.0) -> None:
        self.min_interval = min_interval
        self.sent: dict[str, Any] | None = None  # last status the API server accepted
        self._last_write: float | None = None

    def due_at(self) -> float:
        return float("-inf") if self._last_write is None else self._last_write + self.min_interval

    def patch_for(self, status: dict[str, Any], now: float) -> dict[str, Any] | None:
        """The merge patch to send now, or None (too soon, or nothing changed)."""
        if now < self.due_at():
            return None
        patch = merge_patch(self.sent or {}, status) if self.sent is not None else dict(status)
        return patch or None

    def written(self, status: dict[str, Any], now: float) -> None:
        self.sent = status
        self._last_write = now

    def forget(self) -> None:
        """After a failed write or a recreated object: send everything next time."""
        self.sent = None
