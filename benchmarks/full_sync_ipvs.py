"""The periodic full sync in ipvs mode, inside a user-mode-linux guest; prints JSON.

Run by ``sync_scale.py --full-sync --full-sync-modes ipvs`` (``bench_full_sync_ipvs``
boots the guest and runs this file in it, once per source tree: the baseline's with
``--src``, then this checkout's). Per table size, in a netns of its own: the agent
with the real ipvs proxier (it calls ``sync_full`` where the sources have it) loads
``n`` Services x 10 real servers, then times ``--full-repeat`` full syncs with
nothing to change, then ``--changes`` times a full sync in the agent's own sync loop
with one endpoint change landing ``--offset`` s into it: the latency is upsert -> the
end of the netlink batch that added the new real server (the kernel has it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# sync_scale puts the sources to measure (--src) first on sys.path: svcproxy from there.
from sync_scale import (
    Agent,
    ChangeTracker,
    RealServer,
    VirtualServer,
    _node_netns,
    _source,
    _sync_loop,
    log,
    median,
    program,
    rss_mb,
    servers,
)


def inner(sizes: list[int], repeat: int, changes: int, offset: float) -> dict[str, Any]:
    """In the guest: one netns, one agent and one event loop per size (the proxier's
    worker threads are created after setns, so their sockets open in that netns)."""
    from pyroute2.netns import setns

    from svcproxy.dataplane.modes import DataplaneConfig, build_proxier

    report: dict[str, Any] = {"offset_seconds": offset, "sizes": [], "kernel": os.uname().release}
    for n in sizes:
        ns = f"bench-full-{os.getpid()}-{n}"  # one per run: baseline and ours share the guest
        _node_netns(ns)
        setns(ns)
        loop = asyncio.new_event_loop()
        proxier = build_proxier("ipvs", DataplaneConfig(set_sysctls=False))
        batches: list[tuple[float, list[Any]]] = []  # (end time, operations) per netlink batch
        kernel = proxier._kernel  # type: ignore[attr-defined]
        execute = kernel.execute

        def recorded(ops: Any, execute: Any = execute, batches: list[Any] = batches) -> Any:
            try:
                return execute(ops)
            finally:
                batches.append((time.monotonic(), list(ops)))

        kernel.execute = recorded
        agent = Agent({"ipvs": proxier}, node_name=f"bench-{n}",
                      tracker=ChangeTracker(min_interval=0.05, full_interval=1e9))
        table = servers(n)
        agent.replace_all(program("ipvs", vs, "v0") for vs in table)
        entry: dict[str, Any] = {"services": n, "real_servers_each": 10,
                                 "has_sync_full": hasattr(proxier, "sync_full")}
        start = time.monotonic()
        batch = agent.tracker.take(start)
        assert batch is not None
        assert loop.run_until_complete(agent.sync(batch)).ok
        entry["cold_sync_seconds"] = round(time.monotonic() - start, 3)
        log(f"ipvs full_sync {n}: cold {entry['cold_sync_seconds']} s")
        steady: list[tuple[float, int]] = []
        for _ in range(repeat):
            batches.clear()
            agent.tracker.request_full()
            batch = agent.tracker.take(time.monotonic())
            assert batch is not None
            start = time.monotonic()
            assert loop.run_until_complete(agent.sync(batch)).ok
            steady.append((time.monotonic() - start, sum(len(ops) for _, ops in batches)))
        dump_start = time.monotonic()
        kernel.dump()
        entry["dump_seconds"] = round(time.monotonic() - dump_start, 3)
        entry["steady_full_seconds"] = [round(t, 3) for t, _ in steady]
        entry["steady_full_median_seconds"] = round(median([t for t, _ in steady]), 3)
        entry["steady_full_operations"] = steady[-1][1]
        log(f"ipvs full_sync {n}: steady {entry['steady_full_seconds']} s, {steady[-1][1]} ops,"
            f" dump {entry['dump_seconds']} s")
        first = table[0]
        latencies: list[float] = []
        durations: list[float] = []
        for i in range(changes):
            marker = RealServer("10.244.255.1", 9000 + i)
            changed = first.with_reals([*first.real_servers[:-1], marker]).canonical()

            async def one(changed: VirtualServer = changed, marker: RealServer = marker, *,
                          i: int = i, agent: Agent = agent, batches: list[Any] = batches,
                          durations: list[float] = durations) -> float:
                stop = asyncio.Event()
                fulls: list[float] = []
                runner = asyncio.ensure_future(_sync_loop(agent, stop, fulls))
                agent.tracker.request_full()
                await asyncio.sleep(offset)
                batches.clear()
                agent.upsert(program("ipvs", changed, f"c{i}"))
                landed = time.monotonic()

                def done(batches: list[Any] = batches) -> float | None:
                    return next((t for t, ops in batches for op in ops
                                 if op.real_server == marker), None)

                while done() is None:
                    await asyncio.sleep(0.002)
                while not fulls:
                    await asyncio.sleep(0.005)
                stop.set()
                await runner
                durations.append(fulls[0])
                return (done() or landed) - landed

            latencies.append(loop.run_until_complete(one()))
        entry["change_during_full_seconds"] = [round(t, 3) for t in latencies]
        entry["change_during_full_median_seconds"] = round(median(latencies), 3)
        entry["full_sync_with_change_seconds"] = [round(t, 3) for t in durations]
        log(f"ipvs full_sync {n}: change during a full sync {entry['change_during_full_seconds']} s"
            f" (full syncs {entry['full_sync_with_change_seconds']} s)")
        report["sizes"].append(entry)
        loop.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)  # the kernel state goes with our sockets
    report["agent_rss_mb"] = rss_mb()
    return report


def bench_full_sync_ipvs(sizes: list[int], repeat: int, changes: int, offset: float,
                         baseline_src: str | None) -> dict[str, Any]:
    """On the host: one guest; the baseline's sources first (if given), then ours."""
    from svcproxy.lab.uml import booted_guest

    mem = "2048M" if max(sizes) >= 5000 else "1024M"
    out: dict[str, Any] = {}
    args = [",".join(map(str, sizes)), "--full-repeat", str(repeat), "--changes", str(changes),
            "--offset", str(offset)]
    with tempfile.TemporaryDirectory() as state, booted_guest("bench-full-ipvs", state, mem=mem) as guest:
        for name, src in (("baseline", baseline_src), ("after", _source())):
            if src is None:
                continue
            log(f"ipvs full_sync: {name} ({src})")
            proc = guest.run([sys.executable, str(Path(__file__).resolve()), "--inner", *args,
                              "--src", src], timeout=3600)
            out[name] = (json.loads(proc.stdout.decode().strip().splitlines()[-1])
                         if proc.returncode == 0 else {"error": proc.stderr.decode()[-2000:]})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", required=True, help="table sizes (in the guest)")
    parser.add_argument("--full-repeat", type=int, default=3)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--offset", type=float, default=0.1)
    parser.add_argument("--src", help="svcproxy sources to measure (read by sync_scale._source)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.inner.split(",") if s]
    print(json.dumps(inner(sizes, args.full_repeat, args.changes, args.offset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
