"""The Services' health-check node ports, answered as kube-proxy answers them.

A Service with externalTrafficPolicy Local has a ``healthCheckNodePort``: load
balancers ask every node on it whether to send that node traffic. Like kube-proxy's
service health server, the agent listens on the port on all the node's addresses and
answers any HTTP request with 200 while the node has at least one ready local endpoint
of the Service (and the agent itself is healthy), else 503, with a JSON body naming the
Service and its local endpoint count, and ``X-Content-Type-Options: nosniff``.

:class:`HealthServer` is told the wanted checks (:meth:`HealthServer.update`, owner ->
port and count) after every sync; it opens and closes listeners to match, and a count
change needs no new listener. Plain asyncio streams: one request per connection.
Called by :mod:`svcproxy.agent.main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

log = logging.getLogger("svcproxy.agent.healthcheck")
MAX_REQUEST = 16384  # bytes of request line and headers read before answering
READ_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    """One Service's health check on this node."""

    owner: str  # "namespace/name"
    port: int
    local_endpoints: int


def answer(check: Check, proxy_healthy: bool) -> tuple[int, bytes]:
    """The status and JSON body for ``check`` (kube-proxy's fields and layout)."""
    namespace, _, name = check.owner.partition("/")
    body = {
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    status = 200 if check.local_endpoints > 0 and proxy_healthy else 503
    return status, json.dumps(body, indent="\t").encode()


def response(status: int, body: bytes) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"X-Content-Type-Options: nosniff\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class HealthServer:
    """Listeners on the health-check node ports of this node's Services.

    ``host``: the address to bind (None: every address, IPv4 and IPv6); ``healthy``:
    whether the agent is healthy (kube-proxy answers 503 for every Service when it is not).
    """

    def __init__(self, *, host: str | None = None, healthy: Callable[[], bool] = lambda: True) -> None:
        self.host = host
        self.healthy = healthy
        self.checks: dict[int, Check] = {}  # port -> the check it answers
        self.servers: dict[int, asyncio.Server] = {}
        self.errors: dict[str, str] = {}  # owner -> why its port is not served

    async def update(self, wanted: Mapping[str, tuple[int, int]]) -> None:
        """Serve exactly ``wanted`` (owner -> (port, local endpoints)): close ports no
        longer wanted, open new ones; a port two owners ask for goes to the first by name."""
        checks: dict[int, Check] = {}
        errors: dict[str, str] = {}
        for owner in sorted(wanted):
            port, count = wanted[owner]
            if port in checks:
                errors[owner] = f"health-check port {port} is already {checks[port].owner}'s"
                continue
            checks[port] = Check(owner, port, count)
        for port in [p for p in self.servers if p not in checks]:
            await self._close(port)
        self.checks = checks
        for port, check in checks.items():
            if port in self.servers:
                continue
            try:
                self.servers[port] = await self._listen(port)
                log.info("health check listening", extra={"owner": check.owner, "port": port})
            except OSError as err:
                errors[check.owner] = f"cannot listen on health-check port {port}: {err.strerror or err}"
        if errors != self.errors:
            for owner, why in errors.items():
                if self.errors.get(owner) != why:
                    log.warning("health check not served", extra={"owner": owner, "why": why})
        self.errors = errors

    async def _listen(self, port: int) -> asyncio.Server:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(port, reader, writer)

        try:
            return await asyncio.start_server(handle, self.host, port, reuse_address=True, limit=MAX_REQUEST)
        except OSError:
            if self.host is not None:
                raise
            # No IPv6 on this node (or in this namespace): every IPv4 address then.
            return await asyncio.start_server(handle, "0.0.0.0", port, reuse_address=True, limit=MAX_REQUEST)

    async def _serve(self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            check = self.checks.get(port)
            if check is None:
                return  # closed meanwhile (kube-proxy answers nothing either)
            writer.write(response(*answer(check, self.healthy())))
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _close(self, port: int) -> None:
        server = self.servers.pop(port)
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()

    async def close(self) -> None:
        for port in list(self.servers):
            await self._close(port)
        self.checks = {}
