"""The periodic full sync in ipvs mode, inside a user-mode-linux guest; prints JSON.

Run by ``sync_scale.py --full-sync --full-sync-modes ipvs`` (``bench_full_sync_ipvs``
boots the guest and runs this file in it, once per source tree: the baseline's with
``--src``, then this checkout's). Per table size, in a netns of its own: the agent
with the real ipvs proxier (it calls ``sync_full`` where the sources have it) loads
``n`` Services x 10 real servers, then times ``--full-repeat`` full syncs with
nothing to change, then ``--changes`` times a full sync in the agent's own sync loop
with one endpoint change landing ``--offset`` s into it (``_sync.measure_full_sync``, as
the iptables benchmark), seen through the netlink batches: the latency is upsert -> the
end of the batch that added the new real server (the kernel has it).
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
from typing import Any

# Importing sync_scale picks the sources to measure (--src, re-executing if need be) before
# svcproxy is imported (_sync imports it only inside its functions).
from benchmarks._report import log
from benchmarks._source import module_argv
from benchmarks._sync import Observer, measure_full_sync
from benchmarks.sync_scale import (
    Agent,
    ChangeTracker,
    RealServer,
    _node_netns,
    _source,
    rss_mb,
    servers,
)


class Batches(Observer):
    """The IPVS operations a full sync sent, per netlink batch: (end time, operations)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.batches: list[tuple[float, list[Any]]] = []
        execute = kernel.execute

        def recorded(ops: Any) -> Any:
            try:
                return execute(ops)
            finally:
                self.batches.append((time.monotonic(), list(ops)))

        kernel.execute = recorded

    def clear(self) -> None:
        self.batches.clear()

    def written(self) -> dict[str, Any]:
        return {"steady_full_operations": sum(len(ops) for _, ops in self.batches)}

    def landed(self, marker: RealServer) -> float | None:
        return next((t for t, ops in self.batches for op in ops if op.real_server == marker), None)

    def after_steady(self) -> dict[str, Any]:
        """The kernel read alone (the IPVS dump), once."""
        start = time.monotonic()
        self.kernel.dump()
        return {"dump_seconds": round(time.monotonic() - start, 3)}


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
        batches = Batches(proxier._kernel)  # type: ignore[attr-defined]
        agent = Agent({"ipvs": proxier}, node_name=f"bench-{n}",
                      tracker=ChangeTracker(min_interval=0.05, full_interval=1e9))
        entry: dict[str, Any] = {"services": n, "real_servers_each": 10,
                                 "has_sync_full": hasattr(proxier, "sync_full")}
        measure_full_sync(agent, loop, "ipvs", servers(n), entry, batches, repeat=repeat,
                          changes=changes, offset=offset, label="ipvs full_sync")
        report["sizes"].append(entry)
        loop.close()
        subprocess.run(["ip", "netns", "del", ns], check=False)  # the kernel state goes with our sockets
    report["agent_rss_mb"] = rss_mb()
    return report


def bench_full_sync_ipvs(sizes: list[int], repeat: int, changes: int, offset: float,
                         baseline_src: str | None) -> dict[str, Any]:
    """On the host: one guest; the baseline's sources first (if given), then ours."""
    from svcproxy_lab.uml import booted_guest

    mem = "2048M" if max(sizes) >= 5000 else "1024M"
    out: dict[str, Any] = {}
    args = [",".join(map(str, sizes)), "--full-repeat", str(repeat), "--changes", str(changes),
            "--offset", str(offset)]
    with tempfile.TemporaryDirectory() as state, booted_guest("bench-full-ipvs", state, mem=mem) as guest:
        for name, src in (("baseline", baseline_src), ("after", _source())):
            if src is None:
                continue
            log(f"ipvs full_sync: {name} ({src})")
            proc = guest.run([*module_argv("benchmarks.full_sync_ipvs", "--inner"), *args,
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
