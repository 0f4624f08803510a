"""The reconciler's planner memo and the cache pieces it relies on (slice lists, equal versions)."""

from __future__ import annotations

import copy
from typing import Any

from test_compile_helpers import endpoint, endpoint_slice, policy_obj, service
from test_controller import Clock, FakeWriter

from svcproxy.controller.cache import Cache
from svcproxy.controller.reconciler import Reconciler

JSON = dict[str, Any]


def _slice(name: str, rv: int, *addresses: str) -> JSON:
    out = endpoint_slice([endpoint(a) for a in addresses], name=f"{name}-x")
    out["metadata"]["labels"]["kubernetes.io/service-name"] = name
    out["metadata"]["resourceVersion"] = str(rv)
    return out


def _service(name: str, rv: int, index: int) -> JSON:
    out = service(name, cluster_ip=f"10.96.0.{10 + index}")
    out["metadata"]["resourceVersion"] = str(rv)
    return out


async def test_reconciler_recompiles_only_the_service_whose_slice_changed() -> None:
    cache = Cache()
    writer = FakeWriter(cache)
    rec = Reconciler(cache, writer, handover_delay=3.0, clock=Clock())
    rec.ready.set()
    names = [f"s{i}" for i in range(10)]
    for i, name in enumerate(names):
        cache.put("service", _service(name, 10 + i, i))
        cache.put("slice", _slice(name, 30 + i, f"10.244.1.{i + 2}"))
    cache.put("policy", policy_obj("p", {"services": names}))
    await rec.reconcile("ns")
    memo = rec.memos["ns"]
    assert sorted(memo.stats.last_compiled) == names and sorted(writer.programs) == names
    await rec.reconcile("ns")  # its own writes come back: nothing to compile
    assert memo.stats.last_compiled == []
    cache.put("slice", _slice("s4", 99, "10.244.1.6", "10.244.7.7"))
    await rec.reconcile("ns")
    assert memo.stats.last_compiled == ["s4"]
    reals = writer.programs["s4"]["spec"]["virtualServers"][0]["realServers"]
    assert [r["address"] for r in reals] == ["10.244.1.6", "10.244.7.7"]


def test_cache_replaces_a_services_slice_list_on_change_and_keeps_equal_versions() -> None:
    cache = Cache()
    cache.put("slice", _slice("web", 5, "10.244.1.2"))
    other = _slice("web", 6, "10.244.1.3")
    other["metadata"]["name"] = "web-y"
    cache.put("slice", other)
    view = lambda: cache.view("ns", now=0.0, now_iso="", unlabelled_at={}, handover_delay=3.0)  # noqa: E731
    first = view().slices["web"]
    assert sorted(s["metadata"]["name"] for s in first) == ["web-x", "web-y"]
    assert view().slices["web"] is first  # nothing changed: the very same list
    same = copy.deepcopy(cache.get("slice", "ns", "web-x"))
    assert same is not None
    cache.put("slice", same)  # a resync of the same version keeps the stored object
    assert view().slices["web"] is first
    cache.put("slice", _slice("web", 7, "10.244.1.9"))
    after = view().slices["web"]
    assert after is not first and len(after) == 2
    assert {s["endpoints"][0].address for s in after} == {"10.244.1.9", "10.244.1.3"}
    cache.remove("slice", "ns", "web-y")
    cache.remove("slice", "ns", "web-x")
    assert "web" not in view().slices
