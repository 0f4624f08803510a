"""The change tracker: bursts coalesce, syncs are rate-bounded, full syncs come on time."""

from __future__ import annotations

from svcproxy.agent.tracker import ChangeTracker


def test_first_batch_is_full_and_bursts_coalesce() -> None:
    t = ChangeTracker(min_interval=0.1, full_interval=60, now=0.0)
    for i in range(100):
        t.changed(f"ns/s{i}", now=0.001 * i)
    batch = t.take(0.2)
    assert batch is not None and batch.full
    assert len(batch.owners) == 100
    assert batch.seen["ns/s0"] == 0.0
    assert t.take(0.25) is None  # nothing pending


def test_partial_batches_respect_min_interval() -> None:
    t = ChangeTracker(min_interval=0.1, full_interval=60, now=0.0)
    assert t.take(0.0) is not None  # initial full
    t.changed("ns/a", now=0.01)
    t.changed("ns/a", now=0.02)  # the older change time is kept
    t.changed("ns/b", now=0.03)
    assert t.due_at() == 0.1
    assert t.take(0.05) is None  # too soon after the last sync
    batch = t.take(0.1)
    assert batch is not None and not batch.full
    assert batch.owners == {"ns/a", "ns/b"}
    assert batch.seen["ns/a"] == 0.01


def test_full_sync_every_interval_and_it_covers_pending_owners() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, now=0.0)
    t.take(0.0)
    assert t.take(30) is None
    assert t.due_at() == 60
    t.changed("ns/a", now=59.99)
    batch = t.take(60)
    assert batch is not None and batch.full and batch.owners == {"ns/a"}
    assert t.due_at() == 120


def test_retry_comes_back_after_interval_with_original_seen_time() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, retry_interval=1.0, now=0.0)
    t.take(0.0)
    t.changed("ns/a", now=1.0)
    batch = t.take(1.1)
    assert batch is not None
    t.retry(["ns/a"], now=1.2, seen=batch.seen)
    assert t.take(1.5) is None
    again = t.take(2.2)
    assert again is not None and again.owners == {"ns/a"} and again.seen["ns/a"] == 1.0


def test_change_during_retry_wait_syncs_at_once() -> None:
    t = ChangeTracker(min_interval=0.05, full_interval=60, retry_interval=5.0, now=0.0)
    t.take(0.0)
    t.retry(["ns/a"], now=0.1, seen={"ns/a": 0.05})
    t.changed("ns/a", now=0.2)
    batch = t.take(0.3)
    assert batch is not None and batch.owners == {"ns/a"} and batch.seen["ns/a"] == 0.05
