"""The userspace balancer: schedulers, draining, retry order and ClientIP affinity (fake clock)."""

from __future__ import annotations

from collections import Counter

from svcproxy.dataplane.table import RealServer, VirtualServer
from svcproxy.dataplane.userspace.balancer import Balancer


def vs(scheduler: str = "rr", weights: tuple[int, ...] = (1, 1, 1), persistence: int = 0
       ) -> VirtualServer:
    reals = [RealServer(f"10.244.1.{i + 2}", 80, w) for i, w in enumerate(weights)]
    return VirtualServer.create("TCP", "10.96.0.10", 80, reals, scheduler=scheduler,
                                persistence=persistence)


def picks(b: Balancer, n: int, client: str = "10.99.0.2") -> list[str]:
    out = []
    for _ in range(n):
        first = b.candidates(client)[0]
        b.connected(client, first)
        b.closed(first)
        out.append(first[0])
    return out


def test_rr_alternates_and_candidates_cover_every_ready_backend() -> None:
    b = Balancer(vs())
    assert picks(b, 6) == ["10.244.1.2", "10.244.1.3", "10.244.1.4"] * 2
    assert sorted(b.candidates("c")) == [("10.244.1.2", 80), ("10.244.1.3", 80), ("10.244.1.4", 80)]


def test_draining_backend_is_never_a_candidate() -> None:
    b = Balancer(vs(weights=(1, 0, 1)))
    assert ("10.244.1.3", 80) not in b.candidates("c")
    assert "10.244.1.3" not in picks(b, 10)


def test_wrr_follows_weights() -> None:
    assert Counter(picks(Balancer(vs("wrr", (3, 1, 0))), 8)) == {"10.244.1.2": 6, "10.244.1.3": 2}


def test_lc_prefers_the_backend_with_fewest_active_connections() -> None:
    b = Balancer(vs("lc"))
    b.connected("a", ("10.244.1.2", 80))
    b.connected("b", ("10.244.1.3", 80))
    assert b.candidates("c")[0] == ("10.244.1.4", 80)


def test_sh_pins_a_client_and_spreads_clients() -> None:
    b = Balancer(vs("sh"))
    assert len(set(picks(b, 10, "10.99.0.2"))) == 1
    assert len({b.candidates(f"10.99.0.{i}")[0] for i in range(2, 40)}) == 3


def test_affinity_pins_until_the_timeout_then_lets_go() -> None:
    now = [0.0]
    b = Balancer(vs(persistence=10), clock=lambda: now[0])
    first = picks(b, 5)
    assert len(set(first)) == 1
    now[0] += 11  # timeout passed since the last connection
    assert picks(b, 1)[0] != first[0]
