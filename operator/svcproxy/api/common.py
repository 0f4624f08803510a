"""Shared API pieces: group/version, label selectors, conditions, CEL rules.

A ``CelRule`` is written once and used twice: as an ``x-kubernetes-validations``
entry in the generated CRD (so the API server refuses bad input) and as a
pydantic model validator (so ``svcproxy plan`` and unit tests refuse the same
input with the same message). Used by every model module in this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP: Final = "svcproxy.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "svcproxy.io/v1alpha1"

# kube-proxy ignores Services carrying this label: how svcproxy takes them over.
HANDOVER_LABEL = "service.kubernetes.io/service-proxy-name"
HANDOVER_VALUE = "svcproxy"

DNS1035_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1035Label = Annotated[str, StringConstraints(pattern=DNS1035_PATTERN, max_length=63)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]


def _json_integer(value: Any) -> Any:
    # pydantic's lax mode reads "5" and true as integers; the API server refuses both.
    if isinstance(value, str | bool):
        raise ValueError(f"must be an integer, not {type(value).__name__} {value!r}")
    return value


JsonInt = Annotated[int, BeforeValidator(_json_integer)]
"""An integer field as the API server reads it: no strings or booleans for numbers."""


def _unique(items: list[Any]) -> list[Any]:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise ValueError(f"duplicate value {item!r} at [{i}]: the list is a set, name each value once")
    return items


UNIQUE = AfterValidator(_unique)
"""For lists marked ``x-kubernetes-list-type: set``: the API server refuses duplicates."""


@dataclass(frozen=True)
class CelRule:
    """One cross-field rule, enforced by the API server (CEL) and by pydantic.

    ``check`` mirrors ``rule`` in Python; ``field_path`` (relative to the object
    the rule sits on, e.g. ``.ipvs``) tells the user which field to fix.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    reason: str = "FieldValueInvalid"

    def schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields refused.

    Subclasses list their cross-field rules in ``cel_rules``; they are checked
    after field validation and emitted into the CRD by ``crdgen``.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )
    cel_rules: ClassVar[tuple[CelRule, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _prune_nulls(cls, data: Any) -> Any:
        # The API server drops a null field that is not nullable (none here is) before it
        # defaults and validates: null reads as left out, on both sides.
        # An unknown field stays, null or not: the server refuses it either way.
        if isinstance(data, dict):
            known = {n for n, f in cls.model_fields.items()} | {f.alias for f in cls.model_fields.values()}
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data

    @model_validator(mode="after")
    def _check_cel_rules(self) -> ApiModel:
        for rule in self.cel_rules:
            if not rule.check(self):
                where = rule.field_path.lstrip(".") + ": " if rule.field_path else ""
                raise ValueError(f"{where}{rule.message}")
        return self

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (aliases, no nulls)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# For objects the API server hands back (status, whole resources): fields added by a
# newer version are ignored rather than refused.
LENIENT = ConfigDict(
    alias_generator=to_camel,
    populate_by_name=True,
    extra="ignore",
    frozen=True,
    use_attribute_docstrings=True,
)


class LabelSelectorRequirement(ApiModel):
    """A label selector requirement, as in Kubernetes' metav1.LabelSelector."""

    key: LabelKey
    """The label key the requirement applies to."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[LabelValue] = Field(default_factory=list, max_length=64)
    """Values for In and NotIn (non-empty); empty for Exists and DoesNotExist."""

    cel_rules = (
        CelRule(
            rule=(
                "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0) : "
                "(!has(self.values) || size(self.values) == 0)"
            ),
            message="values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            check=lambda s: (len(s.values) > 0) == (s.operator in ("In", "NotIn")),
            field_path=".values",
        ),
    )


class LabelSelector(ApiModel):
    """Selects objects by labels; an empty selector selects every object."""

    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=64)
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=32)
    """Requirements that must all hold."""

    cel_rules = (
        # A structural schema cannot bound map keys (no propertyNames): CEL does it for the server.
        CelRule(
            rule="!has(self.matchLabels) || self.matchLabels.all(k, size(k) >= 1 && size(k) <= 317)",
            message="matchLabels keys must be 1 to 317 characters long",
            check=lambda s: all(1 <= len(k) <= 317 for k in s.match_labels),
            field_path=".matchLabels",
        ),
    )

    def matches(self, labels: dict[str, str]) -> bool:
        """True when ``labels`` satisfy every label and expression."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            value = labels.get(req.key)
            if req.operator == "In" and (not present or value not in req.values):
                return False
            if req.operator == "NotIn" and present and value in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    model_config = ConfigDict(extra="ignore")

    type: Annotated[str, StringConstraints(max_length=316)]
    """Type of condition, e.g. Accepted, Programmed, Conflicted, Degraded."""
    status: Literal["True", "False", "Unknown"]
    """Status of the condition."""
    reason: Annotated[str, StringConstraints(max_length=1024)] = ""
    """Machine-readable CamelCase reason for the last transition."""
    message: Annotated[str, StringConstraints(max_length=32768)] = ""
    """Human-readable details."""
    last_transition_time: str | None = None
    """When the status last changed (RFC 3339)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The .metadata.generation the condition was set for."""


class ObjectMeta(BaseModel):
    """The part of metadata svcproxy reads; everything else is kept as is."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")

    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    creation_timestamp: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
