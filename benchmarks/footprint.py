"""Footprint: RSS and CPU seconds of the operator, an agent and kube-proxy holding N Services.

For each size a fresh 3-node netns lab gets N selectorless Services (10 endpoints each);
each system in turn (kube-proxy iptables, kube-proxy nftables, svcproxy with one
iptables-mode policy) starts, programs them on every node (read from the kernel), and then
idles for ``--idle`` seconds. Per process (from /proc: VmRSS, VmHWM, utime + stime of the
process and of its reaped children such as iptables-restore): RSS and peak RSS at the end,
CPU seconds of the cold start (start -> every node programmed; for svcproxy also the
handover labels), and CPU seconds per minute while idle (periodic resyncs). The same
figures after churn are in programming_latency's ``processes_after_churn``. Prints JSON on
stdout, progress on stderr. Run as root, holding the lab turn:

    flock /run/svcproxy-lab-turn.lock .venv/bin/python -m benchmarks.footprint --sizes 1000 --idle 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._lab import harness
from benchmarks._lab.harness import BenchLab, KernelWatchers, Population, say
from benchmarks._report import provenance
from benchmarks.programming_latency import SYSTEMS, Phase


def processes(bench: BenchLab, system: str) -> list[str]:
    if system.startswith("svcproxy"):
        return ["operator", *[f"{n}-agent" for n in bench.node_names]]
    return [f"{n}-kube-proxy" for n in bench.node_names]


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"services": n, "endpoints_each": harness.ENDPOINTS, "nodes": 3}
    pop = Population()
    with BenchLab(Path(args.state_dir)) as bench:
        bench.up()
        bench.populate(n, pop)
        with KernelWatchers(bench.node_names) as watchers:
            for system in args.systems:
                say(f"--- {system} with {n} Services")
                phase = Phase(bench, watchers, pop, system, timeout=30)
                phase.cold_timeout = args.cold_timeout
                phase.operator_args = args.operator_args.split()
                cold = phase.start()
                started = harness.sample_processes(bench, processes(bench, system))
                time.sleep(args.idle)
                idle = harness.sample_processes(bench, processes(bench, system))
                delta = harness.cpu_delta(started, idle)
                out[system] = {
                    "cold_sync_s": cold,
                    "after_cold_sync": started,
                    "after_idle": idle,
                    "idle_cpu_s_per_min": {k: None if v is None else round(v * 60 / args.idle, 2)
                                           for k, v in delta.items()},
                }
                say(f"{system} with {n} Services: {json.dumps(out[system])}")
                phase.stop()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"in order, svcproxy last: {','.join(SYSTEMS)}")
    parser.add_argument("--idle", type=float, default=60, help="seconds of idling after the cold sync")
    parser.add_argument("--cold-timeout", type=float, default=600)
    parser.add_argument("--state-dir", default=str(harness.DEFAULT_STATE))
    parser.add_argument("--operator-args", default="",
                        help="extra options for `svcproxy operator`, space-separated (e.g. --workers=0)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    if "svcproxy-iptables" in args.systems[:-1]:
        parser.error("svcproxy-iptables must come last (the lab cannot stop svcproxy)")
    result = {
        "benchmark": "footprint",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(),
        "idle_s": args.idle,
        "operator_args": args.operator_args,
        "sizes": [run_size(int(n), args) for n in args.sizes.split(",")],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
