"""kubeconform (strict) validates ``helm template`` of the chart, offline.

kubeconform normally downloads Kubernetes JSON schemas from the internet; here it
reads schema files this module writes from two offline sources:

* the project's own CRDs (``crds/``): each served version's openAPIV3Schema;
* the built-in kinds from the OpenAPI v3 documents of the pinned Kubernetes release
  (``api/openapi-spec/v3`` of the ``k8s.io/kubernetes`` Go module the lab toolchain was
  built from: the same documents kube-apiserver serves at ``/openapi/v3``). The e2e
  test (tests/e2e/test_chart_lab.py) feeds the live lab API server's ``/openapi/v3`` through
  the same conversion.

Strictness is baked into the files (``additionalProperties: false`` on every object
with declared properties that does not preserve unknown fields), as kubeconform's
published ``-strict`` schema sets do. The helpers are imported by the e2e test too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "svcproxy"
K8S_VERSION = "1.36.3"
JSON = dict[str, Any]


# --- helpers (also used by tests/e2e/test_chart_lab.py) -------------------------------------


def toolchain_bin() -> Path:
    out = subprocess.run(["bash", str(ROOT / "lab/svcproxy_lab/toolchain/build.sh")],
                         capture_output=True, text=True, timeout=7200, check=False)
    if out.returncode != 0:
        pytest.skip(f"the lab toolchain (helm, kubeconform) is not built: {out.stderr.strip()[-300:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def helm_template(helm: Path, *args: str, namespace: str = "svcproxy-system",
                  release: str = "svcproxy") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", release, str(CHART), "--namespace", namespace,
         "--kube-version", K8S_VERSION, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def documents(text: str) -> list[JSON]:
    return [d for d in yaml.safe_load_all(text) if d]


def strict(schema: Any) -> Any:
    """A copy with additionalProperties: false wherever an object declares its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def schema_path(root: Path, api_version: str, kind: str) -> Path:
    """Where kubeconform looks with ``location_template(root)`` (see its registry.schemaPath)."""
    parts = api_version.split("/")
    return root / parts[0] / parts[-1] / f"{kind.lower()}.json"


def location_template(root: Path) -> str:
    return f"{root}/{{{{ .Group }}}}/{{{{ .ResourceAPIVersion }}}}/{{{{ .ResourceKind }}}}.json"


def write_crd_schemas(crd_docs: Iterable[JSON], root: Path) -> list[str]:
    written = []
    for crd in crd_docs:
        spec = crd["spec"]
        for version in spec["versions"]:
            api_version = f"{spec['group']}/{version['name']}"
            schema = strict(version["schema"]["openAPIV3Schema"])
            path = schema_path(root, api_version, spec["names"]["kind"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema))
            written.append(f"{api_version}/{spec['names']['kind']}")
    return written


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.add(ref.rsplit("/", 1)[1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def _standalone(schemas: JSON, name: str) -> JSON:
    """One kind's schema with every definition it reaches, refs rewritten to #/definitions."""
    keep: set[str] = set()
    todo = [name]
    while todo:
        cur = todo.pop()
        if cur in keep:
            continue
        keep.add(cur)
        found: set[str] = set()
        _refs(schemas[cur], found)
        todo += sorted(found - keep)
    text = json.dumps({"definitions": {k: schemas[k] for k in sorted(keep)}})
    text = text.replace('"#/components/schemas/', '"#/definitions/')
    doc = strict(json.loads(text))
    doc["$ref"] = f"#/definitions/{name}"
    return dict(doc)


def write_builtin_schemas(openapi_docs: Iterable[JSON], root: Path,
                          wanted: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Schema files for the ``wanted`` (apiVersion, kind) pairs found in OpenAPI v3 documents."""
    done: set[tuple[str, str]] = set()
    for doc in openapi_docs:
        schemas = (doc.get("components") or {}).get("schemas") or {}
        for name, schema in schemas.items():
            for gvk in schema.get("x-kubernetes-group-version-kind") or []:
                api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
                key = (api_version, gvk["kind"])
                if key not in wanted or key in done:
                    continue
                path = schema_path(root, api_version, gvk["kind"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(_standalone(schemas, name)))
                done.add(key)
    return done


def kubeconform(binary: Path, schema_root: Path, manifests: str,
                *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), "-strict", "-summary", "-output", "text",
         "-schema-location", location_template(schema_root), *extra, "-"],
        input=manifests, capture_output=True, text=True, timeout=120, check=False,
    )


def kinds_of(docs: Iterable[JSON]) -> set[tuple[str, str]]:
    return {(d["apiVersion"], d["kind"]) for d in docs}


def crd_documents() -> list[JSON]:
    out: list[JSON] = []
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        out += documents(path.read_text())
    return out


# --- offline source of the built-in schemas -----------------------------------------------------


def _module_cache() -> Path:
    try:
        out = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True,
                             timeout=30, check=False).stdout.strip()
    except OSError:
        out = ""
    return Path(out or os.path.expanduser("~/go/pkg/mod"))


def pinned_openapi_docs() -> list[JSON]:
    spec_dir = _module_cache() / f"k8s.io/kubernetes@v{K8S_VERSION}" / "api/openapi-spec/v3"
    if not spec_dir.is_dir():
        pytest.skip(f"no Kubernetes v{K8S_VERSION} OpenAPI documents at {spec_dir} (the Go module cache of "
                    "the toolchain build); tests/e2e/test_chart_lab.py validates against the live API "
                    "server")
    return [json.loads(p.read_text()) for p in sorted(spec_dir.glob("*.json"))]


@pytest.fixture(scope="module")
def tools() -> Path:
    return toolchain_bin()


@pytest.fixture(scope="module")
def schema_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("schemas")
    write_crd_schemas(crd_documents(), root)
    return root


VARIANTS = {
    "defaults": [],
    "defaults-with-crds": ["--include-crds"],
    "single-replica-no-extras": ["--set", "operator.replicas=1", "--set", "agent.sysctlInit.enabled=false",
                                 "--set", "agent.nodeRestriction.enabled=false",
                                 "--set", "metrics.service.enabled=false"],
    "custom": ["--set", "image.tag=dev", "--set", "operator.verbose=true",
               "--set", "agent.modes={iptables}", "--set", "agent.masqueradeAll=true",
               "--set", "operator.serviceAccount.name=ops", "--set", "fullnameOverride=sp",
               "--set", "imagePullSecrets[0].name=regcred", "--set", "commonLabels.team=net",
               "--set", "operator.nodeSelector.role=infra"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_passes_kubeconform_strict(tools: Path, schema_root: Path, variant: str) -> None:
    out = helm_template(tools / "helm", *VARIANTS[variant])
    assert out.returncode == 0, out.stderr
    docs = documents(out.stdout)
    wanted = kinds_of(docs)
    found = write_builtin_schemas(pinned_openapi_docs(), schema_root, wanted)
    assert wanted - found == set(), f"no built-in schema for {wanted - found}"
    res = kubeconform(tools / "kubeconform", schema_root, out.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Valid: {len(docs)}" in res.stdout, res.stdout


def test_service_monitor_variant_renders_and_the_rest_validates(tools: Path, schema_root: Path) -> None:
    # No ServiceMonitor schema is available offline (a Prometheus Operator CRD): it is skipped
    # by name, every other object is still validated strictly.
    out = helm_template(tools / "helm", "--set", "metrics.serviceMonitor.enabled=true")
    assert out.returncode == 0, out.stderr
    docs = documents(out.stdout)
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert len(monitors) == 2 and {m["spec"]["endpoints"][0]["port"] for m in monitors} == {"metrics"}
    write_builtin_schemas(pinned_openapi_docs(), schema_root, kinds_of(docs))
    res = kubeconform(tools / "kubeconform", schema_root, out.stdout, "-skip", "ServiceMonitor")
    assert res.returncode == 0, res.stdout + res.stderr


def test_crds_and_examples_validate_against_their_own_schemas(tools: Path, schema_root: Path) -> None:
    """The CR schema files are real: a good policy passes, a misspelt field fails."""
    good = {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"serviceSelector": {"matchLabels": {"app": "web"}}, "mode": "ipvs",
                     "ipvs": {"scheduler": "rr"}}}
    res = kubeconform(tools / "kubeconform", schema_root, yaml.safe_dump(good))
    assert res.returncode == 0, res.stdout + res.stderr
    bad = json.loads(json.dumps(good))
    bad["spec"]["mdoe"] = "ipvs"
    res = kubeconform(tools / "kubeconform", schema_root, yaml.safe_dump(bad))
    assert res.returncode != 0 and "mdoe" in res.stdout, res.stdout


def test_builtin_schemas_catch_a_misspelt_field(tools: Path, schema_root: Path) -> None:
    """Strict built-in schemas: the validation above is not vacuous."""
    out = helm_template(tools / "helm")
    docs = documents(out.stdout)
    write_builtin_schemas(pinned_openapi_docs(), schema_root, kinds_of(docs))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    res = kubeconform(tools / "kubeconform", schema_root, yaml.safe_dump(dep))
    assert res.returncode != 0 and re.search(r"readOnlyRootFileSystem", res.stdout), res.stdout
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["replicas"] = "two"
    res = kubeconform(tools / "kubeconform", schema_root, yaml.safe_dump(dep))
    assert res.returncode != 0, res.stdout
