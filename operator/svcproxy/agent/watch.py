"""The agent's watches: list, then watch from the resourceVersion, forever.

:class:`ListWatch` lists one kind in all namespaces, hands the complete set to
its ``on_list``, then watches from the list's resourceVersion with bookmarks
(which only move the resourceVersion on). A ``410 Gone`` (the resourceVersion
expired), a watch that ends, or a connection error leads to a new watch or a
re-list, with exponential backoff on errors. Each object is parsed once, here,
and only the parsed form is kept. :class:`PvsWatch` watches ProxyVirtualServers
(parsed into the pydantic model; one that does not parse is reported and
programs nothing); :class:`ServiceWatch` and :class:`NodeWatch` keep only what
:mod:`svcproxy.agent.trust` checks programs against (a Service's addresses, a
Node's Pod CIDRs and addresses). Called by :mod:`svcproxy.agent.main`; the
Kubernetes API is reached only through :mod:`svcproxy.agent.apiclient`, here and
in :mod:`svcproxy.agent.kube`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import ValidationError

from svcproxy.agent.apiclient import ApiClient, StatusError
from svcproxy.agent.convert import DesiredProgram, owner_of, to_program
from svcproxy.agent.trust import Network, node_networks, service_addresses
from svcproxy.api.common import GROUP, VERSION
from svcproxy.api.program import ProxyVirtualServer

log = logging.getLogger("svcproxy.agent.watch")
PLURAL = "proxyvirtualservers"
PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
T = TypeVar("T")


class ExpiredError(Exception):
    """The resourceVersion is too old (410 Gone): list again."""


def parse(obj: dict[str, Any], node_name: str = "") -> DesiredProgram:
    """One object from the API -> a DesiredProgram for the node ``node_name`` (one with an
    error when it does not parse)."""
    meta = obj.get("metadata") or {}
    owner = owner_of(meta.get("namespace"), meta.get("name", ""))
    try:
        return to_program(ProxyVirtualServer.parse(obj), node_name)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return DesiredProgram(
            owner,
            ((obj.get("spec") or {}).get("contentHash") or ""),
            {},
            f"{owner} does not parse ({where}: {first.get('msg')}); the operator writes these:"
            " check its version matches the agent's",
        )


def _describe(err: Exception) -> str:
    if isinstance(err, StatusError):
        return str(err)[:400]
    return repr(err)


class ListWatch(Generic[T]):
    """List and watch one kind; subclasses say which (``path``) and how to parse it."""

    path: ClassVar[str]
    kind: ClassVar[str]

    def parse_object(self, obj: dict[str, Any]) -> T:
        raise NotImplementedError

    def key_of(self, meta: dict[str, Any]) -> str:
        """The key ``on_delete`` gets: "namespace/name" (cluster-scoped: "/name")."""
        return owner_of(meta.get("namespace"), meta.get("name", ""))

    def __init__(
        self,
        api: ApiClient,
        *,
        on_list: Callable[[Iterable[T]], None],
        on_upsert: Callable[[T], None],
        on_delete: Callable[[str], None],
        on_restart: Callable[[str], None] = lambda reason: None,
        watch_timeout: int = 300,
        max_backoff: float = 30.0,
        page_size: int = 500,
    ) -> None:
        self.api = api
        self.on_list = on_list
        self.on_upsert = on_upsert
        self.on_delete = on_delete
        self.on_restart = on_restart
        self.watch_timeout = watch_timeout
        self.max_backoff = max_backoff
        self.page_size = page_size
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
                log.info("resourceVersion expired; listing again",
                         extra={"kind": self.kind, "rv": self.resource_version})
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
                log.warning("%s watch failed (%s); listing again", self.kind, _describe(err),
                            extra={"retry_in": round(delay, 2)})
                await asyncio.sleep(delay)
                backoff = min(self.max_backoff, backoff * 2)

    async def _list(self) -> None:
        # In pages: each page's raw objects are dropped once parsed, so a 10k-Service list
        # never holds every raw object at once (the agent's peak RSS). All pages are one
        # snapshot (the continue token pins the resourceVersion); an expired token is a 410.
        programs: list[T] = []
        params = {"limit": str(self.page_size)}
        try:
            while True:
                page = await self.api.get(self.path, params)
                programs.extend(self.parse_object(o) for o in page.get("items") or [])
                meta = page.get("metadata") or {}
                if not meta.get("continue"):
                    break
                params = {"limit": str(self.page_size), "continue": meta["continue"]}
                del page
        except StatusError as err:
            if err.status == 410:
                raise ExpiredError() from err
            raise
        self.on_list(programs)
        self.resource_version = meta["resourceVersion"]
        log.info("listed", extra={"kind": self.kind, "count": len(programs), "rv": self.resource_version})

    async def _watch(self) -> None:
        def connected() -> None:
            self.live = True

        events = self.api.watch(self.path, resource_version=self.resource_version,
                                timeout_seconds=self.watch_timeout, allow_bookmarks=True,
                                on_open=connected)
        try:
            async with contextlib.aclosing(events):  # release the connection when _event raises
                async for event in events:
                    self._event(event)
        except StatusError as err:
            if err.status == 410:
                raise ExpiredError() from err
            raise

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise ExpiredError()
            raise RuntimeError(f"watch error from the API server: {obj.get('message', obj)}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.on_upsert(self.parse_object(obj))
        elif kind == "DELETED":
            self.on_delete(self.key_of(obj.get("metadata") or {}))
        # BOOKMARK: only the resourceVersion moves on.
        if rv:
            self.resource_version = rv


class PvsWatch(ListWatch[DesiredProgram]):
    """ProxyVirtualServers in all namespaces -> the agent's programs for ``node_name``
    (set after construction; it picks the local endpoints of traffic policies Local)."""

    path = PATH
    kind = "ProxyVirtualServer"
    node_name = ""

    def parse_object(self, obj: dict[str, Any]) -> DesiredProgram:
        return parse(obj, self.node_name)


class ServiceWatch(ListWatch[tuple[str, frozenset[str]]]):
    """Services -> ("namespace/name", the addresses a program may use as virtual IPs)."""

    path = "/api/v1/services"
    kind = "Service"

    def parse_object(self, obj: dict[str, Any]) -> tuple[str, frozenset[str]]:
        return self.key_of(obj.get("metadata") or {}), service_addresses(obj)


class NodeWatch(ListWatch[tuple[str, tuple[Network, ...]]]):
    """Nodes -> (name, its Pod CIDRs and addresses)."""

    path = "/api/v1/nodes"
    kind = "Node"

    def key_of(self, meta: dict[str, Any]) -> str:
        return str(meta.get("name", ""))

    def parse_object(self, obj: dict[str, Any]) -> tuple[str, tuple[Network, ...]]:
        return self.key_of(obj.get("metadata") or {}), node_networks(obj)
