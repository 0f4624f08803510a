"""ClusterServiceProxyPolicy models and CRD: the proxy fields and their rules are the
namespaced policy's, selectors are optional, and the CRD is cluster-scoped as ``cspp``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from svcproxy.api import (
    ClusterServiceProxyPolicy,
    ClusterServiceProxyPolicySpec,
    ProxyFields,
    ServiceProxyPolicySpec,
    crdgen,
)


def _kind(name: str) -> crdgen.Kind:
    return next(k for k in crdgen.KINDS if k.kind == name)


def test_an_empty_spec_selects_everything_in_ipvs_mode() -> None:
    spec = ClusterServiceProxyPolicySpec.model_validate({})
    assert spec.namespace_selector is None and spec.service_selector is None
    assert spec.mode == "ipvs" and spec.scheduler == "rr" and spec.priority == 0


def test_the_documented_example_parses() -> None:
    policy = ClusterServiceProxyPolicy.parse(
        {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ClusterServiceProxyPolicy",
            "metadata": {"name": "default"},
            "spec": {
                "namespaceSelector": {"matchLabels": {"svcproxy.io/proxy": "enabled"}},
                "mode": "iptables",
                "sessionAffinity": {"type": "ClientIP"},
            },
        }
    )
    assert policy.spec.namespace_selector is not None
    assert policy.spec.namespace_selector.matches({"svcproxy.io/proxy": "enabled"})
    assert policy.spec.session_affinity is not None and policy.spec.session_affinity.timeout_seconds == 10800


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"mode": "iptables", "ipvs": {"scheduler": "rr"}}, "ipvs"),
        ({"mode": "userspace", "ipvs": {"scheduler": "mh"}}, "ipvs.scheduler"),
        ({"mode": "ipvs", "weights": [{"podSelector": {}, "weight": 2}]}, "weights"),
        ({"ipvs": {"scheduler": "rr", "schedulerFlags": ["sh-port"]}}, "schedulerFlags"),
        ({"priority": 1000001}, "priority"),
        ({"services": ["web"]}, "services"),  # names are the namespaced policy's only
    ],
)
def test_invalid_specs_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ClusterServiceProxyPolicySpec.model_validate(spec)
    assert field in str(caught.value)


def test_the_rules_are_the_namespaced_policys_shared_not_copied() -> None:
    assert ClusterServiceProxyPolicySpec.cel_rules is ProxyFields.cel_rules
    assert ServiceProxyPolicySpec.cel_rules[1:] == ProxyFields.cel_rules
    # Each check lambda agrees with the rule on a case it must refuse and one it must allow.
    iptables = next(r for r in ProxyFields.cel_rules if r.field_path == ".ipvs")
    ok = ClusterServiceProxyPolicySpec.model_validate({"mode": "iptables"})
    assert iptables.check(ok)
    scheduler = ClusterServiceProxyPolicySpec.model_validate({"ipvs": {"scheduler": "wrr"}}).ipvs
    bad = ClusterServiceProxyPolicySpec.model_construct(mode="iptables", ipvs=scheduler)
    assert not iptables.check(bad)


def test_crd_is_cluster_scoped_with_short_name_rules_and_columns() -> None:
    crd = crdgen.crd(_kind("ClusterServiceProxyPolicy"))
    assert crd["spec"]["scope"] == "Cluster"
    assert crd["spec"]["names"]["shortNames"] == ["cspp"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    top = version["schema"]["openAPIV3Schema"]
    assert top["required"] == ["spec"]
    spec = top["properties"]["spec"]
    assert {"namespaceSelector", "serviceSelector", "mode", "ipvs", "weights", "priority"} <= spec[
        "properties"
    ].keys()
    namespaced = crdgen.crd(_kind("ServiceProxyPolicy"))["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    ns_rules = namespaced["properties"]["spec"]["x-kubernetes-validations"]
    assert spec["x-kubernetes-validations"] == ns_rules[1:]  # all but "exactly one of"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Mode",
        "Scheduler",
        "Affinity",
        "Services",
        "Programmed",
        "Age",
    ]
    status = top["properties"]["status"]["properties"]
    assert "services" not in status  # no row per Service: counts and a few problems
    assert status["problems"]["maxItems"] == 10


def test_the_docs_example_parses_and_selects_labelled_namespaces() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "examples" / "cluster-default.yaml"
    policy = ClusterServiceProxyPolicy.parse(yaml.safe_load(path.read_text()))
    assert policy.spec.mode == "iptables" and policy.spec.service_selector is None
    selector = policy.spec.namespace_selector
    assert selector is not None and selector.matches({"svcproxy.io/proxy": "enabled"})
    assert not selector.matches({})
