"""ClusterServiceProxyPolicy: a cluster-wide default below every namespaced policy.

A cluster policy selects namespaces (by label) and Services in them (by
label) and proxies them with the same fields and rules as a
ServiceProxyPolicy (:class:`~svcproxy.api.policy.ProxyFields`). Any
ServiceProxyPolicy that selects a Service beats every cluster policy. Its
status is a summary of counts and a few problem rows, never one row per
Service: one cluster policy may select every Service of a large cluster, and
the object must stay far below etcd's size limit. Parsed by the operator
(:mod:`svcproxy.compile.cluster`); ``crdgen`` turns these models into the CRD.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from svcproxy.api.common import API_VERSION, LENIENT, ApiModel, Condition, LabelSelector, ObjectMeta
from svcproxy.api.policy import ProxyFields

# Problem rows a cluster policy's status lists at most (the counts cover the rest).
MAX_PROBLEM_ROWS = 10


class ClusterServiceProxyPolicySpec(ProxyFields):
    """Which Services of which namespaces are proxied, and how, unless a
    ServiceProxyPolicy in their namespace selects them."""

    namespace_selector: LabelSelector | None = None
    """Selects namespaces by label; left out, every namespace."""
    service_selector: LabelSelector | None = None
    """Selects Services in the selected namespaces by label; left out or empty, every Service."""


class ClusterPolicySummary(ApiModel):
    """Counts over every Service the cluster policy selects."""

    model_config = LENIENT

    namespaces: int = 0
    """Namespaces in which the policy selects at least one Service."""
    selected: int = 0
    """Services the policy selects."""
    programmed: int = 0
    """Services it proxies whose program every node reports."""
    pending: int = 0
    """Services it proxies that some node does not report yet."""
    overridden: int = 0
    """Services a ServiceProxyPolicy in their namespace takes (not an error)."""
    conflicted: int = 0
    """Services another cluster policy takes (higher priority, older, or name first)."""
    not_proxied: int = 0
    """Services never proxied: headless, ExternalName, or handed to another proxy by label."""


class ClusterPolicyProblem(ApiModel):
    """One Service that is not (yet) proxied by this policy, and why."""

    model_config = LENIENT

    namespace: str
    """The Service's namespace."""
    name: str
    """The Service's name."""
    state: Literal["Pending", "Overridden", "Conflicted"]
    """Pending (not on every node yet), Overridden (a ServiceProxyPolicy takes it) or
    Conflicted (another cluster policy takes it)."""
    message: str = ""
    """Why."""


class ClusterServiceProxyPolicyStatus(ApiModel):
    """What the operator and the agents did with the cluster policy."""

    model_config = LENIENT

    observed_generation: int | None = None
    """The .metadata.generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Accepted, Programmed, Conflicted and Degraded."""
    programmed: str | None = None
    """Nodes that programmed every Service this policy proxies, over nodes in total (e.g. 3/3)."""
    summary: ClusterPolicySummary | None = None
    """Counts over the selected Services."""
    problems: list[ClusterPolicyProblem] = Field(default_factory=list, max_length=MAX_PROBLEM_ROWS)
    """The first few Services (by namespace and name) that are pending, overridden or conflicted."""


class ClusterServiceProxyPolicy(ApiModel):
    """Chooses how the Services of the selected namespaces are proxied when no
    ServiceProxyPolicy of their namespace selects them."""

    model_config = LENIENT

    api_version: Literal["svcproxy.io/v1alpha1"] = API_VERSION
    kind: Literal["ClusterServiceProxyPolicy"] = "ClusterServiceProxyPolicy"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ClusterServiceProxyPolicySpec
    status: ClusterServiceProxyPolicyStatus | None = None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ClusterServiceProxyPolicy:
        """As ServiceProxyPolicy.parse: camelCase names only, as the API server reads them."""
        return cls.model_validate(obj, by_alias=True, by_name=False)
