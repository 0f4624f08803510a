"""Writes the node's ProxyNode: create if missing, then merge-patch the status.

:class:`ProxyNodeWriter` is called by the agent's report loop (at most once
per second, see :class:`svcproxy.agent.report.ReportThrottle`). On the first
write it reads the existing status, so a restarted agent sends only what
differs from what its predecessor reported (and nulls owners that are gone).
"""

from __future__ import annotations

import logging
from typing import Any

from svcproxy.agent.apiclient import ApiClient, StatusError
from svcproxy.agent.report import ReportThrottle
from svcproxy.api.common import API_VERSION, GROUP, VERSION

log = logging.getLogger("svcproxy.agent.report")
PLURAL = "proxynodes"
COLLECTION = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


class ProxyNodeWriter:
    def __init__(self, api: ApiClient, node_name: str, throttle: ReportThrottle) -> None:
        self.api = api
        self.node_name = node_name
        self.path = f"{COLLECTION}/{node_name}"
        self.throttle = throttle
        self._known = False

    async def ensure(self) -> None:
        """Create the ProxyNode with an empty spec if it is missing; load its status."""
        try:
            obj = await self.api.get(self.path)
        except StatusError as err:
            if err.status != 404:
                raise
            body = {"apiVersion": API_VERSION, "kind": "ProxyNode",
                    "metadata": {"name": self.node_name}, "spec": {}}
            try:
                obj = await self.api.post(COLLECTION, body)
            except StatusError as err2:
                if err2.status != 409:
                    raise
                obj = await self.api.get(self.path)
            log.info("created ProxyNode", extra={"node": self.node_name})
        self.throttle.sent = dict(obj.get("status") or {})
        self._known = True

    async def write(self, status: dict[str, Any], now: float) -> bool:
        """Send what changed, if a write is due; True when something was written."""
        if not self._known:
            await self.ensure()
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
