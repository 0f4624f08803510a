"""The demo's verdicts and grids (lab/svcproxy_lab/demoview.py) read the counts right.

Each verdict is checked on a grid where it holds and on one where it does not, so a
verdict that always says the same thing fails here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from svcproxy_lab import demoview
from svcproxy_lab.demoview import Outcome

PODS = ["echo-5d9c7-aaaaa", "echo-5d9c7-bbbbb", "echo-5d9c7-ccccc"]


def outcome(expect: str, rows: dict[str, dict[str, int]], weights: dict[str, int] | None = None,
            requests: int = 6) -> Outcome:
    return Outcome(name="svc", title="t", expect=expect, pods=PODS,
                   weights=weights or dict.fromkeys(PODS, 1), requests=requests,
                   grid={c: Counter(r) for c, r in rows.items()})


def test_pinned_counts_clients_answered_by_one_pod() -> None:
    pinned = outcome("pinned", {"a": {PODS[0]: 6}, "b": {PODS[2]: 6}, "c": {PODS[0]: 6}})
    mixed = outcome("pinned", {"a": {PODS[0]: 6}, "b": {PODS[1]: 3, PODS[2]: 3}})
    assert demoview.pinned(pinned) == (3, 3)
    assert demoview.pinned(mixed) == (1, 2)
    assert demoview.verdict(pinned).startswith("3/3 clients pinned")
    assert "(2 of 3 Pods in use)" in demoview.verdict(pinned)


def test_pinned_ignores_clients_without_answers() -> None:
    o = outcome("pinned", {"a": {PODS[1]: 6}, "b": {}})
    assert demoview.pinned(o) == (1, 1)


def test_evenness_is_the_largest_distance_from_an_even_split() -> None:
    even = outcome("even", {"a": dict.fromkeys(PODS, 2), "b": dict.fromkeys(PODS, 2)})
    skewed = outcome("even", {"a": {PODS[0]: 6}, "b": dict.fromkeys(PODS, 2)})
    assert demoview.evenness(even) == 0
    assert demoview.evenness(skewed) == 4  # 6 where 2 was fair


def test_shares_follow_weights() -> None:
    weights = {PODS[0]: 4, PODS[1]: 4, PODS[2]: 1}
    o = outcome("weighted", {"a": {PODS[0]: 8, PODS[1]: 8, PODS[2]: 2}}, weights, requests=18)
    assert demoview.expected_share(o) == pytest.approx({PODS[0]: 4 / 9, PODS[1]: 4 / 9,
                                                        PODS[2]: 1 / 9})
    assert demoview.observed_share(o) == pytest.approx(demoview.expected_share(o))
    assert "echo-ccccc 11% (weight 1: 11%)" in demoview.verdict(o)


def test_short_drops_the_replicaset_hash() -> None:
    assert demoview.short("web-canary-7c9d8f-x2kfj") == "web-canary-x2kfj"
    assert demoview.short("client") == "client"


def test_grid_draws_a_bar_per_cell_scaled_to_the_client_row() -> None:
    o = outcome("pinned", {"node-1 .254": {PODS[1]: 6}, "node-2 .253": {PODS[0]: 3}})
    lines = demoview.grid(o).splitlines()
    assert lines[1].split() == ["client", "echo-aaaaa", "echo-bbbbb", "echo-ccccc"]
    row1, row2 = lines[2], lines[3]
    assert row1.startswith("node-1 .254") and "█" * demoview.BAR + " 6" in row1
    assert "█" * (demoview.BAR // 2) + " 3" in row2 and "█" * (demoview.BAR // 2 + 1) not in row2
    assert row1.split()[2] == "." and row1.split()[-1] == "."


def test_table_has_one_row_per_service() -> None:
    a = outcome("even", {})
    a.status = {"mode": "ipvs (iptables on node-1)", "scheduler": "rr", "programmed": "3/3"}
    b = outcome("random", {})
    b.name, b.status = "other", {"mode": "iptables", "scheduler": "-", "programmed": "2/3"}
    lines = demoview.table([a, b]).splitlines()
    assert lines[0].split() == ["SERVICE", "POLICY", "MODE", "SCHEDULER", "AFFINITY", "PROGRAMMED"]
    assert lines[1].split()[-1] == "3/3" and "ipvs (iptables on node-1)" in lines[1]
    assert lines[2].split()[0] == "other" and lines[2].split()[-1] == "2/3"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "out" / "grid.png"
    demoview.plot([outcome("even", {"a": dict.fromkeys(PODS, 2)})], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_add_counts_answers_per_pod_and_failures_with_missing_requests() -> None:
    o = outcome("even", {}, requests=4)
    o.add("a", [PODS[0], PODS[1], None, PODS[0]])
    o.add("b", [PODS[2]])  # three requests the client never reported
    assert o.grid == {"a": Counter({PODS[0]: 2, PODS[1]: 1}), "b": Counter({PODS[2]: 1})}
    assert o.failed == 1 + 3 and o.answered() == 4
