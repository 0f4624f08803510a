"""Which policy selects a Service, and who wins when two do."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from test_compile_helpers import policy, service

from svcproxy.compile.conflicts import precedence, selects, why_wins, winner


def test_selects_by_name_or_by_labels() -> None:
    web = service("web", labels={"app": "web", "tier": "front"})
    assert selects(policy(spec={"services": ["web", "api"]}), web)
    assert not selects(policy(spec={"services": ["api"]}), web)
    assert selects(policy(spec={"serviceSelector": {"matchLabels": {"app": "web"}}}), web)
    assert not selects(policy(spec={"serviceSelector": {"matchLabels": {"app": "api"}}}), web)
    expr = {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "edge"]}]}
    assert selects(policy(spec={"serviceSelector": expr}), web)
    assert selects(policy(spec={"serviceSelector": {}}), web)  # empty selector: every Service


def test_higher_priority_wins_then_older_then_name() -> None:
    old = policy("old", {"services": ["web"]}, created="2026-01-01T00:00:00Z")
    new = policy("new", {"services": ["web"]}, created="2026-02-01T00:00:00Z")
    urgent = policy("urgent", {"services": ["web"], "priority": 10}, created="2026-03-01T00:00:00Z")
    assert winner([new, old]).metadata.name == "old"
    assert winner([new, old, urgent]).metadata.name == "urgent"
    twin_a = policy("a", {"services": ["web"]}, created="2026-01-01T00:00:00Z")
    twin_b = policy("b", {"services": ["web"]}, created="2026-01-01T00:00:00Z")
    assert winner([twin_b, twin_a]).metadata.name == "a"
    assert "higher priority (10 > 0)" in why_wins(urgent, old)
    assert "older" in why_wins(old, new)


def test_unknown_creation_time_sorts_last() -> None:
    stored = policy("stored", {"services": ["web"]}, created="2026-05-01T00:00:00Z")
    draft = policy("draft", {"services": ["web"]}, created="")
    assert winner([draft, stored]).metadata.name == "stored"


@given(
    st.lists(
        st.tuples(st.integers(-3, 3), st.integers(1, 28), st.sampled_from("abcdef")),
        min_size=1,
        max_size=6,
        unique_by=lambda t: t[2],
    ),
    st.randoms(),
)
def test_winner_does_not_depend_on_order(specs: list[tuple[int, int, str]], rnd: object) -> None:
    pols = [
        policy(name, {"services": ["web"], "priority": prio}, created=f"2026-01-{day:02d}T00:00:00Z")
        for prio, day, name in specs
    ]
    shuffled = list(pols)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    win = winner(shuffled)
    assert win is winner(pols)
    assert all(precedence(win) <= precedence(p) for p in pols)
    assert win.spec.priority == max(p.spec.priority for p in pols)
