"""agent_memory: the node agent's RSS after import, at 1k and at 10k Services; prints JSON.

Each size runs in a fresh child process (so one size's garbage does not
count in the next) that does what a starting agent does, minus the API
server, inside a fresh network namespace of the host kernel (no UML; ipvs is
unusable there, as on the lab's netns nodes): import the agent; build every
mode's proxier as ``svcproxy agent`` does (:func:`svcproxy.agent.main.prepare`);
build ProxyVirtualServer objects as the API server sends them (JSON dicts,
``N`` Services x ``--reals`` endpoints, iptables mode, in list pages of 500)
and parse each with the watch's own :func:`svcproxy.agent.watch.parse`; hand
them to the :class:`~svcproxy.agent.agent.Agent`; run the first full sync into
the kernel, then a second one (the periodic drift repair, which reads the
kernel back). Reported per size: RSS after import, after the proxiers are
built, after each sync (``VmRSS``, after ``gc.collect()``) and the peak
(``VmHWM``) after the cold sync and at the end. With ``--drift`` one service
chain is then flushed by hand and one more full sync repairs it (the peak of a
full sync that finds drift). With
``--trace`` the largest size runs once more under :mod:`tracemalloc` and the
top allocation sites still alive after the sync are listed (tracing costs
memory itself, so its RSS is not reported). With ``--baseline-src`` older
sources are measured in the same run, each size right before the same size of
``--src`` (the machine is shared and noisy: compare within one run). No
traffic is sent.

Usage (root, from the repo):

    .venv/bin/python -m benchmarks.agent_memory [--sizes 1000,10000] [--reals 10] [--trace] [--drift]
        [--src NEW/operator] [--label TEXT] [--baseline-src OLD/operator] [--baseline-label TEXT]
        [--output benchmarks/results/agent_memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

from benchmarks._report import emit, log, status_mb
from benchmarks._source import module_argv

ROOT = Path(__file__).resolve().parents[1]
PAGE = 500


def pvs_object(i: int, reals: int) -> dict[str, Any]:
    """One ProxyVirtualServer as the operator writes it (iptables mode, `reals` endpoints)."""
    name = f"svc{i}"
    eps = [{"address": f"10.244.{(k // 250) % 250}.{k % 250 + 1}", "port": 8080, "weight": 1,
            "nodeName": f"node-{k % 3 + 1}", "podName": f"{name}-pod-{k - i * reals}",
            "ready": True, "serving": True, "terminating": False}
           for k in range(i * reals, (i + 1) * reals)]
    vip = f"10.96.{i // 250}.{i % 250 + 1}"
    return {
        "apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
        "metadata": {"name": name, "namespace": "bench", "resourceVersion": str(1000 + i),
                     "uid": str(uuid.UUID(int=i)), "generation": 1},
        "spec": {
            "service": {"name": name, "uid": str(uuid.UUID(int=10**9 + i))},
            "policy": {"name": "bench", "generation": 1},
            "mode": "iptables", "contentHash": f"{i:016x}",
            "virtualServers": [{"portName": "", "protocol": "TCP", "address": vip,
                                "addressType": "ClusterIP", "port": 80, "mode": "iptables",
                                "realServers": eps}],
            "summary": {"vips": f"{vip}:80/TCP", "endpoints": f"{reals}/{reals}"},
        },
    }


def child(n: int, reals: int, trace: bool, drift: bool) -> dict[str, Any]:
    """Runs inside a fresh network namespace (the parent starts it with ``ip netns exec``)."""
    if trace:
        import tracemalloc
        tracemalloc.start(1)
    import svcproxy.agent.main as agent_main
    from svcproxy.agent.main import prepare
    from svcproxy.agent.watch import parse

    gc.collect()
    out: dict[str, Any] = {"services": n, "real_servers_each": reals,
                           "rss_after_import_mb": status_mb("VmRSS")}
    # Every mode's proxier, as `svcproxy agent` builds them (ipvs is unusable on the host kernel).
    built = prepare(argparse.Namespace(cluster_cidr=None, masquerade_all=False,
                                       modes="ipvs,iptables,userspace"))
    assert built is not None
    usable, unusable = built
    from svcproxy.agent.agent import Agent
    from svcproxy.agent.tracker import ChangeTracker

    out["modes"] = sorted(usable)
    loop = asyncio.new_event_loop()
    agent = Agent(usable, node_name="bench", unavailable=unusable,
                  tracker=ChangeTracker(min_interval=0.0, full_interval=1e9))
    gc.collect()
    out["rss_after_start_mb"] = status_mb("VmRSS")
    programs: list[Any] = []
    for start in range(0, n, PAGE):  # as the watch lists: one page of raw objects at a time
        page = [pvs_object(i, reals) for i in range(start, min(n, start + PAGE))]
        programs.extend(parse(o) for o in page)
        del page
    agent.replace_all(programs)
    del programs

    def full_sync() -> float:
        agent.tracker.request_full()
        batch = agent.tracker.take(time.monotonic())
        assert batch is not None and batch.full
        started = time.monotonic()
        outcome = loop.run_until_complete(agent.sync(batch))
        assert outcome.ok, [str(e) for r in outcome.results for e in r.errors][:3]
        took = round(time.monotonic() - started, 2)
        # What the agent's sync loop does after a full sync (older sources have no such step).
        getattr(agent_main, "trim_heap", lambda: None)()
        return took

    out["cold_sync_seconds"] = full_sync()
    gc.collect()
    out["rss_after_sync_mb"] = status_mb("VmRSS")
    out["rss_peak_cold_mb"] = status_mb("VmHWM")
    # The periodic full sync (every 60 s) reads the kernel back: what it leaves behind.
    out["resync_seconds"] = full_sync()
    gc.collect()
    out["rss_after_resync_mb"] = status_mb("VmRSS")
    out["rss_peak_mb"] = status_mb("VmHWM")
    if drift and not trace:
        # One service chain flushed by hand: the next full sync finds drift and repairs it
        # (the peak of a full sync that has to find which chains differ). The chain name
        # comes through a shell pipe so this process never holds iptables-save's output.
        name = subprocess.run(["sh", "-c", "iptables-save -t nat | grep -m1 '^:SVCPROXY-SVC-'"],
                              capture_output=True, text=True, check=True).stdout.split()[0][1:]
        subprocess.run(["iptables", "-t", "nat", "-F", name], check=True)
        out["drift_resync_seconds"] = full_sync()
        out["drift_rewritten_services"] = cast(Any, usable["iptables"]).last_full.dirty_services
        gc.collect()
        out["rss_after_drift_resync_mb"] = status_mb("VmRSS")
        out["rss_peak_with_drift_mb"] = status_mb("VmHWM")
    if trace:
        import tracemalloc
        snap = tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
        ])
        stats = snap.statistics("lineno")
        out["traced_total_mb"] = round(sum(s.size for s in stats) / 2**20, 1)
        out["top_sites"] = [
            {"site": f"{os.path.relpath(s.traceback[0].filename, ROOT)}:{s.traceback[0].lineno}",
             "mb": round(s.size / 2**20, 2), "blocks": s.count}
            for s in stats[:20]
        ]
    counts = usable["iptables"].counts()
    out["held"] = {"programs": len(agent.programs), "virtual_servers": counts.virtual_servers,
                   "rules": counts.rules}
    for proxier in usable.values():
        loop.run_until_complete(proxier.close())
    loop.close()
    return out


def run_child(n: int, reals: int, trace: bool, src: Path, drift: bool = False) -> dict[str, Any]:
    ns = f"svcpmem-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    cmd = ["ip", "netns", "exec", ns, *module_argv("benchmarks.agent_memory", "--child", str(n)),
           "--reals", str(reals), *(["--trace"] if trace else []), *(["--drift"] if drift else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=str(src)))
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {n} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--reals", type=int, default=10)
    parser.add_argument("--trace", action="store_true",
                        help="also list tracemalloc's top sites at the largest size")
    parser.add_argument("--drift", action="store_true",
                        help="then flush one service chain by hand and run one more full sync")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, default=ROOT / "operator",
                        help="svcproxy sources to measure (an older commit's operator/: a before figure)")
    parser.add_argument("--label", default="", help="what --src is (e.g. a commit of an exported tree)")
    parser.add_argument("--baseline-src", type=Path,
                        help="older sources measured in the same run, each size before --src's")
    parser.add_argument("--baseline-label", default="")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.reals, args.trace, args.drift)))
        return 0
    if os.geteuid() != 0:
        log("run as root: each size makes a network namespace for the iptables proxier")
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s]

    def describe(src: Path, label: str) -> dict[str, Any]:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        return {"mode": "iptables", "host_kernel": os.uname().release, "src": str(src),
                "commit": label or commit, "sizes": []}

    runs = {"after": (args.src.resolve(), describe(args.src, args.label))}
    if args.baseline_src:
        runs = {"before": (args.baseline_src.resolve(), describe(args.baseline_src, args.baseline_label)),
                **runs}
    for n in sizes:
        for name, (src, part) in runs.items():
            log(f"{name}: {n} Services x {args.reals} endpoints ({src})")
            part["sizes"].append(run_child(n, args.reals, False, src, args.drift))
            log(json.dumps(part["sizes"][-1]))
    if args.trace:
        log(f"{max(sizes)} Services under tracemalloc")
        src, part = runs["after"]
        part["trace"] = run_child(max(sizes), args.reals, True, src)
    report: dict[str, Any] = runs["after"][1]
    if args.baseline_src:
        report = {"date": time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime()),
                  "command": " ".join(["python -m benchmarks.agent_memory", *sys.argv[1:]]),
                  **{name: part for name, (_, part) in runs.items()}}
    return emit(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
