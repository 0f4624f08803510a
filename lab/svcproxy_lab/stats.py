"""Pure statistics of latency samples: percentiles and the summary every benchmark prints.

The one home of these figures for the benchmarks, the demo and the tests: two percentile
definitions (interpolated, and nearest-rank for the data-path benchmark), summaries, ratios
and Prometheus-histogram quantiles. Tested in tests/unit/test_lab_stats.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation between closest ranks.

    The same definition as numpy's default (``method="linear"``): with 100 samples p99
    lies between the 99th and the 100th value, so one outlier in 100 shows up in it.
    """
    if not samples:
        raise ValueError("percentile of no samples: measure at least one change")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def nearest_rank(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank: the smallest sample with at least
    ``q`` % of the samples at or below it, always one of the samples measured."""
    if not samples:
        raise ValueError("percentile of no samples: every request of the round failed")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least the first sample
    return ordered[int(rank) - 1]


def summary(samples: Sequence[float], digits: int = 4) -> dict[str, float | int]:
    """n, p50, p90, p99, max and mean of ``samples`` (seconds), rounded to ``digits``."""
    if not samples:
        return {"n": 0}
    return {
        "n": len(samples),
        "p50": round(percentile(samples, 50), digits),
        "p90": round(percentile(samples, 90), digits),
        "p99": round(percentile(samples, 99), digits),
        "max": round(max(samples), digits),
        "mean": round(sum(samples) / len(samples), digits),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator rounded to 2 digits, or None when either is missing or 0."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 2)


def histogram_delta(before: dict[float, float], after: dict[float, float]) -> dict[float, float]:
    """Cumulative bucket counts (upper bound -> count) seen between two scrapes."""
    return {le: after[le] - before.get(le, 0.0) for le in after}


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` (0..1) quantile of a cumulative Prometheus histogram, as PromQL's
    ``histogram_quantile`` estimates it: linear within the bucket that holds the rank.

    None when the histogram is empty; the highest finite bound when the rank falls in
    ``+Inf`` (the histogram cannot say more)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    low_bound, low_count = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return low_bound
            if count == low_count:
                return le
            return low_bound + (le - low_bound) * (rank - low_count) / (count - low_count)
        low_bound, low_count = le, count
    return low_bound


def histogram_summary(before: list[dict[str, dict[float, float]]],
                      after: list[dict[str, dict[float, float]]]) -> dict[str, dict[str, float | None]]:
    """Per label set, the syncs between two scrapes of each node (summed over nodes):
    count, mean, and p50/p99 estimated from the buckets. Sums travel under "+sum <labels>"."""
    merged: dict[str, dict[float, float]] = {}
    for b, a in zip(before, after, strict=True):
        for labels, buckets in a.items():
            for le, n in histogram_delta(b.get(labels, {}), buckets).items():
                merged.setdefault(labels, {})[le] = merged.get(labels, {}).get(le, 0.0) + n
    out: dict[str, dict[str, float | None]] = {}
    for labels, buckets in sorted(merged.items()):
        if labels.startswith("+sum"):
            continue
        count = buckets.get(math.inf, 0.0)
        total = merged.get(f"+sum {labels}", {}).get(0.0, 0.0)
        p50, p99 = histogram_quantile(buckets, 0.5), histogram_quantile(buckets, 0.99)
        out[labels or "all"] = {
            "syncs": count,
            "mean_s": round(total / count, 4) if count else None,
            "p50_s": None if p50 is None else round(p50, 4),
            "p99_s": None if p99 is None else round(p99, 4),
        }
    return out
