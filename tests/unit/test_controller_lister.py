"""The lister reads every kind a page at a time over HTTP and merges each page into the cache.

A small HTTP server on 127.0.0.1 answers the list requests the way kube-apiserver does
(``limit`` / ``continue``, one snapshot resourceVersion for all pages, 403 for Nodes when
the operator may not list them); the operator's own kubernetes_asyncio client talks to it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from svcproxy.controller.cache import Cache
from svcproxy.controller.lister import PAGE, Lister

JSON = dict[str, Any]
SERVICES = PAGE * 2 + 7  # three pages


def _service(i: int) -> JSON:
    return {
        "metadata": {"name": f"s{i}", "namespace": "ns", "resourceVersion": str(10 + i)},
        "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "ports": [{"port": 80}]},
    }


class FakeApiServer:
    def __init__(self, nodes_allowed: bool) -> None:
        self.nodes_allowed = nodes_allowed
        self.requests: list[tuple[str, str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        limit, token = request.query.get("limit", ""), request.query.get("continue", "")
        self.requests.append((request.path, limit, token))
        if request.path == "/api/v1/nodes" and not self.nodes_allowed:
            return web.json_response({"kind": "Status", "code": 403, "message": "forbidden"}, status=403)
        items: list[JSON] = []
        if request.path == "/api/v1/services":
            items = [_service(i) for i in range(SERVICES)]
        start = int(token or 0)
        end = start + int(limit or len(items) or 1)
        meta: JSON = {"resourceVersion": "5000"}
        if end < len(items):
            meta["continue"] = str(end)
        return web.json_response({"kind": "List", "metadata": meta, "items": items[start:end]})


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[FakeApiServer, client.ApiClient]]:
    fake = FakeApiServer(nodes_allowed=False)
    app = web.Application()
    app.router.add_get("/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    config = client.Configuration(host=f"http://127.0.0.1:{port}")
    api = client.ApiClient(config)
    try:
        yield fake, api
    finally:
        await api.close()
        await runner.cleanup()


async def test_load_reads_pages_merges_them_and_survives_a_403_for_nodes(
    api_server: tuple[FakeApiServer, client.ApiClient],
) -> None:
    fake, api = api_server
    cache = Cache()
    # Gone from the cluster (older than the list): dropped. Newer than the list: kept.
    cache.put("service", {"metadata": {"name": "gone", "namespace": "ns", "resourceVersion": "9"}})
    cache.put("service", {"metadata": {"name": "new", "namespace": "ns", "resourceVersion": "9000"}})
    await Lister(api, None).load(cache)
    names = set(cache.objects["service"]["ns"])
    assert names == {f"s{i}" for i in range(SERVICES)} | {"new"}
    stored = cache.get("service", "ns", f"s{SERVICES - 1}")
    assert stored is not None and stored["spec"]["clusterIP"] == "10.96.4.7"
    service_requests = [(lim, tok) for path, lim, tok in fake.requests if path == "/api/v1/services"]
    assert service_requests == [(str(PAGE), ""), (str(PAGE), str(PAGE)), (str(PAGE), str(2 * PAGE))]
    assert not cache.nodes_listed  # Nodes refused: the ProxyNode reports count instead
    paths = {path for path, _, _ in fake.requests}
    assert "/apis/svcproxy.io/v1alpha1/proxyvirtualservers" in paths
    assert "/apis/discovery.k8s.io/v1/endpointslices" in paths
