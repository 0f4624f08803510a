"""Generated ServiceProxyPolicies and the oracle that says which the API server must refuse.

``policy_objects()`` draws whole objects: metadata.name edge cases, selectors with
every operator and bad values, ``services`` lists up to and beyond their limit,
unicode, every mode, scheduler, flag, weight and affinity, priority edges, wrong
types, nulls and unknown fields. A third are drawn "clean" (every field from its
valid domain, so only the cross-field CEL rules can refuse them), a third clean but for
one fault (so the verdict hangs on that fault alone), a third "noisy".

``predict(obj)`` is the differential oracle: the field paths the server must name
when it refuses ``obj``, from the pydantic models (whose ``CelRule`` checks twin the
CRD's CEL rules) plus the two things the models leave to the API server on purpose
(metadata.name and unknown top-level fields: ``ServiceProxyPolicy`` is lenient there
because it also parses what the server hands back). An empty set: the server must
accept it. ``refused_fields(body)`` reads the paths out of the server's Status.
Used by tests/e2e/test_policy_fuzz.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st
from pydantic import ValidationError

from svcproxy.api import common, policy
from svcproxy.api.common import ApiModel, CelRule
from svcproxy.api.policy import IPVS_SCHEDULERS, ServiceProxyPolicy

JSON = dict[str, Any]
MODES = ("ipvs", "iptables", "userspace")
FLAGS = ("sh-fallback", "sh-port")
OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec"}
# metadata.name of a custom resource: an RFC 1123 subdomain (what the API server checks).
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")

# No lone surrogates: JSON cannot carry them (the server would read U+FFFD instead).
_CHARS = st.characters(blacklist_categories=("Cs",))
_UNICODE = ("ünïcödé", "名前", "😀", "a\u0000b", "\u200b", "x\n", " ", "ǅ", "\u202eevil")


def text(max_size: int) -> st.SearchStrategy[str]:
    return st.one_of(st.text(_CHARS, max_size=max_size), st.sampled_from(_UNICODE))


def _mixed(
    clean: bool, valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``valid`` for a clean object; valid or invalid (half each) for a noisy one."""
    return valid if clean else st.one_of(valid, invalid)


WRONG_TYPES = st.sampled_from([1, "x", True, 1.5, [], {}, ["x"], {"a": 1}])


def integers(lo: int, hi: int, clean: bool) -> st.SearchStrategy[Any]:
    """Integers in [lo, hi] with both edges; noisy: just outside, huge, and wrongly typed."""
    valid = st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi]))
    invalid = st.one_of(
        st.sampled_from([lo - 1, hi + 1, 2**63, -(2**63) - 1, 2**64, str(lo), float(hi), lo + 0.5, True]),
        WRONG_TYPES,
    )
    return _mixed(clean, valid, invalid)


def names(clean: bool) -> st.SearchStrategy[Any]:
    valid = st.one_of(
        st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,12}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?){0,2}\Z"),
        st.sampled_from(["a" * 253, ("a" * 63 + ".") * 3 + "a" * 61, "0", "a-b.c-d", "x" * 63]),
    )
    invalid = st.one_of(
        st.sampled_from(["", "a" * 254, "-a", "a-", "A", "a_b", "a..b", ".a", "a.", "a b", "a/b", "a%b"]),
        text(20),
        WRONG_TYPES,
    )
    return _mixed(clean, valid, invalid)


def dns1035(clean: bool) -> st.SearchStrategy[Any]:
    """Service names: RFC 1035 labels (at most 63 characters)."""
    valid = st.one_of(st.from_regex(r"\A[a-z]([-a-z0-9]{0,10}[a-z0-9])?\Z"), st.just("s" * 63))
    invalid = st.one_of(
        st.sampled_from(["s" * 64, "", "Web", "1a", "a-", "a_b", "a.b", "abc\n", "ü"]), text(10), WRONG_TYPES
    )
    return _mixed(clean, valid, invalid)


def label_keys(clean: bool) -> st.SearchStrategy[Any]:
    valid = st.one_of(
        st.from_regex(r"\A[a-z][a-z0-9]{0,7}\Z"),
        st.sampled_from(["example.com/app", "k" * 317, "app.kubernetes.io/name"]),
        st.text(_CHARS, min_size=1, max_size=12),
    )
    return _mixed(clean, valid, st.sampled_from(["", "k" * 318]))


def label_values(clean: bool) -> st.SearchStrategy[Any]:
    valid = st.one_of(st.from_regex(r"\A[a-z0-9]{0,8}\Z"), st.just("v" * 63), text(12))
    invalid = st.one_of(st.just("v" * 64), st.text(_CHARS, min_size=64, max_size=70), WRONG_TYPES)
    return _mixed(clean, valid, invalid)


@st.composite
def requirements(draw: st.DrawFn, clean: bool) -> JSON:
    key = draw(label_keys(clean))
    op = draw(_mixed(clean, st.sampled_from(OPERATORS), st.sampled_from(["in", "Equals", "", 3])))
    req: JSON = {"key": key, "operator": op}
    with_values = op in ("In", "NotIn")
    if not clean and draw(st.booleans()):
        with_values = not with_values  # the CEL rule's both sides
    if with_values:
        many = draw(st.sampled_from([1, 2, 3, 64] if clean else [0, 1, 3, 64, 65]))
        req["values"] = draw(st.lists(label_values(clean), min_size=min(many, 3), max_size=min(many, 3)))
        req["values"] += ["v"] * (many - len(req["values"]))
    if not clean and draw(st.integers(0, 9)) == 0:
        del req[draw(st.sampled_from(["key", "operator"]))]
    return req


@st.composite
def selectors(draw: st.DrawFn, clean: bool) -> JSON:
    out: JSON = {}
    if draw(st.booleans()):
        size = draw(st.sampled_from([0, 1, 2, 3, 64] if clean else [1, 3, 64, 65]))
        labels = draw(st.dictionaries(label_keys(clean), label_values(clean), max_size=min(size, 3)))
        labels.update({f"k{i}": "v" for i in range(size - len(labels))})
        out["matchLabels"] = labels
    if draw(st.booleans()):
        exprs = draw(st.lists(requirements(clean), max_size=3))
        if draw(st.integers(0, 7)) == 0:
            exprs = exprs[:1] * (32 if clean or draw(st.booleans()) else 33)
        out["matchExpressions"] = exprs
    return out


@st.composite
def ipvs_specs(draw: st.DrawFn, clean: bool) -> JSON:
    out: JSON = {}
    if draw(st.booleans()):
        out["scheduler"] = draw(
            _mixed(clean, st.sampled_from(IPVS_SCHEDULERS), st.sampled_from(["RR", "fastest", "", "rr "]))
        )
    if draw(st.booleans()):
        flags = draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
        if not clean and draw(st.booleans()):
            flags = draw(st.sampled_from([[*FLAGS, "sh-port"], ["sh-port", "sh-port"], ["sh-random"]]))
        out["schedulerFlags"] = flags
    return out


@st.composite
def affinities(draw: st.DrawFn, clean: bool) -> JSON:
    out: JSON = {}
    if clean or draw(st.integers(0, 5)):
        out["type"] = draw(
            _mixed(clean, st.sampled_from(["None", "ClientIP"]), st.sampled_from(["clientip", ""]))
        )
    if draw(st.booleans()):
        out["timeoutSeconds"] = draw(integers(1, policy.MAX_AFFINITY_TIMEOUT, clean))
    return out


@st.composite
def weight_lists(draw: st.DrawFn, clean: bool) -> list[JSON]:
    def one() -> JSON:
        entry: JSON = {"podSelector": draw(selectors(clean))}
        if draw(st.booleans()):
            entry["weight"] = draw(integers(0, 65535, clean))
        if not clean and draw(st.integers(0, 9)) == 0:
            del entry["podSelector"]
        return entry

    count = draw(st.sampled_from([0, 1, 2, 3, 32] if clean else [1, 3, 33]))
    items = [one() for _ in range(min(count, 3))]
    return items + [{"podSelector": {}, "weight": 1}] * (count - len(items))


# Unknown fields, snake_case spellings of real ones among them (the wire is camelCase).
UNKNOWN = ["fooBar", "session_affinity", "service_selector", "scheduler_flags", "timeout_seconds", "Mode"]


@st.composite
def specs(draw: st.DrawFn, clean: bool) -> JSON:
    spec: JSON = {}
    target = draw(st.sampled_from(["selector", "selector", "services", "services", "both", "neither"]))
    if target in ("selector", "both"):
        spec["serviceSelector"] = draw(selectors(clean))
    if target in ("services", "both"):
        size = draw(st.sampled_from([0, 1, 2, 5, 256] if clean else [1, 5, 257]))
        spec["services"] = draw(st.lists(dns1035(clean), max_size=min(size, 5), unique_by=json.dumps))
        spec["services"] += [f"z{i}-pad" for i in range(size - len(spec["services"]))]
        if not clean and spec["services"] and draw(st.booleans()):
            spec["services"].append(spec["services"][0])  # a set: duplicates are refused
    if draw(st.integers(0, 3)):
        spec["mode"] = draw(_mixed(clean, st.sampled_from(MODES), st.sampled_from(["IPVS", "ebpf", ""])))
    if draw(st.booleans()):
        spec["ipvs"] = draw(ipvs_specs(clean))
    if draw(st.booleans()):
        spec["sessionAffinity"] = draw(affinities(clean))
    if draw(st.booleans()):
        spec["weights"] = draw(weight_lists(clean))
    if draw(st.booleans()):
        spec["priority"] = draw(integers(-1000000, 1000000, clean))
    if not clean:
        _noise(draw, spec)
    return spec


def _noise(draw: st.DrawFn, spec: JSON) -> None:
    """One fault: a wrongly typed, null, unknown or duplicated field, a number spelled
    otherwise, an empty label key; or nothing."""
    kind = draw(st.sampled_from(["type", "null", "unknown", "number", "duplicate", "label-key", "none"]))
    fields = sorted(spec) or ["mode"]
    inner = [spec] + [v for v in spec.values() if isinstance(v, dict)]
    if kind == "type":
        spec[draw(st.sampled_from(fields))] = draw(WRONG_TYPES)
    elif kind == "null":
        # The server prunes a null field without nullable: the same as leaving it out.
        draw(st.sampled_from(inner))[
            draw(st.sampled_from(["mode", "ipvs", "priority", "scheduler", "type"]))
        ] = None
    elif kind == "unknown":
        draw(st.sampled_from(inner))[draw(st.sampled_from(UNKNOWN))] = "x"
    elif kind == "number":
        value = draw(st.sampled_from(["5", True, 5.0, 5.5, "0x10"]))
        where = draw(st.sampled_from(["priority", "timeoutSeconds", "weight"]))
        if where == "priority":
            spec["priority"] = value
        elif where == "timeoutSeconds":
            spec["sessionAffinity"] = {"type": "ClientIP", "timeoutSeconds": value}
        else:
            spec["mode"], spec["ipvs"] = "ipvs", {"scheduler": "wrr"}
            spec["weights"] = [{"podSelector": {}, "weight": value}]
    elif kind == "duplicate":
        if draw(st.booleans()):
            spec["mode"], spec["ipvs"] = "ipvs", {"scheduler": "sh", "schedulerFlags": ["sh-port", "sh-port"]}
        else:
            spec.pop("serviceSelector", None)
            spec["services"] = ["web", "db", "web"]
    elif kind == "label-key":
        spec.pop("services", None)
        spec["serviceSelector"] = {"matchLabels": {draw(st.sampled_from(["", "k" * 318])): "x"}}


@st.composite
def policy_objects(draw: st.DrawFn) -> JSON:
    """A whole object: clean, clean but for one fault, or noisy (a third each)."""
    flavour = draw(st.sampled_from(["clean", "one-fault", "noisy"]))
    clean = flavour != "noisy"
    spec = draw(specs(clean))
    if flavour == "one-fault":
        _noise(draw, spec)
    obj: JSON = {
        "apiVersion": common.API_VERSION,
        "kind": "ServiceProxyPolicy",
        "metadata": {"name": draw(names(clean))},
        "spec": spec,
    }
    if not clean and draw(st.integers(0, 7)) == 0:
        obj[draw(st.sampled_from(["extra", "Spec", "specs"]))] = {}
    return obj


# -- the oracle ------------------------------------------------------------------------------


def _rules() -> Iterator[CelRule]:
    for module in (common, policy):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, ApiModel):
                yield from value.cel_rules


CEL_RULES = tuple(_rules())


def field_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location in the API server's spelling: spec.weights[0].weight."""
    parts = list(loc)
    if parts and parts[-1] == "[key]":
        parts = parts[:-2]  # a bad map key: the server names the map
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def model_fields(obj: JSON) -> set[str]:
    """The paths the pydantic models (and their CEL twins) refuse in ``obj``."""
    try:
        ServiceProxyPolicy.parse(obj)
    except ValidationError as err:
        out = set()
        for e in err.errors():
            path = field_path(e["loc"])
            rule = next((r for r in CEL_RULES if e["type"] == "value_error" and r.message in e["msg"]), None)
            if rule is not None and rule.field_path:
                path += rule.field_path
            out.add(path)
        return out
    return set()


def predict(obj: JSON) -> set[str]:
    """Field paths the server must name when it refuses ``obj``; empty: it must accept it."""
    out = {k for k in obj if k not in TOP_LEVEL}
    name = (obj.get("metadata") or {}).get("name")
    if not (isinstance(name, str) and len(name) <= 253 and SUBDOMAIN.fullmatch(name)):
        out.add("metadata.name")
    return out | model_fields(obj)


def refused_fields(body: str) -> tuple[set[str], str]:
    """The field paths named in a refusal (a Status as JSON), and its message."""
    try:
        status = json.loads(body)
    except ValueError:
        return set(), body
    message = str(status.get("message", ""))
    causes = (status.get("details") or {}).get("causes") or []
    fields = {str(c["field"]) for c in causes if c.get("field")}
    fields |= set(re.findall(r'unknown field "([^"]+)"', message))
    # A metadata field of the wrong JSON type fails decoding before any validation, and the
    # server names it by its Go type: "Go struct field ObjectMeta.name" (a server limitation).
    fields |= {f"metadata.{f}" for f in re.findall(r"Go struct field ObjectMeta\.(\w+) of type", message)}
    return fields, message


def agreed(expected: set[str], named: set[str]) -> set[str]:
    """The server's paths that name what the models name.

    Two spellings differ and still agree: the models name a list where the server names
    its duplicated item (spec.services vs spec.services[1]); and where an object stands
    in for a scalar, strict decoding names the object's key as an unknown field
    (spec.services[0].a for services[0] = {"a": 1}: a server-side limitation)."""
    return {
        p
        for p in named
        if p in expected
        or re.sub(r"\[\d+\]$", "", p) in expected
        or any(p.startswith((e + ".", e + "[")) for e in expected)
    }


def named_in(path: str, message: str) -> bool:
    """True when ``message`` names ``path`` (metadata decoding errors say ObjectMeta.name)."""
    return path in message or path.replace("metadata.", "ObjectMeta.", 1) in message


def generalise(path: str) -> str:
    """spec.weights[3].matchLabels.app -> spec.weights[].matchLabels.*, for counting by field."""
    return re.sub(r"\.matchLabels\..*$", ".matchLabels.*", re.sub(r"\[\d+\]", "[]", path))
