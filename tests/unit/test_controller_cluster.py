"""The operator's cluster policy handlers on a fake writer: Namespace label changes and
cluster policy changes touch the right namespaces, the folded status is written once,
and the delete handler waits for the handover of every Service it held."""

from __future__ import annotations

from typing import Any

import kopf
import pytest
from test_compile_helpers import endpoint, endpoint_slice, proxy_node, service
from test_controller import Clock, FakeWriter
from test_planner_cluster import cluster_obj

from svcproxy.api import HANDOVER_LABEL
from svcproxy.controller import handlers
from svcproxy.controller.cache import Cache
from svcproxy.controller.reconciler import Reconciler

JSON = dict[str, Any]
SELECT = {"namespaceSelector": {"matchLabels": {"proxy": "on"}}, "mode": "iptables"}


class ClusterWriter(FakeWriter):
    def __init__(self, cache: Cache) -> None:
        super().__init__(cache)
        self.cluster_statuses: list[tuple[str, JSON]] = []

    async def patch_cluster_policy_status(self, name: str, status: JSON) -> JSON | None:
        self.cluster_statuses.append((name, status))
        obj = dict(self.cache.get("cpolicy", "", name) or {})
        return self._stamp({**obj, "metadata": dict(obj["metadata"]), "status": status})


def namespace_obj(name: str, labels: dict[str, str], rv: str = "1") -> JSON:
    return {"metadata": {"name": name, "resourceVersion": rv, "labels": labels}}


def _setup() -> tuple[Cache, ClusterWriter, Reconciler, Clock]:
    cache = Cache()
    writer = ClusterWriter(cache)
    clock = Clock()
    rec = Reconciler(cache, writer, handover_delay=3.0, clock=clock)
    rec.ready.set()
    cache.put("service", service("web"))
    cache.put("slice", endpoint_slice([endpoint("10.244.1.2")]))
    cache.put("namespace", namespace_obj("ns", {}))
    return cache, writer, rec, clock


class Touches:
    def __init__(self, rec: Reconciler) -> None:
        self.namespaces: list[str] = []
        self.cluster = 0
        rec.touch = self.namespaces.append  # type: ignore[method-assign]
        rec.touch_cluster = self._cluster  # type: ignore[method-assign]

    def _cluster(self) -> None:
        self.cluster += 1


def test_a_namespace_label_change_touches_that_namespace_only_when_labels_change() -> None:
    cache, _, rec, _ = _setup()
    cache.put("cpolicy", cluster_obj(spec=SELECT))
    touches = Touches(rec)
    handlers.observe(cache, rec, "namespace", {"type": "MODIFIED", "object": namespace_obj("ns", {}, "2")})
    assert touches.namespaces == []
    on = namespace_obj("ns", {"proxy": "on"}, "3")
    handlers.observe(cache, rec, "namespace", {"type": "MODIFIED", "object": on})
    assert touches.namespaces == ["ns"]
    assert cache.has_policies("ns")


def test_a_cluster_policy_change_touches_namespaces_it_selected_and_selects() -> None:
    cache, _, rec, _ = _setup()
    cache.put("namespace", namespace_obj("a", {"proxy": "on"}))
    cache.put("namespace", namespace_obj("b", {"proxy": "off"}))
    touches = Touches(rec)
    handlers.observe(cache, rec, "cpolicy", {"type": "ADDED", "object": cluster_obj(spec=SELECT)})
    assert touches.namespaces == ["a"] and touches.cluster == 1
    moved = cluster_obj(spec={**SELECT, "namespaceSelector": {"matchLabels": {"proxy": "off"}}})
    moved["metadata"]["resourceVersion"] = "2"
    handlers.observe(cache, rec, "cpolicy", {"type": "MODIFIED", "object": moved})
    assert touches.namespaces[1:] == ["a", "b"]  # selected before, selects now
    assert cache.has_policies("b") and not cache.has_policies("a")


async def test_cluster_status_is_written_once_then_only_on_change_and_deletion_hands_back() -> None:
    cache, writer, rec, clock = _setup()
    cache.put("namespace", namespace_obj("ns", {"proxy": "on"}, "2"))
    cache.put("cpolicy", cluster_obj(spec=SELECT))
    await rec.reconcile("ns")
    assert writer.programs["web"]["spec"]["mode"] == "iptables"
    await rec.write_cluster_statuses()
    assert [n for n, _ in writer.cluster_statuses] == ["default"]
    status = writer.cluster_statuses[0][1]
    assert status["summary"]["selected"] == 1 and status["summary"]["pending"] == 1
    assert ("default", "Normal", "Accepted") in writer.events  # Events like a namespaced policy's
    posted = len(writer.events)
    await rec.write_cluster_statuses()
    assert len(writer.cluster_statuses) == 1  # nothing changed: nothing written
    assert len(writer.events) == posted  # and no Event again
    digest = writer.programs["web"]["spec"]["contentHash"]
    cache.put("node", {"metadata": {"name": "node-1", "resourceVersion": "5"}, **_report(digest)})
    await rec.reconcile("ns")
    assert writer.labels == {"web": True}
    await rec.write_cluster_statuses()
    assert writer.cluster_statuses[-1][1]["programmed"] == "1/1"
    assert writer.events[posted:] == [("default", "Normal", "Programmed")]
    cache.put("service", service("web", labels={HANDOVER_LABEL: "svcproxy"}))
    deleting = cluster_obj(spec=SELECT)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-07T16:00:00Z"
    with pytest.raises(kopf.TemporaryError, match="handing ns/web back to kube-proxy"):
        await handlers.withdraw_cluster(cache, rec, deleting, wait=0)
    assert writer.labels == {"web": False} and "web" in writer.programs  # label first
    clock.now += 3.5
    await handlers.withdraw_cluster(cache, rec, deleting, wait=0)
    assert "web" not in writer.programs


def _report(digest: str) -> JSON:
    node = proxy_node("node-1", {"ns/web": digest})
    return {"status": node.status.model_dump(by_alias=True, mode="json")}
