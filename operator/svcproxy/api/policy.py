"""ServiceProxyPolicy: what a user applies to choose how Services are proxied.

A policy selects Services (by label, or by name) in its namespace and sets
their proxy mode, IPVS scheduler, session affinity and endpoint weights. The
operator parses policies into these models at its edge and the compile step
reads them; ``crdgen`` turns them into the CRD schema.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StringConstraints

from svcproxy.api.common import (
    API_VERSION,
    LENIENT,
    UNIQUE,
    ApiModel,
    CelRule,
    Condition,
    DNS1035Label,
    JsonInt,
    LabelSelector,
    ObjectMeta,
)
from svcproxy.base import Mode

Scheduler = Literal["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf"]
SchedulerFlag = Literal["sh-fallback", "sh-port"]
AffinityType = Literal["None", "ClientIP"]

IPVS_SCHEDULERS: tuple[str, ...] = (
    "rr",
    "wrr",
    "lc",
    "wlc",
    "lblc",
    "lblcr",
    "dh",
    "sh",
    "sed",
    "nq",
    "mh",
    "fo",
    "ovf",
)
# One proxy process on one node can honour these; the rest need kernel state.
USERSPACE_SCHEDULERS: tuple[str, ...] = ("rr", "wrr", "lc", "sh", "dh", "sed", "nq")
# IPVS schedulers whose kernel implementation reads real-server weights.
WEIGHTED_SCHEDULERS: tuple[str, ...] = ("wrr", "wlc", "sed", "nq", "lblc", "lblcr", "mh", "fo", "ovf")
USERSPACE_WEIGHTED: tuple[str, ...] = ("wrr",)
FLAGGED_SCHEDULERS: tuple[str, ...] = ("sh", "mh")
DEFAULT_AFFINITY_TIMEOUT = 10800
MAX_AFFINITY_TIMEOUT = 86400


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


class IPVSSpec(ApiModel):
    """Scheduling: which IPVS scheduler picks a real server for a new connection."""

    scheduler: Scheduler = "rr"
    """IPVS scheduler: rr, wrr, lc, wlc, lblc, lblcr, dh, sh, sed, nq, mh, fo or ovf.
    Stateful schedulers (lc, wlc, sed, nq, lblc, lblcr) decide on each node alone.
    In userspace mode only rr, wrr, lc, sh, dh, sed and nq are available."""
    scheduler_flags: Annotated[list[SchedulerFlag], UNIQUE] = Field(
        default_factory=list, max_length=2, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Flags for the hashing schedulers sh and mh only: sh-fallback (pick another
    real server when the hashed one is unavailable), sh-port (hash the source
    port too)."""

    cel_rules = (
        CelRule(
            rule=(
                "!has(self.schedulerFlags) || size(self.schedulerFlags) == 0 || "
                f"self.scheduler in {_cel_list(FLAGGED_SCHEDULERS)}"
            ),
            message="schedulerFlags are valid only with scheduler sh or mh",
            check=lambda s: not s.scheduler_flags or s.scheduler in FLAGGED_SCHEDULERS,
            field_path=".schedulerFlags",
        ),
    )


class SessionAffinity(ApiModel):
    """Session affinity: keep a client on one endpoint for a while."""

    type: AffinityType
    """None, or ClientIP to send every connection of one client IP to the same endpoint."""
    timeout_seconds: JsonInt = Field(default=DEFAULT_AFFINITY_TIMEOUT, ge=1, le=MAX_AFFINITY_TIMEOUT)
    """How long a ClientIP affinity lasts after the client's last connection (1..86400, default 10800)."""


class EndpointWeight(ApiModel):
    """A weight for the endpoints whose Pods match a label selector."""

    pod_selector: LabelSelector
    """Pods whose endpoints get this weight; the first matching entry wins."""
    weight: JsonInt = Field(default=1, ge=0, le=65535)
    """Relative weight (0..65535); 0 takes no new connections. Unmatched endpoints weigh 1."""


class ProxyFields(ApiModel):
    """The proxy settings every policy kind shares (ServiceProxyPolicy and
    ClusterServiceProxyPolicy): mode, scheduler, affinity, weights, priority, and
    the rules that tie them together. Each kind's spec extends this with how it
    selects Services."""

    mode: Mode = "ipvs"
    """Proxy mode: ipvs (kernel IPVS; falls back to iptables on nodes without IPVS),
    iptables (netfilter NAT rules), or userspace (the node agent proxies itself)."""
    ipvs: IPVSSpec | None = None
    """Scheduler settings, for modes ipvs and userspace (default scheduler rr)."""
    session_affinity: SessionAffinity | None = None
    """Session affinity; when left out, each Service's own spec.sessionAffinity stands."""
    weights: list[EndpointWeight] | None = Field(default=None, max_length=32)
    """Endpoint weights by Pod labels, for weighted schedulers (ipvs: wrr, wlc, sed,
    nq, lblc, lblcr, mh, fo, ovf; userspace: wrr)."""
    priority: JsonInt = Field(default=0, ge=-1000000, le=1000000)
    """When two policies select one Service, the higher priority wins, then the older policy."""

    cel_rules: ClassVar[tuple[CelRule, ...]] = (
        CelRule(
            rule="self.mode != 'iptables' || !has(self.ipvs)",
            message="iptables mode takes no scheduler: remove spec.ipvs, or use mode ipvs or userspace",
            check=lambda s: s.mode != "iptables" or s.ipvs is None,
            field_path=".ipvs",
            reason="FieldValueForbidden",
        ),
        CelRule(
            rule=(
                "self.mode != 'userspace' || !has(self.ipvs) || "
                f"(self.ipvs.scheduler in {_cel_list(USERSPACE_SCHEDULERS)} && "
                "(!has(self.ipvs.schedulerFlags) || size(self.ipvs.schedulerFlags) == 0))"
            ),
            message=(
                "userspace mode supports schedulers rr, wrr, lc, sh, dh, sed and nq, without schedulerFlags"
            ),
            check=lambda s: (
                s.mode != "userspace"
                or s.ipvs is None
                or (s.ipvs.scheduler in USERSPACE_SCHEDULERS and not s.ipvs.scheduler_flags)
            ),
            field_path=".ipvs.scheduler",
            reason="FieldValueInvalid",
        ),
        CelRule(
            rule=(
                "!has(self.weights) || size(self.weights) == 0 || (has(self.ipvs) && ("
                f"(self.mode == 'ipvs' && self.ipvs.scheduler in {_cel_list(WEIGHTED_SCHEDULERS)}) || "
                f"(self.mode == 'userspace' && self.ipvs.scheduler in {_cel_list(USERSPACE_WEIGHTED)})))"
            ),
            message=(
                "weights need a scheduler that reads them: in ipvs mode wrr, wlc, sed, nq, lblc, "
                "lblcr, mh, fo or ovf; in userspace mode wrr"
            ),
            check=lambda s: (
                not s.weights
                or (
                    s.ipvs is not None
                    and (
                        (s.mode == "ipvs" and s.ipvs.scheduler in WEIGHTED_SCHEDULERS)
                        or (s.mode == "userspace" and s.ipvs.scheduler in USERSPACE_WEIGHTED)
                    )
                )
            ),
            field_path=".weights",
            reason="FieldValueForbidden",
        ),
    )

    @property
    def scheduler(self) -> str | None:
        """The effective scheduler: None in iptables mode, else the set one or rr."""
        if self.mode == "iptables":
            return None
        return self.ipvs.scheduler if self.ipvs else "rr"

    @property
    def scheduler_flags(self) -> tuple[str, ...]:
        return tuple(self.ipvs.scheduler_flags) if self.ipvs else ()


class ServiceProxyPolicySpec(ProxyFields):
    """How the selected Services are proxied on every node."""

    service_selector: LabelSelector | None = None
    """Selects Services in the policy's namespace by label. Exactly one of
    serviceSelector and services must be set."""
    services: Annotated[list[DNS1035Label], UNIQUE] | None = Field(
        default=None, max_length=256, json_schema_extra={"x-kubernetes-list-type": "set"}
    )
    """Names of Services in the policy's namespace. Exactly one of serviceSelector
    and services must be set."""

    cel_rules = (
        CelRule(
            rule="has(self.serviceSelector) != has(self.services)",
            message="exactly one of serviceSelector and services must be set",
            check=lambda s: (s.service_selector is None) != (s.services is None),
            field_path=".services",
            reason="FieldValueRequired",
        ),
        *ProxyFields.cel_rules,
    )


class PolicyServiceStatus(ApiModel):
    """What became of one Service the policy selects."""

    model_config = LENIENT

    name: str
    """The Service's name."""
    cluster_ip: str | None = Field(default=None, alias="clusterIP")
    """The Service's ClusterIP."""
    ports: list[str] = Field(default_factory=list)
    """The Service's ports as port/protocol."""
    mode: str | None = None
    """Effective mode; says so when nodes fell back (e.g. "ipvs (iptables on node-3)")."""
    state: Literal["Programmed", "Pending", "Conflicted", "NotProxied"] = "Pending"
    """Programmed on every node, Pending, Conflicted (another policy wins), or NotProxied
    (ExternalName and headless Services are never proxied)."""
    nodes_programmed: int = 0
    """Nodes whose agent reports the current program of this Service."""
    nodes_total: int = 0
    """Nodes that should run an agent: Ready and matching the agents' node selector,
    whether or not their agent has reported yet."""
    message: str = ""
    """Why the Service is in this state."""


class ServiceProxyPolicyStatus(ApiModel):
    """What the operator and the agents did with the policy."""

    model_config = LENIENT

    observed_generation: int | None = None
    """The .metadata.generation this status describes."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Accepted, Programmed, Conflicted and Degraded."""
    services: list[PolicyServiceStatus] = Field(default_factory=list)
    """One row per selected Service."""
    programmed: str | None = None
    """Nodes that programmed every selected Service, over the Nodes that should run an agent
    (e.g. 2/3: one Ready Node has not applied them, or its agent has not reported)."""


class ServiceProxyPolicy(ApiModel):
    """Chooses how the selected Services are proxied on every node: mode, IPVS
    scheduler and session affinity."""

    model_config = LENIENT

    api_version: Literal["svcproxy.io/v1alpha1"] = API_VERSION
    kind: Literal["ServiceProxyPolicy"] = "ServiceProxyPolicy"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: ServiceProxyPolicySpec
    status: ServiceProxyPolicyStatus | None = None

    @classmethod
    def parse(cls, obj: dict[str, Any]) -> ServiceProxyPolicy:
        """A policy as written to or read from the API server: camelCase names only (the
        server refuses ``session_affinity`` as an unknown field, so does this)."""
        return cls.model_validate(obj, by_alias=True, by_name=False)


PolicyName = Annotated[str, StringConstraints(max_length=253)]
