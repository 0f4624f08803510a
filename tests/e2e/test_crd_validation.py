"""The real API server refuses bad ServiceProxyPolicies with clear messages (schema + CEL),
fills in defaults, and `kubectl explain` reads well."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab
REPO = Path(__file__).resolve().parents[2]


def install_crds(lab: Lab) -> None:
    """Apply crds/ and wait until the API server serves every kind."""
    lab.kubectl("apply", "-f", str(REPO / "crds"))
    lab.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/serviceproxypolicies.svcproxy.io",
        "crd/proxyvirtualservers.svcproxy.io",
        "crd/proxynodes.svcproxy.io",
        "crd/clusterkopfpeerings.kopf.dev",
    )


@pytest.fixture(scope="module")
def crds(lab: Lab) -> Lab:
    install_crds(lab)
    return lab


def _policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ServiceProxyPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def _apply(lab: Lab, namespace: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [lab.kubectl_bin, "--kubeconfig", str(lab.kubeconfig), "apply", "-n", namespace, "-f", "-"],
        input=json.dumps(obj),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


BAD = [
    (
        {"services": ["web"], "ipvs": {"scheduler": "fastest"}},
        ['spec.ipvs.scheduler: Unsupported value: "fastest"', '"rr"'],
    ),
    (
        {"services": ["web"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 0}},
        ["spec.sessionAffinity.timeoutSeconds: Invalid value: 0", "greater than or equal to 1"],
    ),
    (
        {"services": ["web"], "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 86401}},
        ["spec.sessionAffinity.timeoutSeconds: Invalid value: 86401", "less than or equal to 86400"],
    ),
    (
        {"services": ["web"], "serviceSelector": {"matchLabels": {"app": "web"}}},
        ["exactly one of serviceSelector and services must be set"],
    ),
    ({"mode": "ipvs"}, ["exactly one of serviceSelector and services must be set"]),
    (
        {"services": ["web"], "ipvs": {"scheduler": "rr", "schedulerFlags": ["sh-port"]}},
        ["spec.ipvs.schedulerFlags", "schedulerFlags are valid only with scheduler sh or mh"],
    ),
    (
        {"services": ["web"], "mode": "iptables", "ipvs": {"scheduler": "rr"}},
        ["spec.ipvs", "iptables mode takes no scheduler"],
    ),
    (
        {
            "services": ["web"],
            "ipvs": {"scheduler": "wrr"},
            "weights": [{"podSelector": {"matchLabels": {"a": "b"}}, "weight": -1}],
        },
        ["spec.weights[0].weight: Invalid value: -1", "greater than or equal to 0"],
    ),
    ({"services": ["Web_1"]}, ['spec.services[0]: Invalid value: "Web_1"', "should match"]),
]


@pytest.mark.parametrize(
    ("spec", "expected"),
    BAD,
    ids=[
        "unknown-scheduler",
        "timeout-0",
        "timeout-86401",
        "selector-and-names",
        "neither",
        "flags-without-sh",
        "scheduler-with-iptables",
        "negative-weight",
        "bad-service-name",
    ],
)
def test_bad_policy_is_refused_with_a_clear_message(
    crds: Lab, namespace: str, spec: dict[str, Any], expected: list[str]
) -> None:
    proc = _apply(crds, namespace, _policy(spec))
    assert proc.returncode != 0, f"accepted: {spec}"
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in: {proc.stderr}"
    assert not crds.kubectl("get", "spp", "-n", namespace, "-o", "name")


def test_valid_policy_is_accepted_with_defaults(crds: Lab, namespace: str) -> None:
    spec = {
        "serviceSelector": {"matchLabels": {"app": "web"}},
        "sessionAffinity": {"type": "ClientIP"},
        "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port"]},
    }
    proc = _apply(crds, namespace, _policy(spec))
    assert proc.returncode == 0, proc.stderr
    stored = crds.kubectl_json("get", "spp", "p", "-n", namespace)["spec"]
    assert stored["mode"] == "ipvs"
    assert stored["priority"] == 0
    assert stored["sessionAffinity"] == {"type": "ClientIP", "timeoutSeconds": 10800}
    assert stored["ipvs"] == {"scheduler": "sh", "schedulerFlags": ["sh-port"]}
    table = crds.kubectl("get", "spp", "-n", namespace)
    assert table.split("\n")[0].split() == ["NAME", "MODE", "SCHEDULER", "AFFINITY", "PROGRAMMED", "AGE"]
    assert table.split("\n")[1].split()[:4] == ["p", "ipvs", "sh", "ClientIP"]


@pytest.mark.parametrize(
    "spec",
    [
        {"services": ["web"], "ipvs": {"scheduler": "rr"}},
        {
            "services": ["web"],
            "mode": "userspace",
            "ipvs": {"scheduler": "wrr"},
            "weights": [{"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 3}],
        },
        {
            "serviceSelector": {
                "matchExpressions": [
                    {"key": "tier", "operator": "Exists"},
                    {"key": "app", "operator": "In", "values": ["web"]},
                ]
            }
        },
    ],
    ids=["scheduler-without-flags", "userspace-weights", "selector-expressions"],
)
def test_policies_leaving_optional_lists_out_are_accepted(
    crds: Lab, namespace: str, spec: dict[str, Any]
) -> None:
    proc = _apply(crds, namespace, _policy(spec))
    assert proc.returncode == 0, proc.stderr


def test_selector_expression_values_rule(crds: Lab, namespace: str) -> None:
    bad = {"serviceSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}}
    proc = _apply(crds, namespace, _policy(bad))
    assert proc.returncode != 0 and "values must be non-empty for In and NotIn" in proc.stderr


def test_kubectl_explain_reads_well(crds: Lab) -> None:
    text = crds.kubectl("explain", "spp.spec.ipvs")
    assert "KIND:       ServiceProxyPolicy" in text
    assert "scheduler\t<string>" in text or "scheduler <string>" in " ".join(text.split())
    assert "Stateful schedulers" in " ".join(text.split())
    assert "schedulerFlags" in text
    short = crds.kubectl("explain", "pvs.spec.virtualServers.realServers.weight")
    assert "drains" in short


def _program(address: str, address_type: str, port: int) -> dict[str, Any]:
    vs = {"address": address, "addressType": address_type, "port": port, "mode": "iptables"}
    return {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ProxyVirtualServer",
        "metadata": {"name": "np"},
        "spec": {"service": {"name": "np"}, "policy": {"name": "p"}, "mode": "iptables",
                 "virtualServers": [vs]},
    }


def test_node_port_address_goes_with_its_address_type_only(crds: Lab, namespace: str) -> None:
    """The CEL rule on a program's virtual servers: 0.0.0.0 / :: mean a node port and
    nothing else (agents read them so)."""
    for address, kind in (("0.0.0.0", "ClusterIP"), ("10.96.0.10", "NodePort"), ("::", "ExternalIP")):
        result = _apply(crds, namespace, _program(address, kind, 30080))
        assert result.returncode != 0, (address, kind)
        assert "goes with addressType NodePort, and only with it" in result.stderr, result.stderr
        assert "spec.virtualServers[0].address" in result.stderr, result.stderr
    ok = _apply(crds, namespace, _program("0.0.0.0", "NodePort", 30080))
    assert ok.returncode == 0, ok.stderr
    stored = json.loads(crds.kubectl("get", "pvs", "np", "-n", namespace, "-o", "json"))
    assert stored["spec"]["virtualServers"][0]["addressType"] == "NodePort"


def test_source_ranges_are_cidrs_on_load_balancer_ips_only(crds: Lab, namespace: str) -> None:
    """The schema's ``format: cidr`` and the CEL rule tying loadBalancerSourceRanges to
    addressType LoadBalancerIP, as the real API server applies them."""
    def program(kind: str, ranges: list[str]) -> dict[str, Any]:
        obj = _program("198.51.100.3", kind, 80)
        obj["metadata"]["name"] = "lbsrc"
        obj["spec"]["virtualServers"][0]["loadBalancerSourceRanges"] = ranges
        return obj

    not_cidr = _apply(crds, namespace, program("LoadBalancerIP", ["203.0.113.0/24", "a.b.c.d/8"]))
    assert not_cidr.returncode != 0 and "loadBalancerSourceRanges[1]" in not_cidr.stderr, not_cidr.stderr
    assert "cidr" in not_cidr.stderr, not_cidr.stderr
    elsewhere = _apply(crds, namespace, program("ExternalIP", ["203.0.113.0/24"]))
    assert elsewhere.returncode != 0, elsewhere.stderr
    assert "goes with addressType LoadBalancerIP only" in elsewhere.stderr, elsewhere.stderr
    ok = _apply(crds, namespace, program("LoadBalancerIP", ["203.0.113.0/24", "2001:db8::/32"]))
    assert ok.returncode == 0, ok.stderr
    stored = json.loads(crds.kubectl("get", "pvs", "lbsrc", "-n", namespace, "-o", "json"))
    ranges = stored["spec"]["virtualServers"][0]["loadBalancerSourceRanges"]
    assert ranges == ["203.0.113.0/24", "2001:db8::/32"]
