"""The lab's statistics (svcproxy_lab.stats), shared by the benchmarks: percentiles and summaries."""

from __future__ import annotations

import math

import pytest

from svcproxy_lab.stats import (
    histogram_delta,
    histogram_quantile,
    histogram_summary,
    nearest_rank,
    percentile,
    ratio,
    summary,
)


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


def test_histogram_quantile_interpolates_within_the_bucket() -> None:
    # 10 observations <= 0.1, 10 more <= 0.5: the median is the 10th, at the 0.1 bound;
    # p75 is halfway through the second bucket.
    buckets = {0.1: 10.0, 0.5: 20.0, math.inf: 20.0}
    assert histogram_quantile(buckets, 0.5) == pytest.approx(0.1)
    assert histogram_quantile(buckets, 0.75) == pytest.approx(0.3)


def test_histogram_quantile_in_the_inf_bucket_is_the_highest_bound() -> None:
    assert histogram_quantile({0.1: 1.0, 1.0: 1.0, math.inf: 5.0}, 0.99) == 1.0


def test_histogram_quantile_of_nothing_is_none() -> None:
    assert histogram_quantile({0.1: 0.0, math.inf: 0.0}, 0.5) is None
    assert histogram_quantile({}, 0.5) is None


def test_histogram_delta_leaves_only_what_came_between_scrapes() -> None:
    before = {0.1: 5.0, 1.0: 8.0, math.inf: 9.0}
    after = {0.1: 6.0, 1.0: 12.0, math.inf: 13.0}
    assert histogram_delta(before, after) == {0.1: 1.0, 1.0: 4.0, math.inf: 4.0}


def test_histogram_summary_sums_nodes_and_keeps_only_the_churn() -> None:
    node_before = {"kind=partial": {0.1: 2.0, math.inf: 2.0}, "+sum kind=partial": {0.0: 0.1}}
    node_after = {"kind=partial": {0.1: 4.0, math.inf: 6.0}, "+sum kind=partial": {0.0: 4.1}}
    got = histogram_summary([node_before, node_before], [node_after, node_after])
    assert got == {"kind=partial": {"syncs": 8.0, "mean_s": 1.0, "p50_s": 0.1, "p99_s": 0.1}}


def test_nearest_rank_is_always_a_sample() -> None:
    samples = [float(x) for x in range(100, 0, -1)]  # 1..100, unsorted
    assert nearest_rank(samples, 50) == 50
    assert nearest_rank(samples, 99) == 99
    assert nearest_rank(samples, 100) == 100
    assert nearest_rank(samples, 0) == 1
    assert nearest_rank([7.0], 99) == 7
    assert nearest_rank([1.0, 2.0, 3.0, 4.0], 50) == 2  # ceil(4 * 0.5) = 2nd
    assert nearest_rank([float(x) for x in range(1, 11)], 95) == 10  # ceil(9.5): rounds up


def test_nearest_rank_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no samples"):
        nearest_rank([], 50)
    with pytest.raises(ValueError, match="outside"):
        nearest_rank([1.0], 101)
