"""The statistics helpers of the lab benchmarks (benchmarks/_lab/stats.py): percentiles and summaries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from _lab.stats import percentile, ratio, summary


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [float(x) for x in range(1, 101)]  # 1..100
    assert percentile(samples, 50) == pytest.approx(50.5)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 100) == 100.0


def test_percentile_ignores_input_order_and_sees_one_outlier_in_p99() -> None:
    samples = [0.1] * 99 + [5.0]
    shuffled = samples[50:] + samples[:50]
    assert percentile(shuffled, 50) == pytest.approx(0.1)
    assert percentile(shuffled, 99) > 0.1


def test_percentile_of_one_sample_is_that_sample() -> None:
    assert percentile([0.25], 99) == 0.25


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)


def test_summary_and_ratio() -> None:
    s = summary([0.3, 0.1, 0.2])
    assert s == {"n": 3, "p50": 0.2, "p90": 0.28, "p99": 0.298, "max": 0.3, "mean": 0.2}
    assert summary([]) == {"n": 0}
    assert ratio(1.0, 0.25) == 4.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None
