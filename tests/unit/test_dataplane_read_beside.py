"""read_beside: partial syncs run beside a full sync's read, for a bounded time when asked."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from svcproxy.dataplane.proxier import read_beside


def test_between_runs_until_the_read_ends_without_a_bound() -> None:
    finished = threading.Event()

    def read() -> str:
        finished.set()
        return "table"

    async def between(window: asyncio.Future[Any]) -> frozenset[str]:
        await window
        assert finished.is_set(), "the window ended before the read did"
        return frozenset({"ns/web"})

    assert asyncio.run(read_beside(read, between)) == ("table", frozenset({"ns/web"}))


def test_a_bounded_window_ends_while_the_read_goes_on_and_the_read_is_still_awaited() -> None:
    # The read waits until the partial syncs have stopped: it can only end after the
    # window closed, so the window must close on its bound, not on the read.
    window_closed = threading.Event()
    seen: list[bool] = []

    def read() -> str:
        assert window_closed.wait(30), "the window never closed while the read was going on"
        return "table"

    async def between(window: asyncio.Future[Any]) -> frozenset[str]:
        await window
        window_closed.set()
        seen.append(True)
        return frozenset()

    assert asyncio.run(read_beside(read, between, beside_for=0.05)) == ("table", frozenset())
    assert seen == [True]
