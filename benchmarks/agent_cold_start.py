"""agent_cold_start: an agent's cold start from a stream of programs, fixed vs adaptive window; JSON.

The lab's 10k cold start programmed ~20 Services per second per node
(benchmarks/README.md, "footprint"): programs arrive one watch event at a
time and every partial sync pays iptables-nft's revalidation of the whole nat
table. This measures the agent's part without a lab or an API server. Each
run is a child process started with ``ip netns exec`` in a fresh network
namespace of the host kernel (iptables mode; ipvs is unusable there, as on
the lab's netns nodes) that does what a starting agent does: build every
mode's proxier (:func:`svcproxy.agent.main.prepare`), hand the agent an empty
first list, and run the agent's own sync loop
(:meth:`svcproxy.agent.agent.Agent.run_forever`). Then N ProxyVirtualServers
(10 endpoints each, as the operator writes them: ``agent_memory.pvs_object``)
arrive as a stream of watch events, each parsed by the watch's own parser and
handed to ``Agent.upsert``, at ``--rates`` per second (0: as fast as the event
loop takes them). Measured per run:

* ``all_in_seconds``: first event -> the end of the sync that applied the last
  Service (its ``iptables-restore`` returned); checked afterwards with one
  ``iptables-save``: every Service's jump and all N x 10 DNAT rules present;
* syncs (partial, full), Services per partial sync, the time spent syncing,
  CPU seconds of the agent and its children (iptables-restore) for the cold
  start, and each Service's latency (event -> kernel);
* ``lone_change``: after the cold start, ``--lone`` times: idle ``--idle``
  seconds, then one endpoint of one Service changes; event -> kernel.

Each size and rate runs, in the same run and alternating which goes first,
``--variants`` of the tracker: ``fixed`` (the agent before the adaptive
window: 50 ms between sync starts, no pause, no batch limit), ``adaptive``
(the defaults: a pause as long as the last partial sync, at most 1 s; at most
200 Services per partial sync, no pause while that many wait), and each half
alone (``pause_only``, ``batch_only``). ``--agents K`` runs K such agents at once (the
lab runs 3 agents on this 2-core machine), each with its own namespace and
stream. No traffic is sent. Usage (root, from the repo):

    .venv/bin/python -m benchmarks.agent_cold_start [--sizes 1000,10000] [--rates 100,0]
        [--agents 1] [--lone 5] [--idle 2] [--output benchmarks/results/agent_cold_start.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks._report import emit, log
from benchmarks._source import module_argv
from benchmarks.agent_memory import pvs_object
from svcproxy_lab.stats import summary

ROOT = Path(__file__).resolve().parents[1]

# name -> (--sync-pause-ratio, --max-sync-batch): the agent before (a fixed 50 ms window),
# the adaptive window, and each half of it alone.
VARIANTS = {"fixed": (0.0, 0), "adaptive": (1.0, 200), "pause_only": (1.0, 0), "batch_only": (0.0, 200)}
COMMENT = re.compile(r'--comment "?([^" ]+)"?')


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def kernel_check(n: int, reals: int, markers: list[str]) -> dict[str, Any]:
    """What the nat table holds, read back with one iptables-save (this netns)."""
    saved = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                           check=True).stdout
    owners = {m.group(1) for line in saved.splitlines() if line.startswith("-A SVCPROXY-SERVICES ")
              if (m := COMMENT.search(line))}
    dnat = saved.count("-j DNAT --to-destination ")
    want = {f"bench/svc{i}" for i in range(n)}
    return {"services_in_kernel": len(owners & want), "dnat_rules": dnat,
            "markers_in_kernel": sum(f"--to-destination {m}" in saved for m in markers),
            "ok": owners >= want and dnat == n * reals and all(f"--to-destination {m}" in saved
                                                              for m in markers)}


async def cold_start(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One agent (the child, in its own netns): ``args.rate``, ``.ratio``, ``.batch``, ..."""
    from svcproxy.agent.agent import Agent, SyncOutcome
    from svcproxy.agent.main import prepare, trim_heap
    from svcproxy.agent.tracker import ChangeTracker
    from svcproxy.agent.watch import parse

    built = prepare(argparse.Namespace(cluster_cidr=None, masquerade_all=False,
                                       modes="ipvs,iptables,userspace"))
    assert built is not None
    usable, unusable = built
    reals, rate, ratio, batch = args.reals, args.rate, args.ratio, args.batch
    max_pause, lone, idle = args.max_pause, args.lone, args.idle
    tracker = ChangeTracker(min_interval=0.05, pause_ratio=ratio, max_pause=max_pause, max_batch=batch,
                            full_interval=60.0, now=time.monotonic())
    agent = Agent(usable, node_name="bench", unavailable=unusable, tracker=tracker)
    remaining = {f"bench/svc{i}" for i in range(n)}
    partial: list[tuple[float, int]] = []  # (duration, owners) of each partial sync
    fulls: list[float] = []
    failed: list[int] = []  # syncs with owners that failed (retried a second later)
    latencies: list[float] = []
    all_in: list[float] = []
    landed: dict[str, float] = {}  # owner -> end of the sync that applied it (lone changes)

    def on_synced(outcome: SyncOutcome) -> None:
        end = time.monotonic()
        (fulls.append(outcome.duration) if outcome.batch.full
         else partial.append((outcome.duration, len(outcome.batch.owners))))
        done = outcome.batch.owners - outcome.failed
        if outcome.failed:
            failed.append(len(outcome.failed))
        for owner in done:
            landed[owner] = end
            if owner in remaining:
                latencies.append(end - outcome.batch.seen[owner])
        if remaining and done & remaining:
            remaining.difference_update(done)
            if not remaining:
                all_in.append(end)

    agent.on_synced = on_synced
    agent.replace_all([])  # the first list: the node starts with nothing
    loop_task = asyncio.ensure_future(agent.run_forever(after_full=trim_heap))
    while not agent.synced_once:
        await asyncio.sleep(0.01)
    fulls.clear()
    cpu0, t0 = cpu_seconds(), time.monotonic()
    for i in range(n):  # the watch: one event at a time, parsed as the watch parses it
        if rate > 0:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        else:
            await asyncio.sleep(0)  # as fast as the event loop takes them
        agent.upsert(parse(pvs_object(i, reals)))
    streamed = time.monotonic() - t0
    while not all_in:
        await asyncio.sleep(0.01)
    cpu = cpu_seconds() - cpu0
    out: dict[str, Any] = {
        "services": n, "real_servers_each": reals, "rate_per_second": rate or "max",
        "pause_ratio": ratio, "max_pause": max_pause, "max_batch": batch, "min_interval": 0.05,
        "stream_seconds": round(streamed, 3), "all_in_seconds": round(all_in[0] - t0, 3),
        "services_per_second": round(n / (all_in[0] - t0), 1),
        "partial_syncs": len(partial), "full_syncs_during": len(fulls), "failed_syncs": len(failed),
        "services_per_partial_sync": summary([float(k) for _, k in partial], 1),
        "partial_sync_seconds": summary([d for d, _ in partial]),
        "syncing_seconds": round(sum(d for d, _ in partial) + sum(fulls), 3),
        "cpu_seconds": round(cpu, 2),
        "latency_seconds": summary(latencies, 3),
    }
    log(f"  {n} @ {rate or 'max'}/s ratio {ratio} batch {batch}: all in {out['all_in_seconds']} s, "
        f"{len(partial)} partial syncs, cpu {out['cpu_seconds']} s")
    markers, lone_latency = [], []
    for j in range(lone):  # a lone change after the node went idle
        await asyncio.sleep(idle)
        marker = f"10.245.0.{j + 1}:9000"
        obj = pvs_object(0, reals)
        obj["spec"]["virtualServers"][0]["realServers"][-1].update(address=f"10.245.0.{j + 1}", port=9000)
        obj["spec"]["contentHash"] = f"lone{j}"
        landed.pop("bench/svc0", None)
        start = time.monotonic()
        agent.upsert(parse(obj))
        while "bench/svc0" not in landed:
            await asyncio.sleep(0.001)
        lone_latency.append(landed["bench/svc0"] - start)
        markers.append(marker)
    out["lone_change_seconds"] = [round(x, 4) for x in lone_latency]
    if lone_latency:
        out["lone_change_median_seconds"] = round(sorted(lone_latency)[len(lone_latency) // 2], 4)
        out["lone_change_max_seconds"] = round(max(lone_latency), 4)
    loop_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop_task
    out["kernel"] = kernel_check(n, reals, markers[-1:])
    out["rss_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    for proxier in usable.values():
        await proxier.close()
    return out


def start_child(n: int, args: argparse.Namespace, rate: float, ratio: float,
                batch: int) -> tuple[str, subprocess.Popen[str]]:
    ns = f"svcpcold-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    cmd = ["ip", "netns", "exec", ns, *module_argv("benchmarks.agent_cold_start", "--child", str(n)),
           "--reals", str(args.reals), "--rate", str(rate), "--ratio", str(ratio), "--batch", str(batch),
           "--max-pause", str(args.max_pause), "--lone", str(args.lone), "--idle", str(args.idle)]
    return ns, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


def run_variant(n: int, args: argparse.Namespace, rate: float, ratio: float,
                batch: int) -> list[dict[str, Any]]:
    """``--agents`` children at once, each in its own namespace; their reports."""
    children = [start_child(n, args, rate, ratio, batch) for _ in range(args.agents)]
    results = []
    deadline = time.monotonic() + args.timeout
    try:
        for _ns, proc in children:
            try:
                stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"  did not finish in {args.timeout:.0f} s: stopped")
                results.append({"services": n, "error": f"did not finish in {args.timeout:.0f} s",
                                "all_in_seconds": None})
                continue
            if proc.returncode != 0:
                raise RuntimeError(f"child {n} @ {rate}/s ratio {ratio} failed (exit {proc.returncode})")
            results.append(json.loads(stdout))
    finally:
        for ns, proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="Services per run")
    parser.add_argument("--rates", default="100,0", help="events per second (0: as fast as possible)")
    parser.add_argument("--reals", type=int, default=10, help="endpoints per Service")
    parser.add_argument("--agents", type=int, default=1, help="agents at once (the lab runs 3)")
    parser.add_argument("--variants", default="fixed,adaptive", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--max-pause", type=float, default=1.0, help="the adaptive variant's cap")
    parser.add_argument("--lone", type=int, default=5, help="lone changes after the cold start")
    parser.add_argument("--idle", type=float, default=2.0, help="idle seconds before each lone change")
    parser.add_argument("--timeout", type=float, default=900, help="stop a variant's run after this long")
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        import logging

        from svcproxy.agent import logs

        logs.setup("bench", logging.WARNING)  # the agent's JSON log lines, on stderr
        print(json.dumps(asyncio.run(cold_start(args.child, args))))
        return 0
    if os.geteuid() != 0:
        log("run as root: each run makes a network namespace for the iptables proxier")
        return 2
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    report: dict[str, Any] = {
        "command": "python -m benchmarks.agent_cold_start " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
        "host_kernel": os.uname().release, "agents_at_once": args.agents, "runs": [],
    }
    flip = False
    for n in [int(s) for s in args.sizes.split(",") if s]:
        for rate in [float(r) for r in args.rates.split(",") if r]:
            order = [(v, VARIANTS[v]) for v in args.variants.split(",")]
            if flip:
                order.reverse()  # alternate which variant goes first
            flip = not flip
            pair: dict[str, Any] = {"services": n, "rate_per_second": rate or "max"}
            for name, (ratio, batch) in order:
                log(f"{n} Services @ {rate or 'max'}/s, {name} window, {args.agents} agent(s)")
                pair[name] = run_variant(n, args, rate, ratio, batch)
            for name in pair.keys() - {"services", "rate_per_second", "fixed"}:
                runs = [*pair[name], *pair.get("fixed", [])]
                if "fixed" in pair and all(r.get("all_in_seconds") is not None for r in runs):
                    pair[f"{name}_vs_fixed"] = {
                        key: round(sum(a[key] for a in pair[name])
                                   / max(1e-9, sum(f[key] for f in pair["fixed"])), 2)
                        for key in ("all_in_seconds", "partial_syncs", "cpu_seconds", "syncing_seconds")
                    }
                    log(f"  {name} / fixed: {pair[f'{name}_vs_fixed']}")
            report["runs"].append(pair)
    return emit(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
