"""The conformance run record (svcproxy_lab.conformance): e2e.test's JUnit report -> docs table.

The fixture tests/unit/fixtures/e2e-junit.xml is written by hand in the shape of e2e.test's
junit_01.xml: specs inside and outside the network focus, a failure, a run-time skip, and
suite-level nodes.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from svcproxy_lab.conformance import (
    FAILED,
    LISTED,
    PASSED,
    RUNS_MARKER,
    SKIPPED,
    ReportError,
    Run,
    SpecResult,
    handover_summary,
    insert_run,
    main,
    parse_junit,
    parse_samples,
    render_run,
    summary_line,
)

FIXTURE = Path(__file__).parent / "fixtures" / "e2e-junit.xml"
FOCUS = r"\[sig-network\].*(Services|DNS|EndpointSlice|Proxy|Networking).*\[Conformance\]"
DNS = "[sig-network] DNS should provide DNS for the cluster [Conformance]"
BASIC = "[sig-network] Services should serve a basic endpoint from pods [Conformance]"
AFFINITY = (
    "[sig-network] Services should have session affinity work for NodePort service [LinuxOnly] [Conformance]"
)


def test_the_focus_selects_the_network_conformance_specs_only() -> None:
    results = parse_junit(FIXTURE.read_text(), FOCUS)
    assert [r.name for r in results] == [DNS, AFFINITY, BASIC]
    by_name = {r.name: r for r in results}
    assert by_name[DNS] == SpecResult(DNS, PASSED, 12.5, "")
    assert by_name[BASIC].result == FAILED and by_name[BASIC].seconds == 60.25
    # The failure's first line, not the location lines after it.
    assert by_name[BASIC].note.startswith("[FAILED] failed to validate endpoints for service endpoint-test2")
    assert "service.go" not in by_name[BASIC].note
    reason = "Only supported for node OS distro [linux] (not windows)"
    assert by_name[AFFINITY] == SpecResult(AFFINITY, SKIPPED, 0.5, reason)


def test_a_narrower_focus_keeps_fewer_specs() -> None:
    assert [r.name for r in parse_junit(FIXTURE.read_text(), r"\[sig-network\] DNS")] == [DNS]


def test_a_failed_suite_node_is_kept_whatever_the_focus() -> None:
    passed = 'name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="3.25">'
    failed = (
        'name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="failed" time="3.25">'
        '<failure message="" type="failed">[FAILED] could not reach the API server</failure>'
    )
    assert passed in FIXTURE.read_text()
    xml = FIXTURE.read_text().replace(passed, failed)
    results = parse_junit(xml, r"\[sig-network\] DNS")
    assert [(r.name, r.result, r.note) for r in results] == [
        ("[SynchronizedBeforeSuite]", FAILED, "[FAILED] could not reach the API server"),
        (DNS, PASSED, ""),
    ]


def test_a_dry_run_lists_the_specs_as_not_run() -> None:
    results = parse_junit(FIXTURE.read_text(), r"DNS|basic endpoint", dry_run=True)
    # In a dry run Ginkgo reports every selected spec as passed without running it; the
    # fixture's failed spec stays failed, so only the DNS one is listed.
    assert [(r.name, r.result) for r in results] == [(DNS, LISTED), (BASIC, FAILED)]
    assert summary_line([r for r in results if r.result == LISTED]) == "1 listed (dry run, none run)"


def test_the_summary_counts_by_result_and_always_names_failures() -> None:
    results = parse_junit(FIXTURE.read_text(), FOCUS)
    assert summary_line(results) == "1 passed, 1 failed, 1 skipped of 3"
    assert summary_line([SpecResult(DNS, PASSED, 1.0, "")]) == "1 passed, 0 failed of 1"


def test_no_spec_in_the_focus_and_a_broken_report_say_what_to_check() -> None:
    with pytest.raises(ReportError, match="no spec of the report matches"):
        parse_junit(FIXTURE.read_text(), r"\[sig-nothing\]")
    with pytest.raises(ReportError, match="not XML"):
        parse_junit("<testsuites><testsuite>", FOCUS)
    with pytest.raises(ReportError, match="not a regular expression"):
        parse_junit(FIXTURE.read_text(), "(unclosed")


def _run(dry_run: bool = False) -> Run:
    when = dt.datetime(2026, 12, 7, 17, 5, tzinfo=dt.UTC)
    return Run(when, "none", "e2e.test --ginkgo.focus='x|y'", dry_run, "/results/run-1")


def test_the_rendered_run_has_the_date_mode_command_and_one_row_per_spec() -> None:
    text = render_run(_run(), parse_junit(FIXTURE.read_text(), FOCUS))
    lines = text.splitlines()
    assert lines[0] == "### 2026-12-07 17:05 UTC, MODE=none: 1 passed, 1 failed, 1 skipped of 3"
    assert "- command: `e2e.test --ginkgo.focus='x|y'`" in lines
    assert "- time in specs: 1.2 min" in lines
    rows = [line for line in lines if line.startswith("| [sig-network]")]
    assert len(rows) == 3
    assert rows[0] == f"| {DNS} | passed | 12.5 |  |"
    # A "|" inside a failure message must not split the table cell.
    assert r"timed out \| waiting" in rows[2] and rows[2].count(" | ") == 3


def test_runs_go_below_the_marker_newest_first() -> None:
    doc = f"# Conformance\n\nintro\n\n## Runs\n\n{RUNS_MARKER}\n"
    first = insert_run(doc, "### run one\n")
    second = insert_run(first, "### run two\n")
    assert second.index("### run two") < second.index("### run one")
    assert second.startswith("# Conformance\n\nintro\n\n## Runs\n\n")
    assert second.count(RUNS_MARKER) == 1
    with pytest.raises(ReportError, match="no runs marker"):
        insert_run("# no marker here\n", "### run\n")


def test_main_records_the_run_and_exits_1_when_a_spec_failed(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text(f"# Conformance\n\n{RUNS_MARKER}\n")
    argv = ["--junit", str(FIXTURE), "--focus", FOCUS, "--mode", "none", "--command", "e2e.test"]
    argv += ["--doc", str(doc)]
    assert main(argv) == 1
    assert "MODE=none: 1 passed, 1 failed, 1 skipped of 3" in doc.read_text()
    assert main([*argv[:3], r"\[sig-network\] DNS", *argv[4:]]) == 0
    assert doc.read_text().count("### ") == 2
    assert main([*argv[:1], str(tmp_path / "missing.xml"), *argv[2:]]) == 2


SAMPLES = """\
# t=1.0
ns namespace/services-1
svc default kubernetes ClusterIP <none>
svc services-1 web ClusterIP <none>
svc services-1 np NodePort <none>
# t=2.0
ns namespace/services-1
ns namespace/dns-2
svc services-1 web ClusterIP svcproxy
svc services-1 np NodePort <none>
svc dns-2 test-service ClusterIP <none>
pvs services-1 web
pvs default kubernetes
# t=3.0
svc dns-2 test-service ClusterIP <none>
pvs dns-2 test-service
svc dns-2 hl ClusterIP <none> None
ns namespace/dns-2
"""


def test_handover_counts_only_the_specs_services_and_what_svcproxy_did_with_them() -> None:
    seen = parse_samples(SAMPLES)
    # default/kubernetes is not a spec's (its namespace has no e2e-run label); a spec's
    # Service once seen counts as programmed when its program shows up in a later sample.
    assert set(seen) == {"services-1/web", "services-1/np", "dns-2/test-service", "dns-2/hl"}
    assert seen["dns-2/hl"].types == {"headless"} and not seen["dns-2/hl"].programmed
    assert seen["services-1/web"].programmed and seen["services-1/web"].handed
    assert not seen["services-1/np"].programmed
    assert seen["dns-2/test-service"].programmed and not seen["dns-2/test-service"].handed
    lines = handover_summary(seen)
    assert "of the 4 Services the specs created" in lines[0]
    assert "1 were headless (no proxy serves those)" in lines[0]
    assert "programmed 2 and took 1 over" in lines[0]
    assert "| ClusterIP | 2 | 2 | 1 |" in lines and "| NodePort | 1 | 0 | 0 |" in lines
    assert "| headless | 1 | 0 | 0 |" in lines
    assert handover_summary({})[0].endswith("no Service of the specs was seen by the sampler")


def test_main_adds_the_handover_to_the_record(tmp_path: Path) -> None:
    doc = tmp_path / "conformance.md"
    doc.write_text(f"# Conformance\n\n{RUNS_MARKER}\n")
    samples = tmp_path / "handover.txt"
    samples.write_text(SAMPLES)
    argv = ["--junit", str(FIXTURE), "--focus", r"\[sig-network\] DNS", "--mode", "iptables"]
    argv += ["--command", "e2e.test", "--doc", str(doc), "--handover", str(samples)]
    assert main(argv) == 0
    assert "| NodePort | 1 | 0 | 0 |" in doc.read_text()
