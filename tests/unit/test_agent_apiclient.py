"""The agent's own API client against real local servers (aiohttp.web on 127.0.0.1).

Kubeconfig parsing is checked by connecting: a TLS server that requires a
client certificate signed by a test CA answers only when the certificate,
key and CA were really loaded (from ``-data`` fields and from files), and it
echoes the bearer token it received (so a rotated token file is seen to be
read again). The watch is checked against a fake API server that streams
chunked JSON lines (an event split across chunks, a line over 64 KiB, a
bookmark), refuses an old resourceVersion with 410, sends a 410 ERROR event,
and serves the list in pages: the resourceVersions the agent resumes from
and what it hands the agent are asserted.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from svcproxy.agent.apiclient import (
    ApiClient,
    ClusterConfig,
    ConfigError,
    StatusError,
    load_incluster,
    load_kubeconfig,
)
from svcproxy.agent.kube import ProxyNodeWriter
from svcproxy.agent.report import ReportThrottle
from svcproxy.agent.watch import PvsWatch

# --- a test PKI ---------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes
    other_ca: bytes  # a CA that signed nothing here


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, san_ip: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (cn, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    if san_ip:
        import ipaddress
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca_key, other_key, srv_key, cli_key = _key(), _key(), _key(), _key()
    ca = _cert("test-ca", ca_key, None, ca=True)
    other = _cert("other-ca", other_key, None, ca=True)
    pem = serialization.Encoding.PEM
    return Pki(
        ca=ca.public_bytes(pem),
        server_cert=_cert("apiserver", srv_key, ("test-ca", ca_key), san_ip=True).public_bytes(pem),
        server_key=_pem_key(srv_key),
        client_cert=_cert("node-agent", cli_key, ("test-ca", ca_key)).public_bytes(pem),
        client_key=_pem_key(cli_key),
        other_ca=other.public_bytes(pem),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- a TLS server that wants a client certificate ----------------------------------------------


async def _serve(app: web.Application, sslctx: ssl.SSLContext | None = None) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=sslctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"{'https' if sslctx else 'http'}://127.0.0.1:{port}"


async def whoami(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peercert") if request.transport else None
    cn = ""
    for rdn in (peer or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = value
    return web.json_response({"cn": cn, "auth": request.headers.get("Authorization", "")})


@pytest.fixture
async def tls_server(pki: Pki, tmp_path: Path) -> AsyncIterator[str]:
    (tmp_path / "srv.crt").write_bytes(pki.server_cert)
    (tmp_path / "srv.key").write_bytes(pki.server_key)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pki.ca.decode())
    ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    ctx.verify_mode = ssl.CERT_OPTIONAL  # token clients come without a certificate
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner, url = await _serve(app, ctx)
    yield url
    await runner.cleanup()


def kubeconfig(path: Path, cluster: dict[str, Any], user: dict[str, Any], **extra: Any) -> Path:
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "t",
           "clusters": [{"name": "c", "cluster": cluster}],
           "users": [{"name": "u", "user": user}],
           "contexts": [{"name": "t", "context": {"cluster": "c", "user": "u"}}], **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


async def ask(cfg: ClusterConfig) -> dict[str, Any]:
    api = ApiClient(cfg, timeout=10)
    try:
        out: dict[str, Any] = await api.get("/whoami")
        return out
    finally:
        await api.close()


async def test_client_certificate_and_ca_from_data_fields(pki: Pki, tls_server: str, tmp_path: Path) -> None:
    kc = kubeconfig(tmp_path / "kc", {"server": tls_server, "certificate-authority-data": b64(pki.ca)},
                    {"client-certificate-data": b64(pki.client_cert), "client-key-data": b64(pki.client_key)})
    assert await ask(load_kubeconfig(kc)) == {"cn": "node-agent", "auth": ""}


async def test_client_certificate_and_ca_from_files_relative_to_the_kubeconfig(
        pki: Pki, tls_server: str, tmp_path: Path) -> None:
    (tmp_path / "pki").mkdir()
    for name, data in (("ca.crt", pki.ca), ("c.crt", pki.client_cert), ("c.key", pki.client_key)):
        (tmp_path / "pki" / name).write_bytes(data)
    kc = kubeconfig(tmp_path / "kc", {"server": tls_server, "certificate-authority": "pki/ca.crt"},
                    {"client-certificate": "pki/c.crt", "client-key": str(tmp_path / "pki" / "c.key")})
    assert (await ask(load_kubeconfig(kc)))["cn"] == "node-agent"


async def test_a_server_signed_by_another_ca_is_refused_unless_verification_is_skipped(
        pki: Pki, tls_server: str, tmp_path: Path) -> None:
    wrong = kubeconfig(tmp_path / "wrong",
                       {"server": tls_server, "certificate-authority-data": b64(pki.other_ca)},
                       {"token": "t"})
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await ask(load_kubeconfig(wrong))
    skip = kubeconfig(tmp_path / "skip", {"server": tls_server, "insecure-skip-tls-verify": True},
                      {"token": "t"})
    assert (await ask(load_kubeconfig(skip)))["auth"] == "Bearer t"


async def test_without_a_ca_the_system_trust_applies_and_does_not_know_the_cluster(
        tls_server: str, tmp_path: Path) -> None:
    kc = kubeconfig(tmp_path / "kc", {"server": tls_server}, {"token": "t"})
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await ask(load_kubeconfig(kc))


async def test_a_token_file_is_read_again_when_it_rotates(pki: Pki, tls_server: str, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    kc = kubeconfig(tmp_path / "kc", {"server": tls_server, "certificate-authority-data": b64(pki.ca)},
                    {"tokenFile": "token"})
    cfg = load_kubeconfig(kc)
    assert (await ask(cfg))["auth"] == "Bearer first"
    # As the kubelet does: a new file swapped in (a new inode), whatever the clock says.
    (tmp_path / "token.new").write_text("second")
    os.replace(tmp_path / "token.new", token)
    assert (await ask(cfg))["auth"] == "Bearer second"


async def test_in_cluster_config_uses_the_service_account_token_and_ca(
        pki: Pki, tls_server: str, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("sa-token")
    (tmp_path / "ca.crt").write_bytes(pki.ca)
    port = tls_server.rsplit(":", 1)[1]
    cfg = load_incluster({"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}, tmp_path)
    assert cfg.server == tls_server
    assert (await ask(cfg))["auth"] == "Bearer sa-token"
    with pytest.raises(ConfigError, match="--kubeconfig"):
        load_incluster({}, tmp_path)
    with pytest.raises(ConfigError, match="token file"):
        load_incluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                       tmp_path / "missing")


@pytest.mark.parametrize(("user", "cluster", "context", "match"), [
    ({"exec": {"command": "aws"}}, {}, None, "exec plugin.*token"),
    ({"auth-provider": {"name": "gcp"}}, {}, None, "auth-provider plugin"),
    ({"username": "a", "password": "b"}, {}, None, "basic auth"),
    ({"client-certificate-data": b64(b"x")}, {}, None, "without its key"),
    ({"token": "t"}, {"certificate-authority-data": "!!notbase64"}, None, "not valid base64"),
    ({"token": "t"}, {"server": ""}, None, "has no server"),
    ({"token": "t"}, {}, "elsewhere", "no context named 'elsewhere'"),
])
def test_unusable_kubeconfigs_fail_at_start_saying_what_to_do(
        tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any], context: str | None,
        match: str) -> None:
    kc = kubeconfig(tmp_path / "kc", {"server": "https://127.0.0.1:1", **cluster}, user)
    with pytest.raises(ConfigError, match=match):
        load_kubeconfig(kc, context)


def test_a_kubeconfig_without_current_context_fails(tmp_path: Path) -> None:
    kc = kubeconfig(tmp_path / "kc", {"server": "https://127.0.0.1:1"}, {"token": "t"})
    doc = yaml.safe_load(kc.read_text())
    del doc["current-context"]
    kc.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="no current-context"):
        load_kubeconfig(kc)
    with pytest.raises(ConfigError, match="cannot read"):
        load_kubeconfig(tmp_path / "absent")


def test_the_agent_does_not_import_kubernetes_asyncio() -> None:
    code = ("import sys, svcproxy.agent.main, svcproxy.cli; "
            "print(sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('kubernetes_asyncio', 'kubernetes', 'kopf')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# --- a fake API server: list in pages, watch streams, 410s, ProxyNode writes --------------------


def pvs(name: str, rv: str) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
            "spec": {"service": {"name": name}, "policy": {"name": "p"}, "mode": "iptables",
                     "contentHash": f"h-{name}"}}


def line(kind: str, obj: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, "object": obj}).encode() + b"\n"


class FakeApi:
    """Serves scripted answers and records every request's query."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.lists: list[list[tuple[list[dict[str, Any]], str, str]]] = []  # pages (items, rv, continue)
        self.watches: list[Callable[[web.StreamResponse], Any] | int] = []  # stream writers or a status
        self.nodes: dict[str, dict[str, Any]] = {}
        self.core_nodes: dict[str, dict[str, Any]] = {}  # Nodes (/api/v1/nodes)
        self.stop = asyncio.Event()  # ends streams that wait (a quiet watch)
        self.app = web.Application()
        self.app.router.add_get("/apis/svcproxy.io/v1alpha1/proxyvirtualservers", self.pvs)
        self.app.router.add_get("/apis/svcproxy.io/v1alpha1/proxynodes/{name}", self.get_node)
        self.app.router.add_post("/apis/svcproxy.io/v1alpha1/proxynodes", self.create_node)
        self.app.router.add_patch("/apis/svcproxy.io/v1alpha1/proxynodes/{name}/status", self.patch_status)
        self.app.router.add_patch("/apis/svcproxy.io/v1alpha1/proxynodes/{name}", self.patch_meta)
        self.app.router.add_get("/api/v1/nodes/{name}", self.get_core_node)

    @staticmethod
    def status(code: int, reason: str, message: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": message}, status=code)

    async def pvs(self, request: web.Request) -> web.StreamResponse:
        q = dict(request.query)
        self.requests.append((request.method, request.path, q))
        if q.get("watch") != "true":
            pages = self.lists[0]
            index = int(q.get("continue", "0"))
            items, rv, cont = pages[index]
            if index == len(pages) - 1:
                self.lists.pop(0)
            return web.json_response({"kind": "ProxyVirtualServerList", "items": items,
                                      "metadata": {"resourceVersion": rv, "continue": cont}})
        script = self.watches.pop(0)
        if isinstance(script, int):
            return self.status(script, "Expired", "too old resource version")
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        await script(resp)
        await resp.write_eof()
        return resp

    async def get_node(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, {}))
        name = request.match_info["name"]
        if name not in self.nodes:
            return self.status(404, "NotFound", f'proxynodes.svcproxy.io "{name}" not found')
        return web.json_response(self.nodes[name])

    async def create_node(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, {}))
        body = await request.json()
        self.nodes[body["metadata"]["name"]] = body
        return web.json_response(body, status=201)

    async def get_core_node(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.core_nodes:
            return self.status(404, "NotFound", f'nodes "{name}" not found')
        return web.json_response(self.core_nodes[name])

    async def patch_meta(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, {"content-type": request.content_type}))
        node = self.nodes[request.match_info["name"]]
        node["metadata"] = {**node["metadata"], **(await request.json())["metadata"]}
        return web.json_response(node)

    async def patch_status(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, {"content-type": request.content_type}))
        if request.content_type != "application/merge-patch+json":
            return self.status(415, "UnsupportedMediaType", request.content_type)
        node = self.nodes[request.match_info["name"]]
        node["status"] = {**node.get("status", {}), **(await request.json())["status"]}
        return web.json_response(node)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeApi, ApiClient]]:
    api = FakeApi()
    runner, url = await _serve(api.app)
    client = ApiClient(ClusterConfig(server=url, ssl_context=None, token="t"), timeout=10)
    yield api, client
    api.stop.set()
    await client.close()
    await runner.cleanup()


async def test_watch_resumes_from_bookmarks_and_lists_again_on_410(fake: tuple[FakeApi, ApiClient]) -> None:
    api, client = fake
    big = pvs("big", "12")
    big["spec"]["note"] = "x" * 100_000  # one event longer than aiohttp's 64 KiB line limit

    async def first(resp: web.StreamResponse) -> None:
        added = line("ADDED", pvs("c", "11"))
        await resp.write(added[:25])  # one event split over chunks
        await resp.write(added[25:] + line("MODIFIED", big)[:70_000])
        await resp.write(line("MODIFIED", big)[70_000:])
        bookmark = {"kind": "ProxyVirtualServer", "metadata": {"resourceVersion": "15"}}
        await resp.write(line("BOOKMARK", bookmark))

    async def after_relist(resp: web.StreamResponse) -> None:
        await resp.write(line("DELETED", pvs("a", "21")))
        gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "gone"}
        await resp.write(line("ERROR", gone))

    async def quiet(resp: web.StreamResponse) -> None:
        await api.stop.wait()

    api.lists = [[([pvs("a", "1")], "10", "1"), ([pvs("b", "2")], "10", "")],
                 [([pvs("a", "1")], "20", "")],
                 [([], "30", "")]]
    api.watches = [first, 410, after_relist, quiet]
    seen: list[tuple[str, Any]] = []
    restarts: list[str] = []
    listed = asyncio.Event()

    def on_list(programs: Any) -> None:
        seen.append(("list", sorted((p.owner, p.content_hash) for p in programs)))
        if len(seen) and sum(1 for s in seen if s[0] == "list") == 3:
            listed.set()

    watch = PvsWatch(client, on_list=on_list, on_upsert=lambda p: seen.append(("upsert", p.owner)),
                     on_delete=lambda o: seen.append(("delete", o)), on_restart=restarts.append,
                     watch_timeout=77, page_size=1)
    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(listed.wait(), 30)
        # The quiet watch counts as live although no event came yet.
        for _ in range(1000):
            if watch.live:
                break
            await asyncio.sleep(0.01)
        assert watch.live
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert seen == [
        ("list", [("ns/a", "h-a"), ("ns/b", "h-b")]),
        ("upsert", "ns/c"), ("upsert", "ns/big"),
        ("list", [("ns/a", "h-a")]),
        ("delete", "ns/a"),
        ("list", []),
    ]
    assert restarts == ["timeout", "expired", "expired"]
    queries = [q for (_, _, q) in api.requests]
    assert queries[0] == {"limit": "1"} and queries[1] == {"limit": "1", "continue": "1"}
    watches = [q for q in queries if q.get("watch") == "true"]
    assert [q.get("resourceVersion") for q in watches] == ["10", "15", "20", "30"]
    assert all(q["allowWatchBookmarks"] == "true" and q["timeoutSeconds"] == "77" for q in watches)


async def test_api_errors_carry_the_status_reason_and_message(fake: tuple[FakeApi, ApiClient]) -> None:
    _, client = fake
    with pytest.raises(StatusError) as caught:
        await client.get("/apis/svcproxy.io/v1alpha1/proxynodes/absent")
    assert (caught.value.status, caught.value.reason) == (404, "NotFound")
    assert "absent" in caught.value.message
    with pytest.raises(StatusError) as caught:
        await client.get("/nowhere")  # not a Status body: the text is kept
    assert caught.value.status == 404 and caught.value.reason == "Not Found"


async def test_proxynode_is_created_then_its_status_merge_patched(fake: tuple[FakeApi, ApiClient]) -> None:
    api, client = fake
    writer = ProxyNodeWriter(client, "node-1", ReportThrottle(1.0))
    assert await writer.write({"nodeName": "node-1", "applied": {"ns/a": "h"}}, 100.0)
    assert api.nodes["node-1"]["spec"] == {}
    assert api.nodes["node-1"]["status"]["applied"] == {"ns/a": "h"}
    assert not await writer.write({"nodeName": "node-1", "applied": {"ns/a": "h2"}}, 100.5)  # throttled
    assert await writer.write({"nodeName": "node-1", "applied": {"ns/a": "h2"}}, 102.0)
    assert api.nodes["node-1"]["status"]["applied"] == {"ns/a": "h2"}
    patches = [q for (m, _, q) in api.requests if m == "PATCH"]
    assert patches == [{"content-type": "application/merge-patch+json"}] * 2


async def test_proxynode_is_owned_by_its_node_and_not_recreated_while_the_node_is_gone(
        fake: tuple[FakeApi, ApiClient]) -> None:
    api, client = fake
    api.core_nodes["node-1"] = {"metadata": {"name": "node-1", "uid": "u1"}}
    # Made by an earlier agent before it set owners: the owner is added.
    api.nodes["node-1"] = {"metadata": {"name": "node-1"}, "spec": {}, "status": {}}
    writer = ProxyNodeWriter(client, "node-1", ReportThrottle(0.0))
    assert await writer.write({"nodeName": "node-1"}, 1.0)
    owner = {"apiVersion": "v1", "kind": "Node", "name": "node-1", "uid": "u1"}
    assert api.nodes["node-1"]["metadata"]["ownerReferences"] == [owner]
    # The Node goes, the garbage collector takes the ProxyNode: nothing comes back.
    del api.core_nodes["node-1"], api.nodes["node-1"]
    writer.forget()
    assert not await writer.write({"nodeName": "node-1"}, 2.0)
    assert "node-1" not in api.nodes and writer.node_gone
    # The Node comes back (a new uid): a new ProxyNode, owned by the new Node.
    api.core_nodes["node-1"] = {"metadata": {"name": "node-1", "uid": "u2"}}
    assert await writer.write({"nodeName": "node-1"}, 3.0)
    assert api.nodes["node-1"]["metadata"]["ownerReferences"] == [{**owner, "uid": "u2"}]
    assert api.nodes["node-1"]["status"] == {"nodeName": "node-1"}
