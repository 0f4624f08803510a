"""Generated ServiceProxyPolicies against the real API server and a running operator.

A few hundred objects from ``policy_fuzz.policy_objects()`` (hypothesis, derandomized
so every run draws the same ones) go to the API server as dry-run creates with strict
field validation, through one persistent client. The oracle (``policy_fuzz.predict``:
the pydantic models and the Python twins of their CEL rules) must agree with the
server on every one: the same verdict, and a refusal that names a field the models
name too; an accepted object, once defaulted by the server, parses to the same spec.
A second sweep sends every mode x scheduler x flags x weights combination.

Then a sample of the accepted ones, pointed at this namespace's Services with
clashing priorities, is applied for real with kubectl while the operator runs: each
Service ends programmed by the winner ``compile/conflicts.py`` names, every other
selecting policy says Conflicted, ExternalName and headless Services NotProxied,
and the operator is the same live process at the end, without a traceback or an
error in its log. The counts are printed (examples, valid, invalid, refusals by field).
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, given, settings
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from policy_fuzz import (
    FLAGS,
    IPVS_SCHEDULERS,
    MODES,
    agreed,
    generalise,
    named_in,
    policy_objects,
    predict,
    refused_fields,
)
from test_crd_validation import install_crds
from test_operator import Operator, _try, report

from svcproxy.api import GROUP, VERSION, ServiceProxyPolicy
from svcproxy.compile.conflicts import selects, winner

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab
EXAMPLES = 300  # bounded and derandomized: every run sends the same objects
SAMPLE = 30  # accepted ones applied for real
ECHO = "svcproxy.io/echo"
JSON = dict[str, Any]


@dataclass
class Tally:
    """What the server said, for the printed summary and the applied sample."""

    verdicts: Counter[str] = field(default_factory=Counter)
    fields: Counter[str] = field(default_factory=Counter)
    valid: list[JSON] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, title: str) -> str:
        by_field = ", ".join(f"{f} {n}" for f, n in self.fields.most_common())
        return (
            f"\n{title}: {sum(self.verdicts.values())} objects, {self.verdicts['valid']} valid, "
            f"{self.verdicts['invalid']} invalid in {self.seconds:.1f} s; refusals by field: {by_field}"
        )


class DryRun:
    """Dry-run creates in one namespace through one client; each verdict checked on the spot."""

    def __init__(self, lab: Lab, namespace: str) -> None:
        self.api = k8s.CustomObjectsApi(k8s_config.new_client_from_config(config_file=str(lab.kubeconfig)))
        self.namespace = namespace

    def check(self, obj: JSON, tally: Tally) -> None:
        expected = predict(obj)
        try:
            stored = self.api.create_namespaced_custom_object(
                GROUP,
                VERSION,
                self.namespace,
                "serviceproxypolicies",
                obj,
                dry_run="All",
                field_validation="Strict",
            )
        except k8s.ApiException as err:
            if err.status not in (400, 422):
                raise
            named, message = refused_fields(err.body)
            assert expected, f"the server refused what the models accept:\n{_show(obj)}\n-> {message}"
            same = agreed(expected, named)
            assert same, (
                f"the server and the models name different fields:\n{_show(obj)}\n"
                f"models: {sorted(expected)}\nserver: {sorted(named)}: {message}"
            )
            for path in same:
                assert named_in(path, message), f"the message does not name {path}: {message}"
                tally.fields[generalise(path)] += 1
            tally.verdicts["invalid"] += 1
            return
        assert not expected, f"the server accepted what the models refuse ({sorted(expected)}):\n{_show(obj)}"
        # Defaulting agrees too: the server's object parses to the spec the models derive.
        assert _spec(stored) == _spec(obj), f"defaults differ:\nsent {_show(obj)}\nstored {_show(stored)}"
        tally.verdicts["valid"] += 1
        tally.valid.append(obj)


def _spec(obj: JSON) -> Any:
    return ServiceProxyPolicy.parse({k: v for k, v in obj.items() if k != "status"}).spec


def _show(obj: JSON) -> str:
    text = json.dumps(obj, ensure_ascii=False)
    return text if len(text) < 3000 else text[:3000] + "..."


@pytest.fixture(scope="module")
def operator(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """The operator as a subprocess for the whole module, its log kept for the last check."""
    install_crds(lab)
    op = Operator(lab, tmp_path_factory.mktemp("fuzz-operator") / "operator.log")
    try:
        lab.wait_until(
            "the operator's liveness endpoint", lambda: _try(lambda: op.http(op.liveness_port, "/healthz"))
        )
        yield op
    finally:
        op.proc.terminate()
        try:
            op.proc.wait(timeout=30)
        except Exception:
            op.proc.kill()


@pytest.fixture(scope="module")
def dry_run(lab: Lab, operator: Operator) -> Iterator[DryRun]:
    name = f"fuzz-{uuid.uuid4().hex[:8]}"
    lab.kubectl("create", "namespace", name)
    try:
        yield DryRun(lab, name)
    finally:
        lab.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def fuzzed(dry_run: DryRun) -> Tally:
    tally = Tally()
    start = time.monotonic()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(policy_objects())
    def one(obj: JSON) -> None:
        dry_run.check(obj, tally)

    one()
    tally.seconds = time.monotonic() - start
    return tally


def test_generated_policies_get_the_verdict_the_models_predict(
    fuzzed: Tally, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print(fuzzed.summary("policy fuzz"))
    # Shrinking re-runs examples, so the counts are at least EXAMPLES; both verdicts well covered.
    assert sum(fuzzed.verdicts.values()) >= EXAMPLES
    assert fuzzed.verdicts["valid"] >= SAMPLE * 2 // 3 and fuzzed.verdicts["invalid"] >= EXAMPLES // 2
    assert len(fuzzed.fields) >= 15, f"refusals cover too few fields: {fuzzed.fields}"


def _combinations() -> Iterator[JSON]:
    """Every mode x scheduler x flags x weights (absent where that is a choice); affinities cycled."""
    modes: list[str | None] = [None, *MODES]
    schedulers: list[str | None] = [None, *IPVS_SCHEDULERS]
    flag_sets: list[list[str] | None] = [None, [FLAGS[0]], [FLAGS[1]], list(FLAGS)]
    ipvs_choices: list[JSON | None] = [None]
    for scheduler, flags in itertools.product(schedulers, flag_sets):
        ipvs_choices.append(
            {k: v for k, v in (("scheduler", scheduler), ("schedulerFlags", flags)) if v is not None}
        )
    weights: list[list[JSON] | None] = [
        None,
        [],
        [{"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 3}],
    ]
    affinities = itertools.cycle(
        [None, {"type": "None"}, {"type": "ClientIP", "timeoutSeconds": 60}, {"type": "ClientIP"}]
    )
    for i, (mode, ipvs, weight) in enumerate(itertools.product(modes, ipvs_choices, weights)):
        spec: JSON = {
            "services": ["web"],
            "mode": mode,
            "ipvs": ipvs,
            "weights": weight,
            "sessionAffinity": next(affinities),
        }
        yield {
            "apiVersion": "svcproxy.io/v1alpha1",
            "kind": "ServiceProxyPolicy",
            "metadata": {"name": f"combo-{i}"},
            "spec": {k: v for k, v in spec.items() if v is not None},
        }


def test_every_mode_scheduler_flags_weights_combination(
    dry_run: DryRun, capsys: pytest.CaptureFixture[str]
) -> None:
    tally = Tally()
    start = time.monotonic()
    for obj in _combinations():
        dry_run.check(obj, tally)
    tally.seconds = time.monotonic() - start
    with capsys.disabled():
        print(tally.summary("mode x scheduler x flags x weights"))
    assert sum(tally.verdicts.values()) == 4 * (1 + 14 * 4) * 3
    assert tally.verdicts["valid"] and tally.verdicts["invalid"]


# -- a sample applied for real ---------------------------------------------------------------

# Services of the applied sample: (name, labels, spec). ExternalName and headless ones are never proxied.
SERVICES: tuple[tuple[str, dict[str, str], JSON], ...] = (
    ("svc-a", {"fuzz-group": "a", "tier": "front"}, {"selector": {"app": "web"}, "ports": [{"port": 80}]}),
    ("svc-b", {"fuzz-group": "b", "tier": "front"}, {"selector": {"app": "web"}, "ports": [{"port": 80}]}),
    (
        "svc-c",
        {"fuzz-group": "c", "tier": "back"},
        {
            "selector": {"app": "web"},
            "sessionAffinity": "ClientIP",
            "ports": [{"name": "http", "port": 80}, {"name": "alt", "port": 81, "targetPort": 80}],
        },
    ),
    ("svc-ext", {"fuzz-group": "a"}, {"type": "ExternalName", "externalName": "example.invalid"}),
    (
        "svc-headless",
        {"fuzz-group": "b"},
        {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]},
    ),
)
# How the i-th sampled policy selects (i mod 5): by name, or by labels and expressions.
TARGETS: tuple[JSON, ...] = (
    {"services": ["svc-a"]},
    {"services": ["svc-a", "svc-b", "svc-ext"]},
    {"serviceSelector": {"matchLabels": {"fuzz-group": "b"}}},
    {
        "serviceSelector": {
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]}]
        }
    },
    {
        "serviceSelector": {
            "matchExpressions": [
                {"key": "fuzz-group", "operator": "NotIn", "values": ["c"]},
                {"key": "tier", "operator": "Exists"},
            ]
        }
    },
)


def sample(valid: list[JSON]) -> list[JSON]:
    """SAMPLE accepted objects, evenly spread, aimed at SERVICES with clashing priorities."""
    step = max(1, len(valid) // SAMPLE)
    out = []
    for i, obj in enumerate(valid[::step][:SAMPLE]):
        spec = {k: v for k, v in obj["spec"].items() if k not in ("services", "serviceSelector")}
        spec.update(json.loads(json.dumps(TARGETS[i % len(TARGETS)])))
        if i % 3:  # most share priority 0 or 1, so age and name decide; a third keep theirs
            spec["priority"] = i % 2
        name = re.sub(r"[-.]+$", "", f"p{i:02d}.{obj['metadata']['name']}"[:253])
        out.append({**obj, "metadata": {"name": name}, "spec": spec})
        assert not predict(out[-1]), f"the sample turned invalid: {out[-1]}"
    return out


def _service(name: str, labels: dict[str, str], spec: JSON) -> JSON:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels}, "spec": spec}


def _expected(lab: Lab, namespace: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Per policy: Service -> the state it must reach; per proxied Service: the winning policy."""
    raws = lab.kubectl_json("get", "spp", "-n", namespace)["items"]
    policies = [ServiceProxyPolicy.parse({k: v for k, v in r.items() if k != "status"}) for r in raws]
    services = lab.kubectl_json("get", "services", "-n", namespace)["items"]
    rows: dict[str, dict[str, str]] = {p.metadata.name: {} for p in policies}
    conflicted = "Conflicted:"

    winners: dict[str, str] = {}
    for svc in services:
        name, spec = svc["metadata"]["name"], svc["spec"]
        picking = [p for p in policies if selects(p, svc)]
        if not picking:
            continue
        win = winner(picking).metadata.name
        proxied = spec.get("type") != "ExternalName" and spec.get("clusterIP") != "None"
        if proxied:
            winners[name] = win
        for p in picking:
            mine = p.metadata.name == win
            rows[p.metadata.name][name] = (
                "NotProxied" if not proxied else "Programmed" if mine else conflicted + win
            )
    return rows, winners


def _mismatches(
    lab: Lab, namespace: str, rows: dict[str, dict[str, str]], winners: dict[str, str]
) -> list[str]:
    """What still differs from the expectation (empty: all reached)."""
    bad = []
    for raw in lab.kubectl_json("get", "spp", "-n", namespace)["items"]:
        name, status = raw["metadata"]["name"], raw.get("status") or {}
        if status.get("observedGeneration") != raw["metadata"]["generation"]:
            bad.append(f"{name}: status not for generation {raw['metadata']['generation']}")
            continue
        got = {r["name"]: r for r in status.get("services") or []}
        if set(got) != set(rows[name]):
            bad.append(f"{name}: rows {sorted(got)}, expected {sorted(rows[name])}")
        for svc, want in rows[name].items():
            row = got.get(svc) or {}
            state, message = row.get("state"), row.get("message") or ""
            if want.startswith("Conflicted:"):
                win = want.split(":", 1)[1]
                if state != "Conflicted" or f"policy {win} wins" not in message:
                    bad.append(f"{name}/{svc}: {state} {message!r}, expected Conflicted: {win} wins")
            elif state != want or (want == "NotProxied" and not message):
                bad.append(f"{name}/{svc}: {state} {message!r}, expected {want}")
    for svc, win in winners.items():
        out = lab.kubectl("get", "pvs", svc, "-n", namespace, "-o", "json", "--ignore-not-found")
        owner = json.loads(out)["spec"]["policy"]["name"] if out.strip() else None
        if owner != win:
            bad.append(f"program of {svc}: policy {owner}, expected {win}")
    return bad


def _report_programs(lab: Lab, namespace: str, nodes: list[str]) -> None:
    """Every node reports every current program applied, as its agent would."""
    applied = {
        f"{namespace}/{p['metadata']['name']}": p["spec"]["contentHash"]
        for p in lab.kubectl_json("get", "pvs", "-n", namespace)["items"]
    }
    for node in nodes:
        report(lab, node, {"applied": applied})


@pytest.fixture
def proxy_nodes(lab: Lab, operator: Operator) -> Iterator[list[str]]:
    """A ProxyNode per lab node for the test to report in (the lab here runs no agents)."""
    existing = set(lab.kubectl("get", "proxynodes", "-o", "name").split())
    made = [n for n in lab.nodes if f"proxynode.svcproxy.io/{n}" not in existing]
    if len(made) != len(lab.nodes):
        pytest.skip("agents already report in this cluster; this test writes the reports itself")
    for node in made:
        lab.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyNode", "metadata": {"name": node}}
            ),
        )
    yield lab.nodes
    lab.kubectl("delete", "proxynodes", *made, "--ignore-not-found", check=False)


def test_applied_sample_ends_programmed_or_says_why(
    lab: Lab,
    namespace: str,
    operator: Operator,
    *,
    proxy_nodes: list[str],
    fuzzed: Tally,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pid = operator.proc.pid
    # Before: the operator's start (e.g. a retried 429 while the fresh CRDs' storage initialises).
    log_start = operator.log.stat().st_size
    lab.kubectl("create", "deployment", "web", f"--image={ECHO}", "--replicas=2", "-n", namespace)
    lab.apply([_service(*s) for s in SERVICES], namespace)
    policies = sample(fuzzed.valid)
    assert len(policies) >= SAMPLE * 2 // 3, f"only {len(policies)} accepted objects to apply"
    start = time.monotonic()
    lab.apply(policies, namespace)
    rows, winners = _expected(lab, namespace)
    assert set(winners) == {"svc-a", "svc-b", "svc-c"}, winners
    conflicted = sum(1 for r in rows.values() for s in r.values() if s.startswith("Conflicted"))
    try:
        lab.wait_until(
            "every applied policy to reach its expected state",
            lambda: (
                (_report_programs(lab, namespace, proxy_nodes) or True)
                and not _mismatches(lab, namespace, rows, winners)
            ),
            timeout=120,
        )
    except pytest.fail.Exception:
        print("\n".join(_mismatches(lab, namespace, rows, winners)))
        raise
    settled = time.monotonic() - start
    with capsys.disabled():
        print(
            f"\napplied sample: {len(policies)} policies, {sum(len(r) for r in rows.values())} rows "
            f"({conflicted} Conflicted), settled in {settled:.1f} s"
        )
    _assert_operator_well(operator, pid, log_start)
    # Deleting them walks the handover back; kopf logs that designed wait ("failed
    # temporarily: handing ... back to kube-proxy") at error level, so only it is let pass.
    lab.kubectl("delete", "spp", "--all", "-n", namespace, "--timeout=60s")
    _assert_operator_well(operator, pid, log_start, allow=HANDBACK_WAIT)


HANDBACK_WAIT = re.compile(
    r"failed temporarily: handing [-a-z0-9, ]+ back to kube-proxy before removing the program"
)


def _assert_operator_well(
    operator: Operator, pid: int, log_start: int, allow: re.Pattern[str] | None = None
) -> None:
    """Same live process, still healthy, no traceback anywhere, no error since ``log_start``."""
    assert operator.alive() and operator.proc.pid == pid, "the operator restarted or died"
    assert operator.http(operator.liveness_port, "/healthz")
    assert operator.reconciles() > 0
    raw = operator.log.read_bytes()
    text = raw.decode(errors="replace")
    assert "Traceback" not in text, (
        "the operator logged a traceback:\n" + text[text.index("Traceback") - 2000 :][:6000]
    )
    problems = [
        p for p in _log_problems(raw[log_start:].decode(errors="replace")) if not (allow and allow.search(p))
    ]
    assert not problems, "the operator logged errors:\n" + "\n".join(problems[:20])


def _log_problems(text: str) -> list[str]:
    """Log lines with a traceback or at level error or worse (kopf logs JSON: "severity")."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        level = ""
        if isinstance(entry, dict):
            level = str(entry.get("severity") or entry.get("level") or "")
        if (
            "Traceback" in line
            or level.lower() in ("error", "critical")
            or (entry is None and "ERROR" in line)
        ):
            out.append(line[:2000])
    return out
