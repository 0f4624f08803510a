"""A small Kubernetes REST client for the lab's own processes (kubelet, cluster checks).

The lab kubelet runs inside nodes, including user-mode-linux guests, and only
needs a dozen calls on plain JSON objects; this module gives it exactly that
over ``http.client`` with the client certificate from a kubeconfig, so the
lab does not depend on a client library's models. Called by ``kubelet.py``
and ``cluster.py``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]


class ApiError(RuntimeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, method: str, path: str, body: str) -> None:
        self.status = status
        try:
            message = json.loads(body).get("message", body)
        except ValueError:
            message = body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")


class KubeApi:
    """One API server connection per thread, from a kubeconfig with embedded certificates."""

    def __init__(self, kubeconfig: Path, server: str | None = None, timeout: float = 15) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context_name = config.get("current-context")
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        url = urllib.parse.urlsplit(server or cluster["server"])
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 443
        self.timeout = timeout
        self._ssl = ssl.create_default_context(
            cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
        )
        # ssl wants files for the client pair: write them to a private temp dir once.
        tmp = Path(tempfile.mkdtemp(prefix="svcproxy-kubeapi-"))
        cert, key = tmp / "tls.crt", tmp / "tls.key"
        cert.write_bytes(base64.b64decode(user["client-certificate-data"]))
        key.touch(mode=0o600)
        key.write_bytes(base64.b64decode(user["client-key-data"]))
        self._ssl.load_cert_chain(cert, key)
        for f in (cert, key):
            f.unlink()
        os.rmdir(tmp)
        self._local = threading.local()

    def _conn(self, fresh: bool = False, timeout: float | None = None) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if fresh or conn is None:
            if conn is not None:
                conn.close()
            conn = http.client.HTTPSConnection(
                self.host, self.port, context=self._ssl, timeout=timeout or self.timeout
            )
            self._local.conn = conn
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in (1, 2):
            conn = self._conn(fresh=attempt == 2)
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read().decode()
            except (OSError, http.client.HTTPException):
                if attempt == 2:
                    raise
                continue  # a kept-alive connection the server closed: retry once, fresh
            if resp.status >= 400:
                raise ApiError(resp.status, method, path, raw)
            return json.loads(raw) if raw else {}
        raise AssertionError("unreachable")

    def text(self, path: str) -> tuple[int, str]:
        """GET a plain-text endpoint such as /readyz: (status, body), never raises on status."""
        conn = self._conn(fresh=True)
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()

    def get(self, path: str, **params: str) -> JSON:
        return self.request("GET", path, params=params or None)

    def get_or_none(self, path: str) -> JSON | None:
        try:
            return self.get(path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: JSON) -> JSON:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def strategic_patch(self, path: str, body: JSON) -> JSON:
        return self.request(
            "PATCH", path, body, content_type="application/strategic-merge-patch+json"
        )

    def replace(self, path: str, body: JSON) -> JSON:
        return self.request("PUT", path, body)

    def delete(self, path: str, body: JSON | None = None) -> JSON | None:
        try:
            return self.request("DELETE", path, body)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def watch(self, path: str, params: Mapping[str, str], timeout: float = 90) -> Iterator[JSON]:
        """Yield watch events until the server ends the stream (it does after timeoutSeconds)."""
        query = dict(params, watch="1", timeoutSeconds=str(int(timeout - 10)))
        conn = http.client.HTTPSConnection(self.host, self.port, context=self._ssl, timeout=timeout)
        try:
            conn.request("GET", f"{path}?{urllib.parse.urlencode(query)}")
            resp = conn.getresponse()
            if resp.status >= 400:
                raise ApiError(resp.status, "WATCH", path, resp.read().decode())
            for line in resp:
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()
