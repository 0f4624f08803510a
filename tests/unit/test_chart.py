"""The Helm chart (charts/svcproxy): lint, CRDs in step, version, values schema, rendered policy.

Renders the chart with the lab toolchain's helm (no cluster) and checks what a cluster
operator relies on: ``helm lint --strict`` is clean, the chart's CRDs are the checked-in
ones, its version follows pyproject.toml, bad values are refused by values.schema.json
with a message naming the key, and the rendered workloads carry the security settings
and RBAC the docs promise. kubeconform validation is in test_chart_kubeconform.py.
"""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_chart_kubeconform import CHART, ROOT, documents, helm_template, toolchain_bin

JSON = dict[str, Any]


@pytest.fixture(scope="module")
def helm() -> Path:
    return toolchain_bin() / "helm"


@pytest.fixture(scope="module")
def rendered(helm: Path) -> dict[tuple[str, str], JSON]:
    out = helm_template(helm)
    assert out.returncode == 0, out.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in documents(out.stdout)}


def test_helm_lint_strict_is_clean(helm: Path) -> None:
    out = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_chart_crds_are_the_checked_in_crds() -> None:
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    source = {p.name: p.read_bytes() for p in (ROOT / "crds").glob("*.yaml")}
    # `make crds` writes the generated CRDs to both folders; crds/kopf-peering.yaml is written
    # by hand and copied.
    fix = "run `make crds` and `cp crds/kopf-peering.yaml charts/svcproxy/crds/`"
    assert sorted(chart) == sorted(source), f"charts/svcproxy/crds differs from crds/: {fix}"
    stale = [name for name in source if chart[name] != source[name]]
    assert not stale, f"charts/svcproxy/crds/{stale} differ from crds/: {fix}"


def test_chart_version_is_the_project_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == project and chart["appVersion"] == project, (
        f"Chart.yaml version {chart['version']} / appVersion {chart['appVersion']} must equal "
        f"pyproject.toml's {project}")


BAD_VALUES = [
    (["--set", "operator.replicas=two"], "at '/operator/replicas': got string, want integer"),
    (["--set", "operator.replica=2"], "at '/operator': additional properties 'replica' not allowed"),
    (["--set", "agent.modes={ipvs,bogus}"], "at '/agent/modes/1': value must be one of"),
    (["--set", "agent.tolerations[0].operator=Maybe"], "at '/agent/tolerations/0/operator'"),
    (["--set", "metrics.serviceMonitor.interval=often"], "at '/metrics/serviceMonitor/interval'"),
    (["--set", "agent.image.tag=x"], "at '/agent/image': additional properties 'tag' not allowed"),
    (["--set", "unknownTop=1"], "additional properties 'unknownTop' not allowed"),
    (["--set", "operator.metricsPort=70000"], "at '/operator/metricsPort': maximum"),
    (["--set-string", "operator.podDisruptionBudget.enabled=yes"],
     "at '/operator/podDisruptionBudget/enabled': got string, want boolean"),
    (["--set", "operator.resources.requests.cpu=lots"], "at '/operator/resources/requests/cpu'"),
    (["--set", "agent.clusterCIDRs[0]=everywhere"], "at '/agent/clusterCIDRs/0'"),
    (["--set", "agent.extraPodCIDRs[0]=calico"], "at '/agent/extraPodCIDRs/0'"),
    (["--set-string", "operator.programRestriction.enabled=no"],
     "at '/operator/programRestriction/enabled': got string, want boolean"),
    (["--set", "operator.programRestriction.writers=x"],
     "at '/operator/programRestriction': additional properties 'writers' not allowed"),
]


@pytest.mark.parametrize(("args", "names"), BAD_VALUES, ids=[" ".join(a[1:]) for a, _ in BAD_VALUES])
def test_bad_values_are_refused_by_the_schema(helm: Path, args: list[str], names: str) -> None:
    out = helm_template(helm, *args)
    assert out.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert names in out.stderr, out.stderr


def test_service_monitor_without_metrics_services_is_refused(helm: Path) -> None:
    out = helm_template(helm, "--set", "metrics.serviceMonitor.enabled=true",
                        "--set", "metrics.service.enabled=false")
    assert out.returncode != 0 and "metrics.service.enabled" in out.stderr, out.stderr


def test_operator_runs_hardened_with_peering_and_a_pdb(rendered: dict[tuple[str, str], JSON]) -> None:
    dep = rendered[("Deployment", "svcproxy-operator")]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (c,) = pod["containers"]
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}}
    assert "--peering=svcproxy" in c["args"] and "--priority" in c["command"][2]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["readinessProbe"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    pdb = rendered[("PodDisruptionBudget", "svcproxy-operator")]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_agent_has_only_the_capabilities_it_needs(rendered: dict[tuple[str, str], JSON]) -> None:
    ds = rendered[("DaemonSet", "svcproxy-agent")]
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW", "SYS_MODULE"]}
    assert sc["readOnlyRootFilesystem"] is True and "privileged" not in sc
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in c["env"]
    assert "--node-name=$(NODE_NAME)" in c["args"]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["lib-modules"]["readOnly"] is True


def test_extra_pod_cidrs_reach_the_agent(helm: Path) -> None:
    out = helm_template(helm, "--set", "agent.extraPodCIDRs={192.168.0.0/16,fd00:99::/48}")
    assert out.returncode == 0, out.stderr
    ds = next(d for d in documents(out.stdout) if d["kind"] == "DaemonSet")
    args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--extra-pod-cidr")] == [
        "--extra-pod-cidr=192.168.0.0/16", "--extra-pod-cidr=fd00:99::/48"]


def test_the_node_port_range_reaches_the_agent(helm: Path) -> None:
    for sets, want in (((), "--node-port-range=30000-32767"),
                       (("--set", "agent.nodePortRange=20000-22767"), "--node-port-range=20000-22767")):
        out = helm_template(helm, *sets)
        assert out.returncode == 0, out.stderr
        ds = next(d for d in documents(out.stdout) if d["kind"] == "DaemonSet")
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--node-port-range")] == [want]
    bad = helm_template(helm, "--set", "agent.nodePortRange=lots")
    assert bad.returncode != 0 and "nodePortRange" in bad.stderr


def test_rbac_grants_the_agent_nothing_but_programs_proxynodes_and_reads_for_checks(
        rendered: dict[tuple[str, str], JSON]) -> None:
    role = rendered[("ClusterRole", "svcproxy-agent")]
    grants = {(r["apiGroups"][0], res, v)
              for r in role["rules"] for res in r["resources"] for v in r["verbs"]}
    read = ("get", "list", "watch")
    assert grants == {
        *(("svcproxy.io", "proxyvirtualservers", v) for v in read),
        # Services and Nodes: what programs are checked against (agent/trust.py).
        *(("", res, v) for res in ("services", "nodes") for v in read),
        # Its own ProxyNode, watched so that it comes back when deleted.
        *(("svcproxy.io", "proxynodes", v) for v in (*read, "create", "patch")),
        ("svcproxy.io", "proxynodes/status", "get"), ("svcproxy.io", "proxynodes/status", "patch"),
    }
    op = rendered[("ClusterRole", "svcproxy-operator")]
    for rule in op["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert "secrets" not in rule["resources"], rule


def test_operator_may_watch_cluster_policies_and_namespaces_and_write_their_status(
    rendered: dict[tuple[str, str], JSON],
) -> None:
    op = rendered[("ClusterRole", "svcproxy-operator")]
    grants = {(r["apiGroups"][0], res, v) for r in op["rules"] for res in r["resources"] for v in r["verbs"]}
    needed = {
        ("svcproxy.io", "clusterserviceproxypolicies", verb) for verb in ("get", "list", "watch", "patch")
    } | {("svcproxy.io", "clusterserviceproxypolicies/status", verb) for verb in ("get", "patch")}
    needed |= {("", "namespaces", verb) for verb in ("get", "list", "watch")}
    assert needed <= grants, needed - grants
    # Namespaces are only read: the operator never creates, labels or deletes one.
    assert {v for g, res, v in grants if res == "namespaces"} == {"get", "list", "watch"}


def test_admission_policy_names_the_agent_account(rendered: dict[tuple[str, str], JSON]) -> None:
    vap = rendered[("ValidatingAdmissionPolicy", "svcproxy-agent-own-proxynode")]
    (cond,) = vap["spec"]["matchConditions"]
    assert "system:serviceaccount:svcproxy-system:svcproxy-agent" in cond["expression"]
    binding = rendered[("ValidatingAdmissionPolicyBinding", "svcproxy-agent-own-proxynode")]
    assert binding["spec"] == {"policyName": "svcproxy-agent-own-proxynode", "validationActions": ["Deny"]}


PROGRAMS = "svcproxy-operator-writes-programs"


def _by_key(text: str) -> dict[tuple[str, str], JSON]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents(text)}


def test_program_policy_lets_only_the_operator_create_or_update(
        rendered: dict[tuple[str, str], JSON]) -> None:
    vap = rendered[("ValidatingAdmissionPolicy", PROGRAMS)]
    spec = vap["spec"]
    assert spec["failurePolicy"] == "Fail"
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == ["svcproxy.io"]
    # Deletes stay allowed (admins, the garbage collector): DELETE is not matched.
    assert sorted(rule["operations"]) == ["CREATE", "UPDATE"]
    assert "proxyvirtualservers" in rule["resources"]
    # Every subresource the CRD serves is matched too (a status subresource would be a write path).
    crd = yaml.safe_load((CHART / "crds" / "svcproxy.io_proxyvirtualservers.yaml").read_text())
    for version in crd["spec"]["versions"]:
        for sub in version.get("subresources") or {}:
            assert {f"proxyvirtualservers/{sub}", "proxyvirtualservers/*"} & set(rule["resources"]), sub
    (cond,) = spec["matchConditions"]
    assert cond["expression"] == (
        'request.userInfo.username != "system:serviceaccount:svcproxy-system:svcproxy-operator"')
    (check,) = spec["validations"]
    assert check["reason"] == "Forbidden"
    # An empty subResource is absent from CEL's request, not "": comparing it fails the
    # expression (the API server then refuses the garbage collector's updates).
    for key in ("expression", "messageExpression"):
        assert "request.subResource ==" not in check[key] and "request.subResource !=" not in check[key]
    # The refusal names the one account that may write programs.
    for key in ("message", "messageExpression"):
        assert "system:serviceaccount:svcproxy-system:svcproxy-operator" in check[key], key
    binding = rendered[("ValidatingAdmissionPolicyBinding", PROGRAMS)]
    assert binding["spec"] == {"policyName": PROGRAMS, "validationActions": ["Deny"]}


@pytest.mark.parametrize(("args", "user"), [
    ([], "system:serviceaccount:net-proxy:edge-svcproxy-operator"),
    (["--set", "operator.serviceAccount.name=ops"], "system:serviceaccount:net-proxy:ops"),
    (["--set", "operator.serviceAccount.create=false", "--set", "operator.serviceAccount.name=shared"],
     "system:serviceaccount:net-proxy:shared"),
    (["--set", "fullnameOverride=px"], "system:serviceaccount:net-proxy:px-operator"),
], ids=["default-names", "named-account", "existing-account", "fullname-override"])
def test_program_policy_names_the_releases_operator_account(helm: Path, args: list[str], user: str) -> None:
    out = helm_template(helm, *args, release="edge", namespace="net-proxy")
    assert out.returncode == 0, out.stderr
    docs = _by_key(out.stdout)
    prefix = "px" if "fullnameOverride=px" in args else "edge-svcproxy"
    name = f"{prefix}-operator-writes-programs"
    vap = docs[("ValidatingAdmissionPolicy", name)]
    (cond,) = vap["spec"]["matchConditions"]
    assert cond["expression"] == f'request.userInfo.username != "{user}"'
    assert user in vap["spec"]["validations"][0]["messageExpression"]
    # The account the policy admits is the one the operator Deployment runs as.
    dep = docs[("Deployment", f"{prefix}-operator")]
    assert user.rsplit(":", 1)[1] == dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert docs[("ValidatingAdmissionPolicyBinding", name)]["spec"]["policyName"] == name
    assert vap["metadata"]["labels"]["app.kubernetes.io/instance"] == "edge"


def test_program_policy_can_be_turned_off(helm: Path) -> None:
    out = helm_template(helm, "--set", "operator.programRestriction.enabled=false")
    assert out.returncode == 0, out.stderr
    docs = _by_key(out.stdout)
    assert ("ValidatingAdmissionPolicy", PROGRAMS) not in docs
    assert ("ValidatingAdmissionPolicyBinding", PROGRAMS) not in docs
    # The agents' ProxyNode policy is a separate switch and stays.
    assert ("ValidatingAdmissionPolicy", "svcproxy-agent-own-proxynode") in docs
    out = helm_template(helm, "--set", "agent.nodeRestriction.enabled=false")
    assert ("ValidatingAdmissionPolicy", PROGRAMS) in _by_key(out.stdout)
