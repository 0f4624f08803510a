"""The reconciler's writes of one pass: together (bounded), failures kept apart.

Against the in-memory writer of test_controller (single reconciler, no API server)."""

from __future__ import annotations

import asyncio
from typing import Any

from test_compile_helpers import endpoint, endpoint_slice, policy_obj, service
from test_controller import FakeWriter

from svcproxy.api import ProxyVirtualServerSpec
from svcproxy.controller import reconciler
from svcproxy.controller.cache import Cache
from svcproxy.controller.reconciler import Reconciler

JSON = dict[str, Any]
N = 40


class SlowWriter(FakeWriter):
    """Each program write takes a turn of the event loop, so writes can overlap."""

    def __init__(self, cache: Cache) -> None:
        super().__init__(cache)
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail_names: set[str] = set()

    async def write_program(self, namespace: str, service: JSON, spec: ProxyVirtualServerSpec) -> JSON:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.001)
            if service["metadata"]["name"] in self.fail_names:
                raise RuntimeError("API server unavailable")
            return await super().write_program(namespace, service, spec)
        finally:
            self.in_flight -= 1



def _namespace_of(n: int) -> tuple[Cache, SlowWriter, Reconciler]:
    cache = Cache()
    writer = SlowWriter(cache)
    rec = Reconciler(cache, writer, handover_delay=3.0)
    rec.ready.set()
    for i in range(n):
        name = f"svc-{i}"
        cache.put("service", service(name, cluster_ip=f"10.96.1.{i + 1}"))
        eps = endpoint_slice([endpoint(f"10.244.1.{i + 1}")], name=f"{name}-abc")
        eps["metadata"]["labels"]["kubernetes.io/service-name"] = name
        cache.put("slice", eps)
    cache.put("policy", policy_obj("p", {"services": [f"svc-{i}" for i in range(n)], "mode": "iptables"}))
    return cache, writer, rec


async def test_writes_of_a_pass_overlap_up_to_the_bound() -> None:
    _, writer, rec = _namespace_of(N)
    assert await rec.reconcile("ns") is not None
    assert len(writer.programs) == N
    assert 1 < writer.most_in_flight <= reconciler.WRITES_IN_FLIGHT


async def test_one_failed_write_keeps_the_others_and_the_pass_is_retried() -> None:
    cache, writer, rec = _namespace_of(N)
    writer.fail_names = {"svc-7"}
    assert await rec.reconcile("ns") is None
    assert rec.failures == {"ns": 1}
    assert len(writer.programs) == N - 1 and "svc-7" not in writer.programs
    assert cache.get("program", "ns", "svc-8") is not None  # what succeeded is known
    written = {n: p["metadata"]["resourceVersion"] for n, p in writer.programs.items()}
    writer.fail_names = set()
    assert await rec.reconcile("ns") is not None
    assert len(writer.programs) == N
    # The retry writes only what was missing.
    assert all(writer.programs[n]["metadata"]["resourceVersion"] == rv for n, rv in written.items())
