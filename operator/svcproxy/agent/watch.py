"""The ProxyVirtualServer watch: list, then watch from the resourceVersion, forever.

:class:`PvsWatch` lists ProxyVirtualServers in all namespaces, hands the
complete set to the agent (``replace_all``), then watches from the list's
resourceVersion with bookmarks (which only move the resourceVersion on).
A ``410 Gone`` (the resourceVersion expired), a watch that ends, or a
connection error leads to a new watch or a re-list, with exponential
backoff on errors. Each object is parsed into the pydantic model here, once;
an object that does not parse is reported and programs nothing.
Called by :mod:`svcproxy.agent.main`; the Kubernetes API is reached only
through ``kubernetes_asyncio`` here and in :mod:`svcproxy.agent.kube`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from svcproxy.agent.convert import Program, owner_of, to_program
from svcproxy.api.common import GROUP, VERSION
from svcproxy.api.program import ProxyVirtualServer

log = logging.getLogger("svcproxy.agent.watch")
PLURAL = "proxyvirtualservers"


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


class ExpiredError(Exception):
    """The resourceVersion is too old (410 Gone): list again."""


def parse(obj: dict[str, Any]) -> Program:
    """One object from the API -> a Program (an error Program when it does not parse)."""
    meta = obj.get("metadata") or {}
    owner = owner_of(meta.get("namespace"), meta.get("name", ""))
    try:
        return to_program(ProxyVirtualServer.parse(obj))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return Program(
            owner,
            ((obj.get("spec") or {}).get("contentHash") or ""),
            {},
            f"{owner} does not parse ({where}: {first.get('msg')}); the operator writes these:"
            " check its version matches the agent's",
        )


def _describe(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"HTTP {err.status} {err.reason}: {str(err.body)[:300]}"
    return repr(err)


class PvsWatch:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        on_list: Callable[[Iterable[Program]], None],
        on_upsert: Callable[[Program], None],
        on_delete: Callable[[str], None],
        on_restart: Callable[[str], None] = lambda reason: None,
        watch_timeout: int = 300,
        max_backoff: float = 30.0,
    ) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.on_list = on_list
        self.on_upsert = on_upsert
        self.on_delete = on_delete
        self.on_restart = on_restart
        self.watch_timeout = watch_timeout
        self.max_backoff = max_backoff
        self.resource_version: str | None = None
        self.live = False  # listed and the watch is connected

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                if self.resource_version is None:
                    await self._list()
                await self._watch()
                backoff = 0.5  # a watch that ended normally: reconnect at once
                self.on_restart("timeout")
            except ExpiredError:
                log.info("resourceVersion expired; listing again", extra={"rv": self.resource_version})
                self.resource_version = None
                self.live = False
                self.on_restart("expired")
            except asyncio.CancelledError:
                self.live = False
                raise
            except Exception as err:  # the API server is down or the connection broke
                self.live = False
                self.on_restart("error")
                # List again after an error: the API server may have lost the history (a new
                # etcd refuses the old resourceVersion as too large). Unchanged objects cost
                # no kernel work, since the agent marks only programs that differ.
                self.resource_version = None
                delay = min(self.max_backoff, backoff) * (0.5 + random.random() / 2)
                log.warning("watch failed (%s); listing again", _describe(err),
                            extra={"retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
                backoff = min(self.max_backoff, backoff * 2)

    async def _list(self) -> None:
        listing = await self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
        self.on_list([parse(o) for o in listing.get("items", [])])
        self.resource_version = listing["metadata"]["resourceVersion"]
        log.info("listed", extra={"count": len(listing.get("items", [])), "rv": self.resource_version})

    async def _watch(self) -> None:
        try:
            resp = await self.custom.list_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=self.resource_version or "",
                timeout_seconds=self.watch_timeout,
                _preload_content=False,
                _request_timeout=self.watch_timeout + 30,
            )
        except ApiException as err:
            if err.status == 410:
                raise ExpiredError() from err
            raise
        try:
            # With _preload_content=False the client does not raise on an error status.
            if resp.status == 410:
                raise ExpiredError()
            if resp.status != 200:
                body = (await resp.read())[:300].decode(errors="replace")
                raise ApiException(status=resp.status, reason=f"watch refused: {body.strip()}")
            self.live = True
            # Not `async for line in resp.content`: aiohttp refuses lines over 64 KiB, and
            # one event of a Service with many endpoints is longer than that.
            lines = LineBuffer()
            async for chunk in resp.content.iter_any():
                for line in lines.feed(chunk):
                    self._event(json.loads(line))
        finally:
            resp.release()

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ExpiredError()
            raise RuntimeError(f"watch error from the API server: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.on_upsert(parse(obj))
        elif kind == "DELETED":
            meta = obj.get("metadata") or {}
            self.on_delete(owner_of(meta.get("namespace"), meta.get("name", "")))
        # BOOKMARK: only the resourceVersion moves on.
        if rv:
            self.resource_version = rv
