"""The agent's small Kubernetes API client: kubeconfig / in-cluster config, JSON requests, watches.

The agent needs a few things from the API server: list and watch
ProxyVirtualServers (and Services and Nodes, to check them), get, create and
watch its ProxyNode, and merge-patch the ProxyNode's status.
:class:`ApiClient` does those over one ``aiohttp`` session;
:func:`load_kubeconfig` and :func:`load_incluster` build its :class:`ClusterConfig`.
It is the agent's one Kubernetes client (import-linter contract ``agent-client``):
a generated client loads every model class, too much memory for a process that
runs on every node. Called by :mod:`svcproxy.agent.main` (config),
:mod:`svcproxy.agent.watch` and :mod:`svcproxy.agent.kube` (requests).

Supported kubeconfig users: client certificates (file or ``-data``), a bearer
``token`` or ``tokenFile``; clusters: ``certificate-authority`` (file or
``-data``), ``insecure-skip-tls-verify``, ``tls-server-name``. Exec and
auth-provider plugins and basic auth are refused at start with what to use
instead. A token file (the in-cluster service-account token, which the
kubelet rotates) is read again whenever its modification time changes.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from svcproxy.base import IPFamily

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MERGE_PATCH = "application/merge-patch+json"


class ConfigError(Exception):
    """The kubeconfig or in-cluster environment cannot be used; the message says why and what to do."""


class StatusError(Exception):
    """The API server answered with an error status.

    ``status`` is the HTTP status (410 = the resourceVersion expired: list again),
    ``reason`` and ``message`` come from the ``Status`` object in the body when there is one.
    """

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"HTTP {status} {reason}: {message}".rstrip(": "))
        self.status = status
        self.reason = reason
        self.message = message


class LineBuffer:
    """Splits a byte stream into complete non-empty lines, however long."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self._parts.append(chunk)
            return []
        head, *middle, tail = chunk.split(b"\n")
        first = b"".join([*self._parts, head])
        self._parts = [tail] if tail else []
        return [line for line in (first, *middle) if line.strip()]


class TokenFile:
    """A bearer token in a file, read again when the file changes (bound tokens rotate)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def get(self) -> str:
        try:
            st = self.path.stat()  # follows the kubelet's ..data symlink swap
        except OSError as err:
            raise ConfigError(f"cannot read the token file {self.path}: {err}") from err
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._token = self.path.read_text().strip()
            self._stamp = stamp
        return self._token


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    server: str
    ssl_context: ssl.SSLContext | None  # None: plain http (tests only)
    token: str | None = None
    token_file: TokenFile | None = None
    server_name: str | None = None  # tls-server-name

    def authorization(self) -> str | None:
        token = self.token_file.get() if self.token_file is not None else self.token
        return f"Bearer {token}" if token else None


def _ssl_context(
    ca_file: Path | None, ca_data: str | None, insecure: bool,
    cert: tuple[Path, Path] | None, cert_data: tuple[bytes, bytes] | None,
) -> ssl.SSLContext:
    # Verifies the server's certificate and name by default. The cluster's CA, when given,
    # is the only one trusted (as kubectl does); the system's CAs only when none is given.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif ca_data is not None:
        ctx.load_verify_locations(cadata=ca_data)
    elif ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    elif cert_data is not None:
        # ssl loads a key pair only from files: write them to a private temporary
        # folder for the moment of loading, then remove them.
        with tempfile.TemporaryDirectory(prefix="svcproxy-cert-") as tmp:
            crt, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            crt.write_bytes(cert_data[0])
            key.touch(mode=0o600)
            key.write_bytes(cert_data[1])
            ctx.load_cert_chain(str(crt), str(key))
    return ctx


def _pick(items: Any, name: str, what: str, path: Path) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            return dict(item.get(what) or {})
    raise ConfigError(f"{path}: no {what} named {name!r} (check the context's {what} field)")


def _context(path: Path, context: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The context, cluster and user of the current (or the named) context."""
    import yaml  # only needed here, and not in-cluster

    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the kubeconfig {path}: {err}") from err
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} is not a kubeconfig (no mapping at the top)")
    name = context or doc.get("current-context")
    if not name:
        raise ConfigError(f"{path} has no current-context: set one (kubectl config use-context)")
    ctx = _pick(doc.get("contexts"), name, "context", path)
    cluster = _pick(doc.get("clusters"), ctx.get("cluster", ""), "cluster", path)
    user = _pick(doc.get("users"), ctx.get("user", ""), "user", path) if ctx.get("user") else {}
    return ctx, cluster, user


def _refuse_unsupported(path: Path, ctx: dict[str, Any], user: dict[str, Any]) -> None:
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise ConfigError(
                f"{path}: user {ctx.get('user')!r} uses an {plugin} plugin, which the agent does not run;"
                " give it a kubeconfig with a client certificate, a token or a tokenFile"
                " (e.g. `kubectl create token <serviceaccount>`), or run it in-cluster")
    if user.get("username") or user.get("password"):
        raise ConfigError(f"{path}: basic auth (username/password) is not supported; use a client"
                          " certificate or a token")


class _Fields:
    """File and ``-data`` fields of one kubeconfig."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = path.resolve().parent

    def file(self, field: str, obj: dict[str, Any]) -> Path | None:
        value = obj.get(field)
        return (self.base / value) if value else None  # relative paths are relative to the kubeconfig

    def data(self, field: str, obj: dict[str, Any]) -> bytes | None:
        value = obj.get(field)
        if not value:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as err:
            raise ConfigError(f"{self.path}: {field} is not valid base64: {err}") from err


def load_kubeconfig(path: Path, context: str | None = None) -> ClusterConfig:
    """The current (or the named) context of one kubeconfig file."""
    ctx, cluster, user = _context(path, context)
    _refuse_unsupported(path, ctx, user)
    server = cluster.get("server")
    if not server:
        raise ConfigError(f"{path}: cluster {ctx.get('cluster')!r} has no server")
    fields = _Fields(path)
    ca = fields.data("certificate-authority-data", cluster)
    cert_data = fields.data("client-certificate-data", user)
    key_data = fields.data("client-key-data", user)
    cert_file, key_file = fields.file("client-certificate", user), fields.file("client-key", user)
    if (cert_data is None) != (key_data is None) or (cert_file is None) != (key_file is None):
        raise ConfigError(f"{path}: user {ctx.get('user')!r} has a client certificate without its key"
                          " (or a key without its certificate): give both")
    sslctx = None
    if server.startswith("https://"):
        try:
            sslctx = _ssl_context(
                fields.file("certificate-authority", cluster), ca.decode() if ca else None,
                bool(cluster.get("insecure-skip-tls-verify")),
                (cert_file, key_file) if cert_file and key_file else None,
                (cert_data, key_data) if cert_data and key_data else None,
            )
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{path}: cannot load its certificates: {err}") from err
    token_file = fields.file("tokenFile", user)
    return ClusterConfig(
        server=server.rstrip("/"),
        ssl_context=sslctx,
        token=user.get("token"),
        token_file=TokenFile(token_file) if token_file and not user.get("token") else None,
        server_name=cluster.get("tls-server-name"),
    )


def load_incluster(
    env: Mapping[str, str] = os.environ, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ClusterConfig:
    """The Pod's service account: KUBERNETES_SERVICE_HOST/PORT, its token file and CA."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("not running in a Pod (KUBERNETES_SERVICE_HOST/PORT are not set):"
                          " pass --kubeconfig")
    token = TokenFile(account_dir / "token")
    token.get()  # fail now, not at the first request
    try:
        sslctx = _ssl_context(account_dir / "ca.crt", None, False, None, None)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load the service account CA {account_dir / 'ca.crt'}: {err}") from err
    server = f"https://{IPFamily.bracketed(host)}:{port}"
    return ClusterConfig(server=server, ssl_context=sslctx, token_file=token)


async def _error_of(resp: aiohttp.ClientResponse) -> StatusError:
    body = await resp.read()
    try:
        status = json.loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("kind") == "Status":
        return StatusError(resp.status, str(status.get("reason", "")), str(status.get("message", "")))
    return StatusError(resp.status, resp.reason or "", body[:300].decode(errors="replace").strip())


class ApiClient:
    """JSON requests and watches against one API server, over one aiohttp session."""

    def __init__(self, config: ClusterConfig, *, timeout: float = 60.0) -> None:
        self.config = config
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop (aiohttp wants one).
        if self._session is None or self._session.closed:
            conn = aiohttp.TCPConnector(ssl=self.config.ssl_context or False)
            self._session = aiohttp.ClientSession(connector=conn)
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = self.config.authorization()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                       body: Any = None, content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        async with self._sess().request(
            method, self.config.server + path, params=params, data=data,
            headers=self._headers(content_type if data is not None else None),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            server_hostname=self.config.server_name,
        ) as resp:
            if resp.status >= 400:
                raise await _error_of(resp)
            return json.loads(await resp.read())

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        return await self._request("GET", path, params=params)

    async def post(self, path: str, body: Any) -> Any:
        return await self._request("POST", path, body=body)

    async def merge_patch(self, path: str, body: Any) -> Any:
        """RFC 7386 merge patch (e.g. of ``.../status``)."""
        return await self._request("PATCH", path, body=body, content_type=MERGE_PATCH)

    async def watch(self, path: str, *, resource_version: str | None, timeout_seconds: int,
                    allow_bookmarks: bool = True, field_selector: str | None = None,
                    on_open: Callable[[], None] | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Watch events (``{"type", "object"}``) until the server ends the watch.

        Raises :class:`StatusError` when the watch is refused (410 when the resourceVersion
        is too old). ERROR events are yielded as they come: the caller decides.
        ``on_open`` is called once the server accepted the watch (before any event:
        a quiet watch is live too).
        """
        params = {"watch": "true", "timeoutSeconds": str(timeout_seconds)}
        if allow_bookmarks:
            params["allowWatchBookmarks"] = "true"
        if resource_version:
            params["resourceVersion"] = resource_version
        if field_selector:
            params["fieldSelector"] = field_selector
        # No total timeout: the server ends the watch after timeoutSeconds; a read
        # silent well beyond that means the connection is dead.
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=timeout_seconds + 30)
        async with self._sess().get(self.config.server + path, params=params, headers=self._headers(),
                                    timeout=timeout, server_hostname=self.config.server_name) as resp:
            if resp.status != 200:
                raise await _error_of(resp)
            if on_open is not None:
                on_open()
            # Not `async for line in resp.content`: aiohttp refuses lines over 64 KiB, and
            # one event of a Service with many endpoints is longer than that.
            lines = LineBuffer()
            async for chunk in resp.content.iter_any():
                for line in lines.feed(chunk):
                    yield json.loads(line)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
