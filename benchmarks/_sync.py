"""The periodic full sync's measuring loop, shared by the iptables and the ipvs benchmark.

``sync_scale.bench_full_sync`` (iptables, host kernel) and
``full_sync_ipvs.inner`` (ipvs, in a user-mode-linux guest) build a node (netns,
proxier, agent) each in their own way, then call :func:`measure_full_sync`: the
agent's cold sync, ``repeat`` steady full syncs, and ``changes`` times one endpoint
change landing ``offset`` s into a full sync run by the agent's own sync loop. What
differs is only how each sees what reached the kernel: the iptables-restore inputs or
the IPVS netlink batches, behind an :class:`Observer`. Also home of ``log``,
``median`` and ``program``, which the benchmarks in this folder share.

svcproxy is imported inside the functions, after ``sync_scale`` has picked the sources
to measure (``--src``, see ``_source.py``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from benchmarks._report import log

if TYPE_CHECKING:
    from svcproxy.agent.agent import Agent
    from svcproxy.agent.convert import DesiredProgram
    from svcproxy.dataplane.table import RealServer, VirtualServer


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def program(mode: str, vs: VirtualServer, tag: str) -> DesiredProgram:
    from svcproxy.agent.convert import DesiredProgram

    return DesiredProgram(vs.owner, tag, {mode: (vs,)})


class Observer:
    """What a benchmark sees of the writes that reach the kernel (one subclass per mode).

    ``clear`` forgets the writes seen so far; ``written`` describes those since, as JSON
    fields of the report (e.g. inputs and lines restored, operations sent); ``landed``
    is the end time (``time.monotonic``) of the first write holding ``marker``, None
    while none did; ``after_steady`` adds fields measured once after the steady syncs.
    """

    def clear(self) -> None:
        raise NotImplementedError

    def written(self) -> dict[str, Any]:
        raise NotImplementedError

    def landed(self, marker: RealServer) -> float | None:
        raise NotImplementedError

    def after_steady(self) -> dict[str, Any]:
        return {}


async def sync_loop(agent: Agent, stop: asyncio.Event, fulls: list[float]) -> None:
    """The agent's sync loop (``svcproxy.agent.main``), polling every 2 ms; ``fulls``
    gets the duration of every full sync it ran."""
    while not stop.is_set():
        delay = agent.tracker.due_at() - time.monotonic()
        if delay > 0:
            await asyncio.sleep(min(delay, 0.002))
            continue
        start = time.monotonic()
        outcome = await agent.run_due()
        if outcome is not None and outcome.batch.full:
            fulls.append(time.monotonic() - start)


def timed_sync(agent: Agent, loop: asyncio.AbstractEventLoop) -> float:
    """Seconds the agent takes to run the batch due now; fails with its first errors."""
    batch = agent.tracker.take(time.monotonic())
    assert batch is not None
    start = time.monotonic()
    outcome = loop.run_until_complete(agent.sync(batch))
    took = time.monotonic() - start
    assert outcome.ok, [str(e) for r in outcome.results for e in r.errors][:3]
    return took


def measure_full_sync(agent: Agent, loop: asyncio.AbstractEventLoop, mode: str,  # noqa: PLR0917
                      table: list[VirtualServer], entry: dict[str, Any], observer: Observer, *,
                      repeat: int, changes: int, offset: float, label: str) -> dict[str, Any]:
    """Fill ``entry`` (a size's report, holding what the caller put first) with:

    ``cold_sync_seconds``: the agent's first sync of ``table`` (in ``mode``);
    ``steady_full_seconds`` (+ median): ``repeat`` full syncs with nothing to change, and
    what the last one wrote (``observer.written()``); ``change_during_full_seconds`` (+
    median): ``changes`` times, a full sync starts in the agent's own sync loop and
    ``offset`` s later the first Service's last endpoint becomes a new address:port; the
    latency is upsert -> the end of the write holding it (the kernel has it), and
    ``full_sync_with_change_seconds`` the duration of that full sync.
    """
    from svcproxy.dataplane.table import RealServer

    n = entry["services"]
    agent.replace_all(program(mode, vs, "v0") for vs in table)
    entry["cold_sync_seconds"] = round(timed_sync(agent, loop), 3)
    log(f"{label} {n}: cold {entry['cold_sync_seconds']} s")
    steady: list[float] = []
    written: dict[str, Any] = {}
    for _ in range(repeat):
        observer.clear()
        agent.tracker.request_full()
        steady.append(timed_sync(agent, loop))
        written = observer.written()
    extra = observer.after_steady()
    entry.update(extra)
    entry["steady_full_seconds"] = [round(t, 3) for t in steady]
    entry["steady_full_median_seconds"] = round(median(steady), 3)
    entry.update(written)
    log(f"{label} {n}: steady {entry['steady_full_seconds']} s, "
        + ", ".join(f"{k} {v}" for k, v in {**written, **extra}.items()))
    first = table[0]
    latencies: list[float] = []
    durations: list[float] = []

    async def one(i: int) -> float:
        marker = RealServer("10.244.255.1", 9000 + i)
        changed = first.with_reals([*first.real_servers[:-1], marker]).canonical()
        stop = asyncio.Event()
        fulls: list[float] = []
        runner = asyncio.ensure_future(sync_loop(agent, stop, fulls))
        agent.tracker.request_full()
        await asyncio.sleep(offset)
        observer.clear()
        agent.upsert(program(mode, changed, f"c{i}"))
        landed = time.monotonic()
        while (done := observer.landed(marker)) is None:
            await asyncio.sleep(0.002)
        while not fulls:
            await asyncio.sleep(0.005)
        stop.set()
        await runner
        durations.append(fulls[0])
        return done - landed

    for i in range(changes):
        latencies.append(loop.run_until_complete(one(i)))
    entry["change_during_full_seconds"] = [round(t, 3) for t in latencies]
    entry["change_during_full_median_seconds"] = round(median(latencies), 3)
    entry["full_sync_with_change_seconds"] = [round(t, 3) for t in durations]
    log(f"{label} {n}: change during a full sync {entry['change_during_full_seconds']} s "
        f"(full syncs {entry['full_sync_with_change_seconds']} s)")
    return entry
