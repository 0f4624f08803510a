"""The svcproxy API: pydantic models of the four custom resources.

These models are the single source of the CRD schemas (``svcproxy crds``
generates ``crds/`` from them) and the parsed form every other layer works
with: the operator parses policies here, compiles ProxyVirtualServers, and the
agent reads those and writes ProxyNodes. Nothing here does I/O.
"""

from svcproxy.api.clusterpolicy import (
    ClusterServiceProxyPolicy,
    ClusterServiceProxyPolicySpec,
    ClusterServiceProxyPolicyStatus,
)
from svcproxy.api.common import (
    API_VERSION,
    GROUP,
    HANDOVER_LABEL,
    HANDOVER_VALUE,
    VERSION,
    Condition,
    LabelSelector,
    LabelSelectorRequirement,
)
from svcproxy.api.node import ProxyNode, ProxyNodeStatus
from svcproxy.api.policy import (
    DEFAULT_AFFINITY_TIMEOUT,
    IPVS_SCHEDULERS,
    USERSPACE_SCHEDULERS,
    WEIGHTED_SCHEDULERS,
    ProxyFields,
    Scheduler,
    SchedulerFlag,
    ServiceProxyPolicy,
    ServiceProxyPolicySpec,
    ServiceProxyPolicyStatus,
)
from svcproxy.api.program import ProxyVirtualServer, ProxyVirtualServerSpec, RealServerSpec, VirtualServerSpec
from svcproxy.base import Mode

__all__ = [
    "API_VERSION",
    "DEFAULT_AFFINITY_TIMEOUT",
    "GROUP",
    "HANDOVER_LABEL",
    "HANDOVER_VALUE",
    "IPVS_SCHEDULERS",
    "USERSPACE_SCHEDULERS",
    "VERSION",
    "WEIGHTED_SCHEDULERS",
    "ClusterServiceProxyPolicy",
    "ClusterServiceProxyPolicySpec",
    "ClusterServiceProxyPolicyStatus",
    "Condition",
    "LabelSelector",
    "LabelSelectorRequirement",
    "Mode",
    "ProxyFields",
    "ProxyNode",
    "ProxyNodeStatus",
    "ProxyVirtualServer",
    "ProxyVirtualServerSpec",
    "RealServerSpec",
    "Scheduler",
    "SchedulerFlag",
    "ServiceProxyPolicy",
    "ServiceProxyPolicySpec",
    "ServiceProxyPolicyStatus",
    "VirtualServerSpec",
]
