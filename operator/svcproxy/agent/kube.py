"""Writes the node's ProxyNode: create if missing, then merge-patch the status.

:class:`ProxyNodeWriter` is called by the agent's report loop (at most once
per second, see :class:`svcproxy.agent.report.ReportThrottle`). On the first
write it reads the existing status, so a restarted agent sends only what
differs from what its predecessor reported (and nulls owners that are gone).
The ProxyNode is owned by its Node (an ownerReference with the Node's uid), so
the garbage collector removes it with the Node; :meth:`ProxyNodeWriter.watch`
follows the ProxyNode and makes the next write recreate it when it is deleted
while the agent runs, unless its Node is gone (then it waits for the Node to
come back rather than leave a ProxyNode nothing owns).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from svcproxy.agent.apiclient import ApiClient, StatusError
from svcproxy.agent.report import ReportThrottle
from svcproxy.api.common import API_VERSION, GROUP, VERSION

log = logging.getLogger("svcproxy.agent.report")
PLURAL = "proxynodes"
COLLECTION = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


def owner_reference(node: dict[str, Any]) -> dict[str, Any]:
    """The ownerReference of a ProxyNode to its Node (not a controller: nothing reconciles it)."""
    meta = node.get("metadata") or {}
    return {"apiVersion": "v1", "kind": "Node", "name": meta.get("name", ""), "uid": meta.get("uid", "")}


class ProxyNodeWriter:
    def __init__(self, api: ApiClient, node_name: str, throttle: ReportThrottle) -> None:
        self.api = api
        self.node_name = node_name
        self.path = f"{COLLECTION}/{node_name}"
        self.throttle = throttle
        self._known = False
        self.node_seen = False  # the Node existed once while this agent ran
        self.node_gone = False  # ... and is gone now: no ProxyNode until it is back

    async def _owner(self) -> dict[str, Any] | None:
        """The ownerReference to this node's Node; None when there is no such Node."""
        try:
            node = await self.api.get(f"/api/v1/nodes/{self.node_name}")
        except StatusError as err:
            if err.status != 404:
                raise
            return None
        return owner_reference(node)

    async def ensure(self) -> bool:
        """Create the ProxyNode with an empty spec if it is missing, owned by its Node; load
        its status. False when the Node is gone (after it was seen): nothing is created."""
        owner = await self._owner()
        if owner is None and self.node_seen:
            if not self.node_gone:
                log.warning("the Node is gone: no ProxyNode until it is back", extra={"node": self.node_name})
            self.node_gone = True
            return False
        self.node_seen = self.node_seen or owner is not None
        self.node_gone = False
        refs = [owner] if owner is not None else []
        try:
            obj = await self.api.get(self.path)
            have = (obj.get("metadata") or {}).get("ownerReferences") or []
            if owner is not None and owner not in have:
                # Made before it had an owner (or for an earlier Node of this name).
                obj = await self.api.merge_patch(self.path, {"metadata": {"ownerReferences": refs}})
        except StatusError as err:
            if err.status != 404:
                raise
            if owner is None:  # an agent outside a cluster Node (tests, a renamed host)
                log.warning("no Node of this name: the ProxyNode is not owned by one and is not"
                            " removed with it", extra={"node": self.node_name})
            body = {"apiVersion": API_VERSION, "kind": "ProxyNode",
                    "metadata": {"name": self.node_name, "ownerReferences": refs}, "spec": {}}
            try:
                obj = await self.api.post(COLLECTION, body)
            except StatusError as err2:
                if err2.status != 409:
                    raise
                obj = await self.api.get(self.path)
            log.info("created ProxyNode", extra={"node": self.node_name})
        self.throttle.sent = dict(obj.get("status") or {})
        self._known = True
        return True

    def forget(self) -> None:
        """The ProxyNode was deleted: the next write creates it again and sends everything."""
        self.throttle.forget()
        self._known = False

    async def watch(self, on_deleted: Callable[[], None], timeout: int = 300) -> None:
        """Follow this node's ProxyNode forever; ``on_deleted()`` after ``forget`` when it
        is deleted (by someone, or by the garbage collector with its Node)."""
        while True:
            events = self.api.watch(COLLECTION, resource_version=None, timeout_seconds=timeout,
                                    allow_bookmarks=False, field_selector=f"metadata.name={self.node_name}")
            try:
                async with contextlib.aclosing(events):
                    async for event in events:
                        if event.get("type") == "DELETED":
                            log.warning("ProxyNode deleted; recreating", extra={"node": self.node_name})
                            self.forget()
                            on_deleted()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the API server is down: try again shortly
                log.info("ProxyNode watch ended (%r); again", err, extra={"node": self.node_name})
                await asyncio.sleep(2)

    async def write(self, status: dict[str, Any], now: float) -> bool:
        """Send what changed, if a write is due; True when something was written."""
        if not self._known and not await self.ensure():
            return False
        patch = self.throttle.patch_for(status, now)
        if patch is None:
            return False
        try:
            await self.api.merge_patch(f"{self.path}/status", {"status": patch})
        except StatusError as err:
            self.throttle.forget()
            self._known = False  # deleted under us, or out of step: read it again
            if err.status == 404:
                log.warning("ProxyNode vanished; recreating", extra={"node": self.node_name})
            raise
        self.throttle.written(status, now)
        return True
