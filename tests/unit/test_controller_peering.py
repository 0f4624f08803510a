"""The operator's peering set-up over its one client library, kubernetes_asyncio.

A small HTTP server on 127.0.0.1 plays the API server: the peering CRD is there or not
(404), and creating the peering object succeeds or finds it already there (409).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client

from svcproxy.controller.client import ensure_peering_object, peering_available

JSON = dict[str, Any]


class FakeApiServer:
    def __init__(self) -> None:
        self.crds: set[str] = set()
        self.objects: dict[str, JSON] = {}
        self.creates: list[str] = []

    async def get_crd(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.crds:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        plural, group = name.split(".", 1)
        spec = {"group": group, "scope": "Cluster", "versions": [],
                "names": {"plural": plural, "kind": "ClusterKopfPeering"}}
        crd = {"kind": "CustomResourceDefinition", "metadata": {"name": name}, "spec": spec}
        return web.json_response(crd)

    async def create(self, request: web.Request) -> web.Response:
        body: JSON = await request.json()
        self.creates.append(request.path)
        key = f"{request.path}/{body['metadata']['name']}"
        if key in self.objects:
            return web.json_response({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, status=409)
        self.objects[key] = body
        return web.json_response(body, status=201)


@pytest.fixture
async def api_server() -> AsyncIterator[tuple[FakeApiServer, client.ApiClient]]:
    fake = FakeApiServer()
    app = web.Application()
    app.router.add_get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", fake.get_crd)
    app.router.add_post("/{tail:.*}", fake.create)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{port}"))
    try:
        yield fake, api
    finally:
        await api.close()
        await runner.cleanup()


async def test_peering_is_available_only_with_the_crd_of_its_scope(
    api_server: tuple[FakeApiServer, client.ApiClient],
) -> None:
    fake, api = api_server
    assert not await peering_available(api, None)
    fake.crds.add("clusterkopfpeerings.kopf.dev")
    assert await peering_available(api, None)
    assert not await peering_available(api, "shop")
    fake.crds.add("kopfpeerings.kopf.dev")
    assert await peering_available(api, "shop")


async def test_peering_object_is_created_once_and_found_after(
    api_server: tuple[FakeApiServer, client.ApiClient],
) -> None:
    fake, api = api_server
    await ensure_peering_object(api, "svcproxy", None)
    await ensure_peering_object(api, "svcproxy", None)  # 409: already there, not an error
    await ensure_peering_object(api, "svcproxy", "shop")
    assert fake.creates == [
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        "/apis/kopf.dev/v1/clusterkopfpeerings",
        "/apis/kopf.dev/v1/namespaces/shop/kopfpeerings",
    ]
    kinds = sorted(o["kind"] for o in fake.objects.values())
    assert kinds == ["ClusterKopfPeering", "KopfPeering"]
