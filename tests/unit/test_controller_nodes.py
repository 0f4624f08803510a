"""Which Nodes must report: the operator's Node cache, selector parsing and the watch handler."""

from __future__ import annotations

from typing import Any

import pytest

from svcproxy.controller.cache import Cache, node_summary, parse_selector
from svcproxy.controller.handlers import observe
from svcproxy.controller.lister import apply_lists

JSON = dict[str, Any]


def node(
    name: str, ready: str = "True", labels: dict[str, str] | None = None, rv: int = 1, **meta: Any
) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "resourceVersion": str(rv), "labels": labels or {}, **meta},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False"},
                {"type": "Ready", "status": ready},
            ],
            "images": [{"names": ["big"], "sizeBytes": 1}] * 50,
        },
    }


class Touches:
    def __init__(self) -> None:
        self.all = 0

    def touch_all(self) -> None:
        self.all += 1

    def touch(self, namespace: str) -> None:  # pragma: no cover - not reached for Nodes
        raise AssertionError(f"a Node event touched namespace {namespace}")


def test_unknown_until_listed_then_ready_matching_nodes_only() -> None:
    cache = Cache(agent_node_selector={"svcproxy.io/agent": "true"})
    agent = {"svcproxy.io/agent": "true"}
    cache.put("k8snode", node("a", labels=agent))
    assert cache.expected_nodes() is None  # not listed yet: fall back to ProxyNodes
    cache.nodes_listed = True
    cache.put("k8snode", node("b", labels=agent, ready="Unknown"))
    cache.put("k8snode", node("c"))
    cache.put("k8snode", node("d", labels=agent, deletionTimestamp="2026-11-26T00:00:00Z"))
    assert cache.expected_nodes() == frozenset({"a"})
    cache.put("k8snode", node("b", labels=agent, rv=2))
    assert cache.expected_nodes() == frozenset({"a", "b"})
    cache.remove("k8snode", "", "a")
    assert cache.expected_nodes() == frozenset({"b"})


def test_node_summary_keeps_only_what_is_needed() -> None:
    small = node_summary(node("a", labels={"x": "y"}))
    assert small == {
        "metadata": {"name": "a", "resourceVersion": "1", "labels": {"x": "y"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


def test_parse_selector() -> None:
    assert parse_selector("") == {}
    assert parse_selector("a=b, c=") == {"a": "b", "c": ""}
    with pytest.raises(ValueError, match="'nope' is not key=value"):
        parse_selector("a=b,nope")


def test_node_events_touch_policies_only_when_the_expected_set_moves() -> None:
    cache = Cache()
    cache.nodes_listed = True
    touches = Touches()
    observe(cache, touches, "k8snode", {"type": "ADDED", "object": node("a")})  # type: ignore[arg-type]
    assert touches.all == 1
    heartbeat = node("a", rv=2)
    observe(cache, touches, "k8snode", {"type": "MODIFIED", "object": heartbeat})  # type: ignore[arg-type]
    assert touches.all == 1
    observe(cache, touches, "k8snode", {"type": "MODIFIED", "object": node("a", "False", rv=3)})  # type: ignore[arg-type]
    assert touches.all == 2
    observe(cache, touches, "k8snode", {"type": "DELETED", "object": node("a", "False", rv=4)})  # type: ignore[arg-type]
    assert touches.all == 2  # a NotReady node leaving changes nothing


def test_a_full_list_of_nodes_switches_counting_to_nodes() -> None:
    cache = Cache()
    cache.put("k8snode", node("gone"))
    apply_lists(cache, {"k8snode": {"metadata": {"resourceVersion": "9"}, "items": [node("a"), node("b")]}})
    assert cache.nodes_listed
    assert cache.expected_nodes() == frozenset({"a", "b"})
