"""Pure helpers of benchmarks/dataplane.py: summaries, ABBA order, ratios, the target verdict.

The benchmark itself needs root and namespaces; these are the parts whose
mistakes would silently skew its figures.
"""

from __future__ import annotations

from benchmarks import dataplane as dp


def test_summarize_pools_rounds_and_keeps_each_rounds_p50() -> None:
    out = dp.summarize([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]], errors=2)
    assert out["p50_us"] == 30
    assert out["p99_us"] == 60
    assert out["mean_us"] == 35
    assert out["requests"] == 6
    assert out["errors"] == 2
    assert out["round_p50_us"] == [20, 50]


def test_ab_order_alternates_which_path_goes_first() -> None:
    order = dp.ab_order(4)
    assert order == ["direct", "vip", "vip", "direct", "direct", "vip", "vip", "direct"]
    assert order.count("direct") == order.count("vip") == 4
    # Mean position equal for both paths: a linear drift in load hits both alike.
    assert sum(i for i, p in enumerate(order) if p == "vip") == sum(
        i for i, p in enumerate(order) if p == "direct"
    )


def test_compare_gives_vip_over_direct_and_the_paired_median() -> None:
    direct = {"p50_us": 100.0, "p99_us": 200.0, "round_p50_us": [100.0, 90.0, 110.0]}
    vip = {"p50_us": 104.0, "p99_us": 300.0, "round_p50_us": [105.0, 99.0, 110.0]}
    out = dp.compare(direct, vip)
    assert out["p50"] == 1.04
    assert out["p50_added_us"] == 4
    assert out["p99"] == 1.5
    assert out["p50_paired_median"] == 1.05  # ratios 1.05, 1.1, 1.0


def test_paired_ratio_is_the_median_of_round_by_round_ratios() -> None:
    # One stalled vip round (100 against 1000) moves the median of pairs, not by a tenth.
    assert dp.paired_ratio([1000.0, 100.0, 1100.0], [1000.0, 1000.0, 1000.0]) == 1.0
    assert dp.paired_ratio([2.0, 3.0], [1.0, 0.0]) == 2.0  # a zero direct round is left out
    assert dp.paired_ratio([], []) is None


def test_ratio_without_a_direct_figure_is_none() -> None:
    assert dp.ratio(5.0, 0.0) is None
    assert dp.ratio(3.0, 2.0) == 1.5


def test_verdict_holds_ipvs_and_iptables_to_five_percent_only() -> None:
    assert dp.verdict("iptables", 1.05)["met"] is True
    assert dp.verdict("ipvs", 1.051)["met"] is False
    assert dp.verdict("ipvs", None)["met"] is False
    assert "met" not in dp.verdict("userspace", 5.0)


def test_backend_sees_the_client_except_through_the_userspace_proxy() -> None:
    assert dp.expected_peer("iptables") == dp.CLIENT_VIP_IP
    assert dp.expected_peer("ipvs") == dp.CLIENT_VIP_IP
    assert dp.expected_peer("userspace") == dp.NODE_BACKEND_SIDE
