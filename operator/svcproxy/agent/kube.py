"""Writes the node's ProxyNode: create if missing, then merge-patch the status.

:class:`ProxyNodeWriter` is called by the agent's report loop (at most once
per second, see :class:`svcproxy.agent.report.ReportThrottle`). On the first
write it reads the existing status, so a restarted agent sends only what
differs from what its predecessor reported (and nulls owners that are gone).
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from svcproxy.agent.report import ReportThrottle
from svcproxy.api.common import API_VERSION, GROUP, VERSION

log = logging.getLogger("svcproxy.agent.report")
PLURAL = "proxynodes"
MERGE_PATCH = "application/merge-patch+json"


class ProxyNodeWriter:
    def __init__(self, api: client.ApiClient, node_name: str, throttle: ReportThrottle) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.node_name = node_name
        self.throttle = throttle
        self._known = False

    async def ensure(self) -> None:
        """Create the ProxyNode with an empty spec if it is missing; load its status."""
        try:
            obj = await self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node_name)
        except ApiException as err:
            if err.status != 404:
                raise
            body = {"apiVersion": API_VERSION, "kind": "ProxyNode",
                    "metadata": {"name": self.node_name}, "spec": {}}
            try:
                obj = await self.custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
            except ApiException as err2:
                if err2.status != 409:
                    raise
                obj = await self.custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node_name)
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
            # The generated client would pick json-patch; a merge patch must be asked for.
            await self.custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]
                GROUP, VERSION, PLURAL, self.node_name, {"status": patch}, _content_type=MERGE_PATCH
            )
        except ApiException as err:
            self.throttle.forget()
            self._known = False  # deleted under us, or out of step: read it again
            if err.status == 404:
                log.warning("ProxyNode vanished; recreating", extra={"node": self.node_name})
            raise
        self.throttle.written(status, now)
        return True
