"""The upstream conformance suite's JUnit report, turned into a run record in docs/conformance.md.

hack/conformance.sh runs ``e2e.test`` with a ``--ginkgo.focus`` regular expression and
``--report-dir``; e2e.test writes ``junit_01.xml`` there, holding every spec of the suite
(those outside the focus as skipped). This module keeps the specs the focus selects, plus
any suite-level node that did not pass (a failed ``[SynchronizedBeforeSuite]`` fails every
spec), counts them by result and renders one Markdown section (date, mode, command, counts,
one table row per spec) that it inserts below the runs marker of the document, newest
first. Standard library only, so the script runs with any Python 3.11. Tested in
tests/unit/test_lab_conformance.py.

    python -m svcproxy_lab.conformance --junit DIR/junit_01.xml --focus REGEX \\
        --mode none --command "..." --doc docs/conformance.md [--dry-run] [--handover FILE]

``--handover`` reads the samples hack/conformance.sh took every second while the specs ran
(the specs' namespaces, their Services with type and proxy label, the programs svcproxy
wrote) and adds to the record how many of the specs' Services svcproxy programmed and how
many it took over from kube-proxy (:func:`handover_summary`): a spec can pass on kube-proxy
alone while the handover is still under way, and the record must tell the two apart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RUNS_MARKER = "<!-- runs: hack/conformance.sh inserts each run below this line, newest first -->"
# Results in the order the summary line names them; anything else Ginkgo reports
# (panicked, timedout, interrupted, aborted) counts as failed.
PASSED, FAILED, SKIPPED, LISTED = "passed", "failed", "skipped", "listed"
_FAILED_STATES = frozenset({"failed", "panicked", "timedout", "interrupted", "aborted"})
_NOTE_LIMIT = 160
# Ginkgo names a test case "[<node type>] <full text>": "[It] [sig-network] DNS ...", or a
# suite-level node alone, "[SynchronizedBeforeSuite]", "[ReportAfterSuite] Kubernetes e2e ...".
_SUITE_NODE = re.compile(
    r"\[((Synchronized)?(Before|After)Suite|Report(Before|After)Suite|DeferCleanup[^]]*)\].*"
)
_IT = "[It] "


class ReportError(Exception):
    """The JUnit report or the document cannot be used; the message says what to do."""


@dataclass(frozen=True)
class SpecResult:
    """One spec (or suite-level node) of the report, as the record shows it."""

    name: str
    result: str  # PASSED, FAILED, SKIPPED or LISTED (a dry run's spec)
    seconds: float
    note: str  # first line of the failure or the skip reason; empty when it passed


@dataclass(frozen=True)
class Run:
    """What the record of one run says besides the specs."""

    when: dt.datetime
    mode: str
    command: str
    dry_run: bool
    results_dir: str


def _first_line(text: str) -> str:
    for raw in text.splitlines():
        line = raw.strip()
        if line:
            return line if len(line) <= _NOTE_LIMIT else line[: _NOTE_LIMIT - 3] + "..."
    return ""


def _result_of(case: ET.Element, dry_run: bool) -> tuple[str, str]:
    status = case.get("status", "")
    failure = case.find("failure")
    if failure is None:
        failure = case.find("error")
    if status in _FAILED_STATES or failure is not None:
        text = "" if failure is None else (failure.get("message") or failure.text or "")
        return FAILED, _first_line(text) or status
    skipped = case.find("skipped")
    if status in ("skipped", "pending") or skipped is not None:
        message = "" if skipped is None else skipped.get("message", "")
        # Ginkgo writes "skipped - <reason>" for a spec that skipped itself at run time.
        return SKIPPED, _first_line(message.removeprefix("skipped").lstrip(" -:")) or status
    return (LISTED if dry_run else PASSED), ""


def _is_suite_node(name: str) -> bool:
    """Suite-level nodes, e.g. ``[SynchronizedBeforeSuite]``; specs are ``[It] ...``."""
    return _SUITE_NODE.fullmatch(name) is not None


def parse_junit(xml_text: str, focus: str, dry_run: bool = False) -> list[SpecResult]:
    """The specs ``focus`` selects, sorted by name, and every suite node that did not pass."""
    try:
        root = ET.fromstring(xml_text)
        selector = re.compile(focus)
    except ET.ParseError as err:
        raise ReportError(
            f"the JUnit report is not XML ({err}): did e2e.test finish? See e2e.log beside it"
        ) from err
    except re.error as err:
        raise ReportError(f"the focus {focus!r} is not a regular expression Python reads ({err})") from err
    out = []
    for case in root.iter("testcase"):
        name = case.get("name", "").removeprefix(_IT)
        result, note = _result_of(case, dry_run)
        suite_node = _is_suite_node(name)
        if suite_node and result != FAILED:
            continue
        if not suite_node and not selector.search(name):
            continue
        out.append(SpecResult(name, result, float(case.get("time") or 0.0), note))
    if not out:
        raise ReportError(
            f"no spec of the report matches the focus {focus!r}: is it the focus e2e.test ran with?"
        )
    return sorted(out, key=lambda r: r.name)


def summary_line(results: Sequence[SpecResult]) -> str:
    """E.g. ``35 passed, 1 failed, 1 skipped of 37``; a dry run's ``37 listed (dry run)``."""
    counts = Counter(r.result for r in results)
    if counts[LISTED] == len(results):
        return f"{len(results)} listed (dry run, none run)"
    parts = [f"{counts[k]} {k}" for k in (PASSED, FAILED, SKIPPED) if counts[k] or k == FAILED]
    return ", ".join(parts) + f" of {len(results)}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_run(run: Run, results: Sequence[SpecResult], extra: Sequence[str] = ()) -> str:
    """The Markdown section of one run: a heading with the summary, the facts, the table."""
    when = run.when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    kind = "dry run" if run.dry_run else f"MODE={run.mode}"
    total = sum(r.seconds for r in results)
    lines = [
        f"### {when}, {kind}: {summary_line(results)}",
        "",
        f"- command: `{run.command}`",
        f"- results: `{run.results_dir}` (JUnit `junit_01.xml`, log `e2e.log`)",
    ]
    if not run.dry_run:
        lines.append(f"- time in specs: {total / 60:.1f} min")
    lines += extra
    lines += ["", "| spec | result | time (s) | note |", "| --- | --- | ---: | --- |"]
    for r in results:
        lines.append(f"| {_cell(r.name)} | {r.result} | {r.seconds:.1f} | {_cell(r.note)} |")
    return "\n".join(lines) + "\n"


@dataclass
class ServiceSeen:
    """One Service a spec created, over every sample it was in."""

    types: set[str]
    programmed: bool = False  # svcproxy wrote its ProxyVirtualServer
    handed: bool = False  # it carried service-proxy-name=svcproxy: kube-proxy let go of it


def parse_samples(text: str) -> dict[str, ServiceSeen]:
    """The sampler's lines -> Service ("namespace/name") -> what was seen of it.

    Lines: ``ns NAME`` (a namespace of the specs), ``svc NS NAME TYPE PROXY [CLUSTERIP]``,
    ``pvs NS NAME``; ``# t=...`` starts a sample. Only Services in the specs' namespaces
    (as seen in the same sample) count. A ClusterIP of ``None`` makes the type
    ``headless``: no proxy serves those, so they are not kube-proxy's either."""
    seen: dict[str, ServiceSeen] = {}
    programs: set[str] = set()
    namespaces: set[str] = set()
    rows: list[list[str]] = []

    def flush() -> None:
        for ns, name, type_, proxy, cluster_ip in rows:
            if ns in namespaces:
                entry = seen.setdefault(f"{ns}/{name}", ServiceSeen(set()))
                entry.types.add("headless" if cluster_ip == "None" else type_)
                entry.handed |= proxy == "svcproxy"
        for key in programs:
            if key in seen:
                seen[key].programmed = True
        rows.clear()
        programs.clear()
        namespaces.clear()

    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "#":
            flush()
        elif parts[0] == "ns" and len(parts) >= 2:
            namespaces.add(parts[1].removeprefix("namespace/"))
        elif parts[0] == "svc" and len(parts) >= 5:
            rows.append([*parts[1:5], parts[5] if len(parts) >= 6 else ""])
        elif parts[0] == "pvs" and len(parts) >= 3:
            programs.add(f"{parts[1]}/{parts[2]}")
    flush()
    return seen


def handover_summary(seen: dict[str, ServiceSeen]) -> list[str]:
    """Markdown lines: per Service type, how many svcproxy programmed and took over."""
    if not seen:
        return ["- handover: no Service of the specs was seen by the sampler"]
    by_type: dict[str, list[ServiceSeen]] = {}
    for entry in seen.values():
        by_type.setdefault("/".join(sorted(entry.types)), []).append(entry)
    programmed = sum(e.programmed for e in seen.values())
    handed = sum(e.handed for e in seen.values())
    headless = sum("headless" in e.types for e in seen.values())
    rest = " the rest were served by kube-proxy alone"
    if headless:
        rest = f" {headless} were headless (no proxy serves those), the rest served by kube-proxy alone"
    lines = [
        f"- handover: of the {len(seen)} Services the specs created (sampled every second), svcproxy"
        f" programmed {programmed} and took {handed} over from kube-proxy before they were deleted;"
        + rest,
        "",
        "| Service type | created | programmed by svcproxy | taken over from kube-proxy |",
        "| --- | ---: | ---: | ---: |",
    ]
    for type_, entries in sorted(by_type.items()):
        programs, taken = sum(e.programmed for e in entries), sum(e.handed for e in entries)
        lines.append(f"| {type_} | {len(entries)} | {programs} | {taken} |")
    return [*lines, ""]


def insert_run(document: str, section: str) -> str:
    """``document`` with ``section`` right below the runs marker (newest first)."""
    if RUNS_MARKER not in document:
        raise ReportError(f"the document has no runs marker; add this line where runs go:\n{RUNS_MARKER}")
    head, tail = document.split(RUNS_MARKER, 1)
    rest = tail.lstrip("\n")
    return f"{head}{RUNS_MARKER}\n\n{section}" + (f"\n{rest}" if rest else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record an e2e.test JUnit report in docs/conformance.md.")
    parser.add_argument("--junit", type=Path, required=True, help="e2e.test's junit_01.xml")
    parser.add_argument("--focus", required=True, help="the --ginkgo.focus e2e.test ran with")
    parser.add_argument("--mode", required=True, help="the default policy's mode, or none")
    parser.add_argument("--command", required=True, help="the e2e.test command line, as run")
    parser.add_argument("--doc", type=Path, required=True, help="the Markdown document to insert into")
    parser.add_argument("--dry-run", action="store_true", help="the report is of --ginkgo.dry-run")
    parser.add_argument("--handover", type=Path, help="the sampler's file (hack/conformance.sh)")
    args = parser.parse_args(argv)
    try:
        results = parse_junit(args.junit.read_text(), args.focus, args.dry_run)
        folder = str(args.junit.parent.resolve()).replace(str(Path.home()), "~", 1)
        run = Run(dt.datetime.now(dt.UTC), args.mode, args.command, args.dry_run, folder)
        extra = handover_summary(parse_samples(args.handover.read_text())) if args.handover else []
        args.doc.write_text(insert_run(args.doc.read_text(), render_run(run, results, extra)))
    except (OSError, ReportError) as err:
        print(f"conformance: {err}", file=sys.stderr)
        return 2
    print(summary_line(results))
    return 1 if any(r.result == FAILED for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
