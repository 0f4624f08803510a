"""The pure parts of the programming-latency harness (benchmarks/latency_schedule.py):
open-loop schedules, rotated turn order, the summary table; and that the README's table is
the one the JSON's records give (benchmarks/results/programming_latency.json)."""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import pytest

from benchmarks import latency_schedule as ls

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "programming_latency.json"
README = REPO / "benchmarks" / "README.md"
BEGIN, END = "<!-- programming_latency table begin -->", "<!-- programming_latency table end -->"


def test_the_same_size_rate_and_seed_give_the_same_sequence() -> None:
    assert ls.schedule(50, 5, 40, 9) == ls.schedule(50, 5, 40, 9)
    assert ls.schedule(50, 5, 40, 9) != ls.schedule(50, 20, 40, 9)
    assert ls.schedule(50, 5, 40, 9) != ls.schedule(50, 5, 40, 10)


def test_arrivals_are_poisson_at_the_rate() -> None:
    changes = ls.schedule(2000, 20, 1500, 3)
    gaps = [b.at - a.at for a, b in itertools.pairwise(changes)]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(1 / 20, rel=0.08)
    # Exponential: the standard deviation equals the mean (a fixed gap would give 0).
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.12)


def test_mix_and_targets_keep_changes_from_overtaking_each_other() -> None:
    changes = ls.schedule(30, 5, 20, 1)
    kinds = [c.kind for c in changes]
    assert (kinds.count("endpoint"), kinds.count("add"), kinds.count("remove"),
            kinds.count("affinity")) == (12, 3, 3, 2)
    own = [c.service for c in changes if c.kind in ("remove", "affinity")]
    assert len(set(own)) == len(own)
    others = {c.service for c in changes if c.kind not in ("remove", "affinity")}
    assert not set(own) & others
    assert sorted(c.service for c in changes if c.kind == "add") == ["svc-30", "svc-31", "svc-32"]
    assert all(int(c.service[4:]) < 30 for c in changes if c.kind != "add")


def test_too_few_services_for_the_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="raise --sizes"):
        ls.schedule(4, 5, 40, 1)


def test_rotation_puts_every_system_in_every_position() -> None:
    systems = ["A", "B", "C"]
    orders = [ls.rotation(systems, r) for r in range(3)]
    assert orders == [["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"]]
    for position in range(3):
        assert sorted(o[position] for o in orders) == systems


def record(system: str, rep: int, kind: str, latency: float | None) -> dict[str, object]:
    return {"size": 20, "system": system, "rate": 2.0, "repetition": rep, "kind": kind,
            "latency": latency, "failure": None if latency is not None else "not seen"}


FIXTURE = [
    record("kp", 0, "endpoint", 0.1), record("kp", 0, "endpoint", 0.2), record("kp", 0, "add", 0.3),
    record("kp", 1, "endpoint", 0.5), record("kp", 1, "add", None), record("kp", 1, "add", 0.7),
    record("sp", 0, "endpoint", 0.05),
]


def test_summary_per_repetition_and_over_repetitions() -> None:
    s = ls.summarize(FIXTURE)
    rows = {(r["system"], r["kind"], r["repetition"]): r for r in s["per_repetition"]}
    all0 = rows[("kp", "all", 0)]
    # 0.1, 0.2, 0.3 interpolated: p50 0.2, p90 0.28, p99 0.298.
    assert (all0["n"], all0["failures"], all0["p50"], all0["p90"], all0["p99"]) == (3, 0, 0.2, 0.28, 0.298)
    all1 = rows[("kp", "all", 1)]
    assert (all1["n"], all1["failures"], all1["p50"]) == (3, 1, 0.6)
    assert rows[("kp", "add", 1)]["p50"] == 0.7
    over = {(r["system"], r["kind"]): r for r in s["over_repetitions"]}
    kp = over[("kp", "all")]
    assert kp["repetitions"] == 2 and kp["failures"] == 1 and kp["changes"] == 6
    assert kp["p50"] == {"median": 0.4, "min": 0.2, "max": 0.6}
    assert over[("sp", "endpoint")]["p99"] == {"median": 0.05, "min": 0.05, "max": 0.05}


def test_readme_table_rows_come_from_the_summary() -> None:
    table = ls.readme_table(ls.summarize(FIXTURE)).splitlines()
    # kp p90: 0.28 (rep 0) and 0.5 + 0.2 * 0.9 = 0.68 (rep 1, the failed change left out).
    assert table[2] == "| 20 | 2 | kp | 400 (200..600) | 480 (280..680) | 498 (298..698) | 1 of 6 |"
    assert len(table) == 4


def test_detector_lag_percentiles() -> None:
    lag = ls.lag_summary([0.001, 0.002, 0.003, 0.010])
    assert lag["n"] == 4 and lag["p50"] == 0.0025 and lag["max"] == 0.01
    assert ls.lag_summary([])["p99"] is None


def test_the_readme_table_is_the_one_the_json_gives() -> None:
    if not RESULTS.exists():
        pytest.skip(f"{RESULTS.relative_to(REPO)} not produced yet by the open-loop harness: run "
                    "benchmarks/programming_latency.py --out with it (the old figures are withdrawn)")
    result = json.loads(RESULTS.read_text())
    if result.get("harness") != "open-loop-v2":
        pytest.skip(f"{RESULTS.relative_to(REPO)} comes from another harness than open-loop-v2")
    summary = ls.summarize(result["records"])
    assert summary == result["summary"], "the JSON's summary is not the one its records give"
    text = README.read_text()
    assert BEGIN in text and END in text, f"benchmarks/README.md needs {BEGIN} ... {END} around the table"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert block == ls.readme_table(summary).strip()
