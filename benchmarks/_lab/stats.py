"""Pure statistics of latency samples: percentiles and the summary every benchmark prints.

Used by every lab benchmark and by ``plot.py``; tested in tests/unit/test_benchmarks_stats.py.
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
