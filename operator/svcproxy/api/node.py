"""ProxyNode: one node's report, written only by that node's agent.

It says what the node can do (IPVS present, schedulers that load, netfilter
backend), which modes are in effect (with fallbacks), which program of every
ProxyVirtualServer is applied (by content hash), counts, the last sync and any
errors. The operator folds these reports into each policy's status.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from svcproxy.api.common import API_VERSION, LENIENT, ApiModel, Condition, ObjectMeta
from svcproxy.base import Mode


class NodeCapabilities(ApiModel):
    """What the node's kernel and tools offer."""

    model_config = LENIENT

    ipvs: bool = False
    """IPVS is usable (module loads and answers over netlink)."""
    schedulers: list[str] = Field(default_factory=list)
    """IPVS schedulers whose modules load."""
    netfilter_backend: str = "none"
    """iptables-nft, iptables-legacy or none."""
    userspace: bool = True
    """The agent can proxy in userspace."""
    kernel_release: str = ""
    """uname -r of the node."""


class ModeInEffect(ApiModel):
    """A requested mode and the mode the node actually runs it in."""

    model_config = LENIENT

    requested: Mode
    """Mode asked for by ProxyVirtualServers."""
    effective: Mode
    """Mode the node runs it in."""
    reason: str = ""
    """Why they differ (e.g. IPVS is not available in this kernel)."""


RefusalReason = Literal["ForeignVIP", "ForeignNodePort", "ForeignRealServer", "UnknownService"]
"""Why an agent refused a ProxyVirtualServer (see ``SyncError.reason``)."""


class SyncError(ApiModel):
    """A ProxyVirtualServer the agent could not apply."""

    model_config = LENIENT

    service: str
    """namespace/name of the ProxyVirtualServer."""
    message: str
    """What went wrong and what to do."""
    time: str | None = None
    """When it last happened (RFC 3339); for a refusal, since when it is refused."""
    reason: RefusalReason | None = None
    """Set when the agent refused the program as untrusted (nothing of it is programmed):
    ForeignVIP (a virtual IP that is not its Service's address), ForeignNodePort (a node
    port that is not its Service's, or outside the node-port range), ForeignRealServer (a real
    server outside every Pod CIDR and node address), UnknownService (no such Service)."""


class NodeCounts(ApiModel):
    """What the agent owns in the kernel."""

    model_config = LENIENT

    services: int = 0
    """ProxyVirtualServers applied."""
    virtual_servers: int = 0
    """Virtual servers (VIP:port/protocol) programmed."""
    real_servers: int = 0
    """Real servers programmed."""


class ProxyNodeStatus(ApiModel):
    """The agent's report."""

    model_config = LENIENT

    node_name: str = ""
    """The node this report is about."""
    agent_version: str = ""
    """svcproxy version of the agent."""
    capabilities: NodeCapabilities = Field(default_factory=NodeCapabilities)
    """Kernel capabilities."""
    modes: list[ModeInEffect] = Field(default_factory=list)
    """Modes in effect, with fallbacks."""
    modes_summary: str = ""
    """Short text for kubectl get, e.g. "ipvs,iptables,userspace" or "iptables(ipvs)"."""
    applied: dict[str, str] = Field(default_factory=dict)
    """namespace/name of each applied ProxyVirtualServer -> its content hash."""
    counts: NodeCounts = Field(default_factory=NodeCounts)
    """Counts of owned kernel objects."""
    last_sync_time: str | None = None
    """When the last sync finished (RFC 3339)."""
    last_sync_duration_seconds: float | None = None
    """How long the last sync took."""
    errors: list[SyncError] = Field(default_factory=list, max_length=100)
    """ProxyVirtualServers that failed to apply or were refused (those carry a reason)."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready: the agent is running and synced."""


class ProxyNodeSpec(ApiModel):
    """Empty: a ProxyNode is all report."""

    model_config = LENIENT


class ProxyNode(ApiModel):
    """One node's svcproxy report, written only by the agent on that node."""

    model_config = LENIENT

    api_version: Literal["svcproxy.io/v1alpha1"] = API_VERSION
    kind: Literal["ProxyNode"] = "ProxyNode"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ProxyNodeSpec = Field(default_factory=ProxyNodeSpec)
    status: ProxyNodeStatus = Field(default_factory=ProxyNodeStatus)

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ProxyNode:
        return cls.model_validate(obj)
