"""The pure parts of ``programming_latency.py``: change schedules, turn order, summaries.

``schedule`` draws one seeded open-loop sequence of changes per (size, rate): Poisson
arrivals (exponential inter-arrival times) and, for each arrival, one user action on one
object. The harness replays the same sequence for every system. ``rotation`` gives the
order of the systems in each repetition (A B C, B C A, C A B, ...). ``summarize`` turns the
per-change records of a run into per-repetition percentiles and their median and spread
over repetitions; ``readme_table`` renders those as the Markdown table that
benchmarks/README.md carries. No I/O: tested in tests/unit/test_benchmarks_latency_schedule.py.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from svcproxy_lab.stats import percentile

KINDS = ("endpoint", "add", "remove", "affinity")
MIX = {"endpoint": 60, "add": 15, "remove": 15, "affinity": 10}  # percent of the changes
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class Change:
    """One user action: ``at`` seconds after the start of the sequence, on ``service``."""

    index: int
    at: float
    kind: str
    service: str


def service_name(index: int) -> str:
    return f"svc-{index}"


def schedule(size: int, rate: float, changes: int, seed: int) -> list[Change]:
    """``changes`` changes over the ``size`` Services svc-0..svc-(size-1), arriving at ``rate``/s.

    Every remove and every affinity change touches a Service no other change of the sequence
    touches (a later change cannot overtake it), adds create new Services after the base
    ones, and endpoint replacements go to the remaining base Services. The same arguments
    give the same sequence (the seed mixes in size and rate)."""
    if rate <= 0 or changes <= 0:
        raise ValueError(f"rate {rate} and changes {changes} must be positive")
    rng = random.Random(f"{seed}:{size}:{rate}")
    kinds = [k for k in KINDS for _ in range(changes * MIX[k] // 100)]
    kinds += ["endpoint"] * (changes - len(kinds))
    rng.shuffle(kinds)
    own = kinds.count("remove") + kinds.count("affinity")
    if size < own + 1:
        raise ValueError(f"{size} Services cannot take {own} removes and affinity changes plus "
                         "endpoint changes: raise --sizes or lower --changes")
    base = [service_name(i) for i in range(size)]
    owned = rng.sample(base, own)
    shared = [name for name in base if name not in owned]
    out: list[Change] = []
    at = 0.0
    added = 0
    for index, kind in enumerate(kinds):
        at += rng.expovariate(rate)
        if kind in ("remove", "affinity"):
            name = owned.pop()
        elif kind == "add":
            name = service_name(size + added)
            added += 1
        else:
            name = rng.choice(shared)
        out.append(Change(index, round(at, 6), kind, name))
    return out


def rotation(systems: Sequence[str], repetition: int) -> list[str]:
    """The order of ``systems`` in ``repetition`` (0-based): rotated left once per repetition."""
    k = repetition % len(systems)
    return [*systems[k:], *systems[:k]]


def _stats(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {f"p{q}": None for q in QUANTILES}
    return {f"p{q}": round(percentile(latencies, q), 4) for q in QUANTILES}


def _spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(known), 4), "min": min(known), "max": max(known)}


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per (size, system, rate, kind, repetition): n, failures, p50/p90/p99 (kind "all" too);
    then per (size, system, rate, kind): the median and min..max of each over repetitions."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        for kind in ("all", r["kind"]):
            groups.setdefault((r["size"], r["system"], r["rate"], kind, r["repetition"]), []).append(r)
    per_rep = []
    for (size, system, rate, kind, rep), rs in sorted(groups.items(), key=lambda g: str(g[0])):
        latencies = [r["latency"] for r in rs if r["latency"] is not None]
        per_rep.append({"size": size, "system": system, "rate": rate, "kind": kind,
                        "repetition": rep, "n": len(rs), "failures": len(rs) - len(latencies),
                        **_stats(latencies)})
    over: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in per_rep:
        over.setdefault((row["size"], row["system"], row["rate"], row["kind"]), []).append(row)
    overall = []
    for (size, system, rate, kind), rows in over.items():
        overall.append({"size": size, "system": system, "rate": rate, "kind": kind,
                        "repetitions": len(rows), "changes": sum(r["n"] for r in rows),
                        "failures": sum(r["failures"] for r in rows),
                        **{f"p{q}": _spread([r[f"p{q}"] for r in rows]) for q in QUANTILES}})
    return {"per_repetition": per_rep, "over_repetitions": overall}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def readme_table(summary: dict[str, list[dict[str, Any]]], kind: str = "all") -> str:
    """The Markdown table of the README: per size, rate and system, the median and min..max
    over repetitions of p50 / p90 / p99 (ms) and the failures over all repetitions, for
    changes of ``kind``."""
    lines = ["| Services | changes/s | system | p50 ms | p90 ms | p99 ms | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = [r for r in summary["over_repetitions"] if r["kind"] == kind]
    for r in sorted(rows, key=lambda r: (r["size"], r["rate"], r["system"])):
        cells = [f"{_ms(r[f'p{q}']['median'])} ({_ms(r[f'p{q}']['min'])}..{_ms(r[f'p{q}']['max'])})"
                 for q in QUANTILES]
        lines.append(f"| {r['size']} | {r['rate']:g} | {r['system']} | {' | '.join(cells)} "
                     f"| {r['failures']} of {r['changes']} |")
    return "\n".join(lines) + "\n"


def lag_summary(lags: list[float]) -> dict[str, float | int | None]:
    """The end detector's own lag (seconds from a known nftables write to the reader's stamp)."""
    if not lags:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(lags), "p50": round(percentile(lags, 50), 5),
            "p99": round(percentile(lags, 99), 5), "max": round(max(lags), 5)}
