"""ProxyNode report building, the merge patch sent, and the write throttle."""

from __future__ import annotations

from typing import Any

import pytest

from svcproxy.agent.report import AgentSnapshot, OwnerError, ReportThrottle, build_status, merge_patch
from svcproxy.agent.routing import Route
from svcproxy.agent.watch import ExpiredError, PvsWatch, parse
from svcproxy.api.node import ProxyNodeStatus
from svcproxy.dataplane.capabilities import ModeCapabilities


def snapshot(**over: Any) -> AgentSnapshot:
    base: dict[str, Any] = dict(
        node_name="node-1",
        agent_version="0.1.0",
        capabilities={
            "ipvs": ModeCapabilities("ipvs", False, reason="IPVS is not available in this kernel"),
            "iptables": ModeCapabilities("iptables", True, backend="iptables-nft"),
            "userspace": ModeCapabilities("userspace", True),
        },
        kernel_release="6.1.0",
        routes=[Route("ipvs", "iptables", "IPVS is not available in this kernel"),
                Route("userspace", "userspace")],
        applied={"default/a": "h1", "default/b": "h2"},
        services=2, virtual_servers=3, real_servers=6,
        last_sync_time=1_700_000_000.0, last_sync_duration=0.0123, ready=True, ready_reason="Synced",
    )
    base.update(over)
    return AgentSnapshot(**base)


def test_status_says_ipvs_runs_as_iptables_and_validates_against_the_model() -> None:
    status = build_status(snapshot())
    ProxyNodeStatus.model_validate(status)
    assert status["capabilities"]["ipvs"] is False
    assert status["capabilities"]["netfilterBackend"] == "iptables-nft"
    assert {"requested": "ipvs", "effective": "iptables",
            "reason": "IPVS is not available in this kernel"} in status["modes"]
    assert status["modesSummary"] == "iptables(ipvs),userspace"
    assert status["applied"] == {"default/a": "h1", "default/b": "h2"}
    assert status["counts"] == {"services": 2, "virtualServers": 3, "realServers": 6}
    assert status["lastSyncTime"] == "2023-11-14T22:13:20Z"
    (ready,) = status["conditions"]
    assert ready["type"] == "Ready" and ready["status"] == "True"


def test_ready_transition_time_is_kept_while_status_holds() -> None:
    first = build_status(snapshot())
    later = build_status(snapshot(last_sync_time=1_700_000_100.0), first)
    assert later["conditions"][0]["lastTransitionTime"] == first["conditions"][0]["lastTransitionTime"]
    down = build_status(snapshot(last_sync_time=1_700_000_200.0, ready=False), later)
    assert down["conditions"][0]["lastTransitionTime"] == "2023-11-14T22:16:40Z"


def test_errors_are_listed_per_service() -> None:
    status = build_status(snapshot(errors=[OwnerError("default/x", "bad", 1_700_000_000.0)]))
    assert status["errors"] == [{"service": "default/x", "message": "bad", "time": "2023-11-14T22:13:20Z"}]


def test_merge_patch_sends_only_changes_and_nulls_removed_owners() -> None:
    old = build_status(snapshot())
    new = build_status(snapshot(applied={"default/a": "h9"}, last_sync_time=1_700_000_000.0))
    assert merge_patch(old, new) == {"applied": {"default/a": "h9", "default/b": None}}
    assert merge_patch(new, new) == {}


def apply_merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = apply_merge_patch(out[k], v)
        else:
            out[k] = v
    return out


def test_merge_patch_applied_to_old_gives_new() -> None:
    old = build_status(snapshot(errors=[OwnerError("default/x", "bad", 1.0)]))
    new = build_status(snapshot(applied={f"ns/s{i}": str(i) for i in range(50)}, services=50, ready=False))
    assert apply_merge_patch(old, merge_patch(old, new)) == new


def test_throttle_writes_at_most_once_per_second_and_not_when_unchanged() -> None:
    throttle = ReportThrottle(1.0)
    throttle.sent = {}
    first = build_status(snapshot())
    assert throttle.patch_for(first, now=10.0) == first
    throttle.written(first, 10.0)
    second = build_status(snapshot(applied={"default/a": "h1"}))
    assert throttle.patch_for(second, now=10.5) is None  # too soon
    assert throttle.patch_for(second, now=11.0) == {"applied": {"default/b": None}}
    throttle.written(second, 11.0)
    assert throttle.patch_for(second, now=20.0) is None  # nothing changed


def pvs_obj(name: str, rv: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"service": {"name": name}, "policy": {"name": "p"}, "mode": "iptables",
                     "contentHash": "h", **spec}}


def test_watch_events_update_desired_state_and_resource_version() -> None:
    seen: list[Any] = []
    w = PvsWatch.__new__(PvsWatch)
    w.on_upsert, w.on_delete = seen.append, seen.append
    w.resource_version = "1"
    w._event({"type": "ADDED", "object": pvs_obj("a", "5")})
    w._event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})
    assert w.resource_version == "9"
    w._event({"type": "DELETED", "object": pvs_obj("a", "10")})
    assert seen[0].owner == "ns/a" and seen[1] == "ns/a" and w.resource_version == "10"
    with pytest.raises(ExpiredError):
        w._event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})


def test_an_object_that_does_not_parse_programs_nothing_and_says_why() -> None:
    program = parse(pvs_obj("bad", "1", virtualServers=[{"address": "10.96.0.1", "port": 0}]))
    assert program.owner == "ns/bad" and program.by_mode == {}
    assert "does not parse" in program.error and "port" in program.error


def test_watch_stream_lines_longer_than_64k_are_reassembled() -> None:
    from svcproxy.agent.apiclient import LineBuffer

    big = b'{"a": "' + b"x" * 200_000 + b'"}'
    buf = LineBuffer()
    out: list[bytes] = []
    stream = big + b"\n" + b"{}\n\n" + b'{"b": 1}\n'
    for i in range(0, len(stream), 7000):
        out += buf.feed(stream[i:i + 7000])
    assert out == [big, b"{}", b'{"b": 1}']
