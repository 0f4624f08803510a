"""ServiceProxyPolicy models: valid specs round-trip, invalid ones are refused
with a message naming the field and the rule."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from svcproxy.api import (
    IPVS_SCHEDULERS,
    USERSPACE_SCHEDULERS,
    WEIGHTED_SCHEDULERS,
    LabelSelector,
    ServiceProxyPolicy,
    ServiceProxyPolicySpec,
)

dns1035 = st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z")
label_value = st.from_regex(r"\A[a-z0-9]{0,10}\Z")
selector = st.fixed_dictionaries(
    {"matchLabels": st.dictionaries(dns1035, label_value, max_size=3)},
    optional={
        "matchExpressions": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "key": dns1035,
                        "operator": st.sampled_from(["In", "NotIn"]),
                        "values": st.lists(label_value, min_size=1, max_size=3),
                    }
                ),
                st.fixed_dictionaries(
                    {"key": dns1035, "operator": st.sampled_from(["Exists", "DoesNotExist"])}
                ),
            ),
            max_size=3,
        )
    },
)


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if draw(st.booleans()):
        spec["serviceSelector"] = draw(selector)
    else:
        spec["services"] = draw(st.lists(dns1035, min_size=1, max_size=5, unique=True))
    mode = draw(st.sampled_from(["ipvs", "iptables", "userspace"]))
    spec["mode"] = mode
    scheduler = None
    if mode != "iptables" and draw(st.booleans()):
        choices = USERSPACE_SCHEDULERS if mode == "userspace" else IPVS_SCHEDULERS
        scheduler = draw(st.sampled_from(choices))
        ipvs: dict[str, Any] = {"scheduler": scheduler}
        if mode == "ipvs" and scheduler in ("sh", "mh"):
            ipvs["schedulerFlags"] = draw(st.lists(st.sampled_from(["sh-fallback", "sh-port"]), unique=True))
        spec["ipvs"] = ipvs
    if draw(st.booleans()):
        affinity: dict[str, Any] = {"type": draw(st.sampled_from(["None", "ClientIP"]))}
        if draw(st.booleans()):
            affinity["timeoutSeconds"] = draw(st.integers(1, 86400))
        spec["sessionAffinity"] = affinity
    weighted = (mode == "ipvs" and scheduler in WEIGHTED_SCHEDULERS) or (
        mode == "userspace" and scheduler == "wrr"
    )
    if weighted and draw(st.booleans()):
        spec["weights"] = draw(
            st.lists(
                st.fixed_dictionaries({"podSelector": selector, "weight": st.integers(0, 65535)}),
                max_size=3,
            )
        )
    spec["priority"] = draw(st.integers(-1000000, 1000000))
    return spec


@settings(max_examples=300, deadline=None)
@given(valid_specs())
def test_every_valid_spec_round_trips_through_json(spec: dict[str, Any]) -> None:
    parsed = ServiceProxyPolicySpec.model_validate(spec)
    again = ServiceProxyPolicySpec.model_validate(json.loads(json.dumps(parsed.wire())))
    assert again == parsed
    # Defaults are filled in, what the user wrote is kept.
    for key, value in spec.items():
        if key not in ("ipvs", "sessionAffinity", "weights", "serviceSelector"):
            assert parsed.wire()[key] == value


def test_defaults_match_the_documented_ones() -> None:
    spec = ServiceProxyPolicySpec.model_validate(
        {"services": ["web"], "ipvs": {}, "sessionAffinity": {"type": "ClientIP"}}
    )
    assert spec.mode == "ipvs"
    assert spec.scheduler == "rr"
    assert spec.session_affinity is not None
    assert spec.session_affinity.timeout_seconds == 10800
    assert spec.priority == 0


def test_effective_scheduler_is_none_in_iptables_mode() -> None:
    spec = ServiceProxyPolicySpec.model_validate({"services": ["web"], "mode": "iptables"})
    assert spec.scheduler is None


def test_the_documented_example_parses() -> None:
    obj = {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ServiceProxyPolicy",
        "metadata": {"name": "checkout", "namespace": "shop"},
        "spec": {
            "serviceSelector": {"matchLabels": {"app": "checkout"}},
            "mode": "ipvs",
            "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port"]},
            "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600},
            "weights": [{"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 1}],
            "priority": 0,
        },
    }
    with pytest.raises(ValidationError, match="weights need a scheduler"):
        # sh does not read weights: the example needs a weighted scheduler for them.
        ServiceProxyPolicy.parse(obj)
    obj["spec"]["ipvs"] = {"scheduler": "mh", "schedulerFlags": ["sh-port"]}
    policy = ServiceProxyPolicy.parse(obj)
    assert policy.metadata.name == "checkout"
    assert policy.spec.scheduler_flags == ("sh-port",)


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "unknown scheduler",
        {"services": ["a"], "ipvs": {"scheduler": "fastest"}},
        "ipvs.scheduler",
        "Input should be 'rr'",
    ),
    (
        "timeout 0",
        {"services": ["a"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 0}},
        "sessionAffinity.timeoutSeconds",
        "greater than or equal to 1",
    ),
    (
        "timeout 86401",
        {"services": ["a"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 86401}},
        "sessionAffinity.timeoutSeconds",
        "less than or equal to 86400",
    ),
    (
        "selector and names",
        {"services": ["a"], "serviceSelector": {"matchLabels": {"x": "y"}}},
        "services",
        "exactly one of serviceSelector and services",
    ),
    ("neither", {"mode": "ipvs"}, "services", "exactly one of serviceSelector and services"),
    (
        "flags without sh/mh",
        {"services": ["a"], "ipvs": {"scheduler": "rr", "schedulerFlags": ["sh-port"]}},
        "schedulerFlags",
        "valid only with scheduler sh or mh",
    ),
    (
        "scheduler with iptables",
        {"services": ["a"], "mode": "iptables", "ipvs": {"scheduler": "rr"}},
        "ipvs",
        "iptables mode takes no scheduler",
    ),
    (
        "negative weight",
        {"services": ["a"], "ipvs": {"scheduler": "wrr"}, "weights": [{"podSelector": {}, "weight": -1}]},
        "weights.0.weight",
        "greater than or equal to 0",
    ),
    (
        "weight too big",
        {"services": ["a"], "ipvs": {"scheduler": "wrr"}, "weights": [{"podSelector": {}, "weight": 65536}]},
        "weights.0.weight",
        "less than or equal to 65535",
    ),
    (
        "weights with rr",
        {"services": ["a"], "weights": [{"podSelector": {}, "weight": 2}]},
        "weights",
        "weights need a scheduler that reads them",
    ),
    ("not a DNS-1035 label", {"services": ["Web_1"]}, "services.0", "should match pattern"),
    ("name starting with a digit", {"services": ["1web"]}, "services.0", "should match pattern"),
    (
        "userspace with mh",
        {"services": ["a"], "mode": "userspace", "ipvs": {"scheduler": "mh"}},
        "ipvs.scheduler",
        "userspace mode supports schedulers",
    ),
    ("unknown mode", {"services": ["a"], "mode": "ebpf"}, "mode", "Input should be 'ipvs'"),
    ("unknown field", {"services": ["a"], "shceduler": "rr"}, "shceduler", "Extra inputs are not permitted"),
    (
        "In without values",
        {"serviceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "values",
        "values must be non-empty for In and NotIn",
    ),
    # What the API server reads the same way (found by tests/e2e/test_policy_fuzz.py).
    (
        "null type",
        {"services": ["a"], "sessionAffinity": {"type": None}},
        "sessionAffinity.type",
        "Field required",
    ),
    ("duplicate service", {"services": ["a", "b", "a"]}, "services", "duplicate value 'a' at [2]"),
    (
        "duplicate flag",
        {"services": ["a"], "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port", "sh-port"]}},
        "ipvs.schedulerFlags",
        "duplicate value 'sh-port' at [1]",
    ),
    ("priority as a string", {"services": ["a"], "priority": "5"}, "priority", "must be an integer, not str"),
    ("priority as a boolean", {"services": ["a"], "priority": True}, "priority", "not bool"),
    (
        "timeout as a string",
        {"services": ["a"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": "60"}},
        "sessionAffinity.timeoutSeconds",
        "must be an integer",
    ),
    (
        "weight as a string",
        {"services": ["a"], "ipvs": {"scheduler": "wrr"}, "weights": [{"podSelector": {}, "weight": "2"}]},
        "weights.0.weight",
        "must be an integer",
    ),
    (
        "empty label key",
        {"serviceSelector": {"matchLabels": {"": "x"}}},
        "matchLabels",
        "at least 1 character",
    ),
]


@pytest.mark.parametrize(("spec", "field", "rule"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_invalid_spec_is_refused_naming_field_and_rule(spec: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(ValidationError) as info:
        ServiceProxyPolicySpec.model_validate(spec)
    text = str(info.value)
    assert field in text
    assert rule in text


def test_label_selector_semantics() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "track", "operator": "In", "values": ["stable", "canary"]},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }
    )
    assert sel.matches({"app": "web", "track": "canary"})
    assert not sel.matches({"app": "web", "track": "beta"})
    assert not sel.matches({"app": "web", "track": "stable", "legacy": "1"})
    assert not sel.matches({"track": "stable"})
    assert LabelSelector().matches({"anything": "x"})


def test_null_fields_read_as_left_out_as_the_api_server_prunes_them() -> None:
    spec = ServiceProxyPolicySpec.model_validate(
        {
            "services": ["a"],
            "serviceSelector": None,
            "mode": None,
            "ipvs": {"scheduler": None},
            "priority": None,
        }
    )
    assert (spec.mode, spec.scheduler, spec.priority, spec.service_selector) == ("ipvs", "rr", 0, None)


def test_parse_takes_the_wire_names_only() -> None:
    obj = {"metadata": {"name": "p"}, "spec": {"services": ["a"], "session_affinity": {"type": "ClientIP"}}}
    with pytest.raises(ValidationError, match="session_affinity"):
        ServiceProxyPolicy.parse(obj)
    obj["spec"] = {"services": ["a"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 5}}
    assert ServiceProxyPolicy.parse(obj).spec.session_affinity is not None


def test_an_unknown_null_field_is_still_refused() -> None:
    with pytest.raises(ValidationError, match="scheduler"):
        ServiceProxyPolicySpec.model_validate({"services": ["a"], "scheduler": None})
