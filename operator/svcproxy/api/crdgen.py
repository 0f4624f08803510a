"""Generate the CustomResourceDefinitions from the pydantic models.

``svcproxy crds --output-dir DIR`` writes one YAML file per kind. The models
are the single source: their JSON schema is rewritten into a structural
OpenAPI v3 schema (``$ref`` inlined, optional fields un-nulled, titles
dropped), and each model's ``cel_rules`` become ``x-kubernetes-validations``.
Called by the CLI, ``make crds`` and the test that fails when ``crds/`` is stale.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from svcproxy.api.clusterpolicy import ClusterServiceProxyPolicySpec, ClusterServiceProxyPolicyStatus
from svcproxy.api.common import GROUP, VERSION, ApiModel
from svcproxy.api.node import ProxyNodeSpec, ProxyNodeStatus
from svcproxy.api.policy import ServiceProxyPolicySpec, ServiceProxyPolicyStatus
from svcproxy.api.program import ProxyVirtualServerSpec

Schema = dict[str, Any]


@dataclass(frozen=True)
class Kind:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: str
    description: str
    spec: type[BaseModel]
    status: type[BaseModel] | None
    columns: tuple[dict[str, str], ...]


def _col(name: str, path: str, typ: str = "string", description: str = "") -> dict[str, str]:
    out = {"name": name, "type": typ, "jsonPath": path}
    if description:
        out["description"] = description
    return out


_AGE = _col("Age", ".metadata.creationTimestamp", "date")

KINDS: tuple[Kind, ...] = (
    Kind(
        kind="ServiceProxyPolicy",
        plural="serviceproxypolicies",
        singular="serviceproxypolicy",
        short_names=("spp",),
        scope="Namespaced",
        description=(
            "ServiceProxyPolicy chooses how the selected Services are proxied on every node: "
            "mode (ipvs, iptables, userspace), IPVS scheduler and session affinity."
        ),
        spec=ServiceProxyPolicySpec,
        status=ServiceProxyPolicyStatus,
        columns=(
            _col("Mode", ".spec.mode"),
            _col("Scheduler", ".spec.ipvs.scheduler"),
            _col("Affinity", ".spec.sessionAffinity.type"),
            _col("Programmed", ".status.programmed", description="nodes programmed / nodes"),
            _AGE,
        ),
    ),
    Kind(
        kind="ClusterServiceProxyPolicy",
        plural="clusterserviceproxypolicies",
        singular="clusterserviceproxypolicy",
        short_names=("cspp",),
        scope="Cluster",
        description=(
            "ClusterServiceProxyPolicy is the cluster-wide default: it chooses how the Services of "
            "the selected namespaces are proxied unless a ServiceProxyPolicy in their namespace "
            "selects them."
        ),
        spec=ClusterServiceProxyPolicySpec,
        status=ClusterServiceProxyPolicyStatus,
        columns=(
            _col("Mode", ".spec.mode"),
            _col("Scheduler", ".spec.ipvs.scheduler"),
            _col("Affinity", ".spec.sessionAffinity.type"),
            _col("Services", ".status.summary.selected", "integer", description="Services selected"),
            _col("Programmed", ".status.programmed", description="nodes programmed / nodes"),
            _AGE,
        ),
    ),
    Kind(
        kind="ProxyVirtualServer",
        plural="proxyvirtualservers",
        singular="proxyvirtualserver",
        short_names=("pvs",),
        scope="Namespaced",
        description=(
            "ProxyVirtualServer is the compiled proxy program of one Service (same name and "
            "namespace), written only by the svcproxy operator and read by every node agent."
        ),
        spec=ProxyVirtualServerSpec,
        status=None,
        columns=(
            _col("VIPs", ".spec.summary.vips"),
            _col("Mode", ".spec.mode"),
            _col("Scheduler", ".spec.scheduler"),
            _col("Endpoints", ".spec.summary.endpoints", description="ready / listed"),
            _AGE,
        ),
    ),
    Kind(
        kind="ProxyNode",
        plural="proxynodes",
        singular="proxynode",
        short_names=("pn",),
        scope="Cluster",
        description=(
            "ProxyNode is one node's svcproxy report (capabilities, modes in effect, applied "
            "programs, errors), written only by the agent on that node."
        ),
        spec=ProxyNodeSpec,
        status=ProxyNodeStatus,
        columns=(
            _col("IPVS", ".status.capabilities.ipvs", "boolean"),
            _col("Modes", ".status.modesSummary"),
            _col("Services", ".status.counts.services", "integer"),
            _col("Last-Sync", ".status.lastSyncTime", "date"),
        ),
    ),
)


def _structural(node: Any, defs: dict[str, Schema]) -> Any:
    """Rewrite pydantic's JSON schema into a structural Kubernetes schema."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}
        return _structural(merged, defs)
    if "anyOf" in node:
        # Optional[X] is anyOf [X, null]: the field is simply optional in Kubernetes.
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        if node.get("default") is None:
            node.pop("default", None)
        return _structural({**options[0], **node}, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    node.pop("title", None)
    # Kubernetes prunes unknown fields itself and forbids these beside properties.
    node.pop("propertyNames", None)
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")
    if isinstance(node.get("description"), str):
        node["description"] = " ".join(node["description"].split())
    if node.get("uniqueItems"):
        node.pop("uniqueItems")
        node.setdefault("x-kubernetes-list-type", "set")
    out: Schema = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    if "properties" in out:
        out.setdefault("type", "object")
    return out


def _attach_rules(schema: Schema, model: type[BaseModel]) -> None:
    """Walk the model tree beside the schema and add each model's CEL rules."""
    if issubclass(model, ApiModel) and model.cel_rules:
        schema["x-kubernetes-validations"] = [r.schema() for r in model.cel_rules]
    props = schema.get("properties", {})
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias not in props:
            continue
        for sub in _models_in(field.annotation):
            target = props[alias]
            if target.get("type") == "array":
                target = target["items"]
            _attach_rules(target, sub)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def model_schema(model: type[BaseModel]) -> Schema:
    """The structural schema of one model, with its CEL rules."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema: Schema = _structural(raw, defs)
    _attach_rules(schema, model)
    return schema


def crd(kind: Kind) -> dict[str, Any]:
    properties: Schema = {
        "apiVersion": {"type": "string", "description": "API version of this object."},
        "kind": {"type": "string", "description": "Kind of this object."},
        "metadata": {"type": "object"},
        "spec": model_schema(kind.spec),
    }
    version: dict[str, Any] = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "additionalPrinterColumns": list(kind.columns),
    }
    if kind.status is not None:
        properties["status"] = model_schema(kind.status)
        version["subresources"] = {"status": {}}
    required = ["spec"] if kind.kind in ("ServiceProxyPolicy", "ClusterServiceProxyPolicy") else []
    top: Schema = {"type": "object", "description": kind.description, "properties": properties}
    if required:
        top["required"] = required
    version["schema"] = {"openAPIV3Schema": top}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind.kind,
                "listKind": f"{kind.kind}List",
                "plural": kind.plural,
                "singular": kind.singular,
                "shortNames": list(kind.short_names),
                "categories": ["svcproxy"],
            },
            "scope": kind.scope,
            "versions": [version],
        },
    }


def render() -> dict[str, str]:
    """File name -> YAML text, for every kind."""
    header = "# Generated by `svcproxy crds` from operator/svcproxy/api; do not edit.\n"
    return {
        f"{GROUP}_{k.plural}.yaml": header + yaml.safe_dump(crd(k), sort_keys=False, width=100) for k in KINDS
    }


def write(output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = output_dir / name
        path.write_text(text)
        written.append(path)
    return written


def stale(output_dir: Path) -> list[str]:
    """Names of files in ``output_dir`` that differ from what the models generate."""
    return [
        name
        for name, text in render().items()
        if not (output_dir / name).is_file() or (output_dir / name).read_text() != text
    ]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", type=Path, default=Path("crds"), help="folder for the YAML")
    parser.add_argument("--check", action="store_true", help="exit 1 if the folder is stale")


def run(args: argparse.Namespace) -> int:
    if args.check:
        bad = stale(args.output_dir)
        if bad:
            print(f"stale CRDs in {args.output_dir}: {', '.join(bad)}; run `make crds`", file=sys.stderr)
            return 1
        return 0
    for path in write(args.output_dir):
        print(path)
    return 0
