"""The generated CRDs: fresh, structural, and carrying the rules and columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from svcproxy.api import crdgen

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crds_are_not_stale() -> None:
    stale = crdgen.stale(ROOT / "crds")
    assert not stale, f"crds/ is stale ({stale}): run `make crds`"


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        out += _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        out += _walk(schema["additionalProperties"], f"{path}{{}}")
    return out


FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "title", "const", "uniqueItems", "propertyNames", "nullable"}


def test_schemas_are_structural() -> None:
    for kind in crdgen.KINDS:
        schema = crdgen.crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            assert "type" in node, f"{kind.kind}{path} has no type"
            assert not FORBIDDEN & node.keys(), f"{kind.kind}{path} uses {FORBIDDEN & node.keys()}"
            assert not ("properties" in node and "additionalProperties" in node), path
            if node.get("x-kubernetes-list-type") == "set":
                assert node["items"]["type"] in ("string", "integer"), path
            if path.count(".") <= 2 and path and "metadata" not in path and path[-1] not in "]}":
                assert node.get("description"), f"{kind.kind}{path} has no description"


def test_policy_crd_has_cel_rules_columns_and_names() -> None:
    spp = crdgen.crd(crdgen.KINDS[0])
    version = spp["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "has(self.serviceSelector) != has(self.services)" in rules
    assert any("iptables" in r for r in rules)
    assert spec["properties"]["ipvs"]["x-kubernetes-validations"][0]["fieldPath"] == ".schedulerFlags"
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Mode",
        "Scheduler",
        "Affinity",
        "Programmed",
        "Age",
    ]
    assert spp["spec"]["names"]["shortNames"] == ["spp"]
    assert version["subresources"] == {"status": {}}
    assert spec["properties"]["mode"]["default"] == "ipvs"


def test_every_kind_in_group_and_category() -> None:
    names = {}
    for text in crdgen.render().values():
        doc = yaml.safe_load(text)
        names[doc["spec"]["names"]["kind"]] = doc
        assert doc["spec"]["group"] == "svcproxy.io"
        assert doc["spec"]["names"]["categories"] == ["svcproxy"]
    assert names["ProxyNode"]["spec"]["scope"] == "Cluster"
    assert names["ProxyVirtualServer"]["spec"]["names"]["shortNames"] == ["pvs"]
    assert [c["name"] for c in names["ProxyNode"]["spec"]["versions"][0]["additionalPrinterColumns"]] == [
        "IPVS",
        "Modes",
        "Services",
        "Last-Sync",
    ]
