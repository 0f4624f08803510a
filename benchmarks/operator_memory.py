"""operator_memory: what the operator keeps in memory holding N Services, without a lab; prints JSON.

Each size runs in a fresh child process (one size's garbage does not count in
the next) that feeds the operator's own handler path exactly the objects the
API server would deliver, parsed from JSON text as a watch parses them:

* 3 Nodes (full bodies: addresses, images, conditions, nodeInfo);
* ``--policies`` ServiceProxyPolicies, each selecting 1/P of the Services by
  label (iptables; ipvs rr; ipvs sh with ClientIP affinity; ...);
* N Services (full bodies: managedFields, clusterIPs, ipFamilies, status);
* N EndpointSlices with ``--endpoints`` endpoints each (conditions, nodeName,
  zone, targetRef with uid; ownerReferences, managedFields, annotations).

Then it runs the reconciler's passes as in a cluster, with an in-memory API
server that stores each write the way kube-apiserver does (new
resourceVersion, uid, managedFields) and whose watch echoes it back: every
ProxyVirtualServer written, 3 agents' ProxyNode reports applying all of
them, the handover labels, the policy statuses, until a pass writes nothing;
then one periodic resync (full lists of every kind, merged as the operator does).
Reported per size: RSS (``VmRSS`` after ``gc.collect()``) after import, after
the objects are fed, after the passes, after the resync, and the peak
(``VmHWM``).

Events go to :func:`svcproxy.controller.handlers.observe` directly (the
operator's own cache and planner); kopf's per-object bookkeeping is not
counted, as reaching it needs kopf's private modules. With ``--trace`` the
largest size runs once more under :mod:`tracemalloc` and lists what stays alive grouped by
file:line of the allocating frame, and by the first svcproxy/kopf frame on
the allocation's stack (tracing costs memory itself, so its RSS is not
reported). ``--src`` measures other sources (an older commit's
``operator/``: a before figure in the same run). No traffic, no root needed.

    .venv/bin/python -m benchmarks.operator_memory [--sizes 1000,10000] [--endpoints 10]
        [--policies 4] [--trace] [--src OLD/operator] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._operator_api import NODES, NS, ApiServer, Writer, wire
from benchmarks._report import emit, log, status_mb
from benchmarks._source import module_argv

ROOT = Path(__file__).resolve().parents[1]

PAGE = 500  # objects fed per batch, as a watch's first list delivers them
JSON = dict[str, Any]


class Feed:
    """Delivers watch events to the operator's own handler path, ``observe``."""

    def __init__(self, cache: Any, reconciler: Any) -> None:
        from svcproxy.controller import handlers

        self.cache, self.reconciler = cache, reconciler
        self.observe = handlers.observe

    async def __call__(self, kind: str, body: JSON, type_: str = "ADDED") -> None:
        self.observe(self.cache, self.reconciler, kind, {"type": type_, "object": wire(body)})


async def _scenario(size: int, endpoints: int, policies: int, out: JSON) -> None:
    from svcproxy.controller.cache import Cache
    from svcproxy.controller.reconciler import Reconciler

    api = ApiServer(size, endpoints, policies)
    writer = Writer(api)
    cache = Cache()
    rec = Reconciler(cache, writer, handover_delay=3.0, clock=lambda: 1000.0)
    feed = Feed(cache, rec)
    started = time.monotonic()
    cache.nodes_listed = True
    for k in range(len(NODES)):
        await feed("k8snode", api.node(k))
    for k in range(policies):
        await feed("policy", api.policy(k))
    for start in range(0, size, PAGE):  # a list page at a time, as the watch's first list delivers them
        for i in range(start, min(size, start + PAGE)):
            await feed("service", api.service(i))
        for i in range(start, min(size, start + PAGE)):
            await feed("slice", api.endpoint_slice(i))
    gc.collect()
    out["rss_after_feed_mb"] = status_mb("VmRSS")
    out["feed_seconds"] = round(time.monotonic() - started, 1)
    rec.ready.set()
    hashes: dict[str, str] = {}
    applied: dict[str, str] = {}
    passes = []
    for turn in range(8):
        before = writer.writes
        plan = await rec.reconcile(NS)
        assert plan is not None, "a reconcile pass failed"
        for name, spec in plan.writes.items():
            hashes[name] = spec.content_hash
        passes.append(writer.writes - before)
        echoes, api.echoes = api.echoes, []
        for kind, body in echoes:
            await feed(kind, body, "MODIFIED")
        del echoes
        if turn == 0:
            gc.collect()
            out["rss_after_first_pass_mb"] = status_mb("VmRSS")
        if not plan.writes and not plan.label and not plan.statuses and turn > 1:
            break
        # The agents apply every program and report it (one ProxyNode each).
        applied = {f"{NS}/{n}": h for n, h in hashes.items()}
        for k in range(len(NODES)):
            await feed("node", api.proxy_node(k, applied))
        del plan
    out["writes_per_pass"] = passes
    if passes[-1]:
        raise SystemExit(f"operator_memory: no steady state at {size} Services: writes {passes}")
    rec.stop()
    del hashes
    gc.collect()
    out["rss_after_passes_mb"] = status_mb("VmRSS")
    out["rss_peak_passes_mb"] = status_mb("VmHWM")
    out["passes_seconds"] = round(time.monotonic() - started, 1)
    # The periodic resync: a full list of every kind, merged in (same versions: nothing replaced).
    await _resync(api, cache, applied, out)
    gc.collect()
    out["rss_after_resync_mb"] = status_mb("VmRSS")
    out["rss_peak_mb"] = status_mb("VmHWM")
    # How much of that is pages glibc keeps after the resync's garbage was freed.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    out["rss_after_resync_malloc_trim_mb"] = status_mb("VmRSS")
    out["held"] = {kind: sum(len(v) for v in cache.objects[kind].values()) for kind in cache.objects}
    out["keep"] = (cache, rec, feed)  # alive until measured


async def _resync(api: ApiServer, cache: Any, applied: dict[str, str], out: JSON) -> None:
    """The periodic resync as the measured sources do it: page by page through the Lister's
    merge where it has one (its HTTP read replaced by the in-memory API server); else, as the
    older sources did, every kind's whole list at once (here as dicts: their client's models,
    which cost more, are not built)."""
    from svcproxy.controller import lister

    kinds = ("policy", "service", "slice", "program", "node", "pod", "k8snode")
    if hasattr(lister, "ListMerge"):
        out["resync"] = "paged"
        reader = lister.Lister.__new__(lister.Lister)  # no API client: _get is replaced
        reader.namespace, reader._warned_nodes = None, False

        async def get(kind: str, token: str | None) -> JSON:
            return wire(api.page(kind, int(token or 0), applied, lister.PAGE))

        reader._get = get
        await reader.load(cache)
        return
    out["resync"] = "whole lists"
    lists = {k: wire(api.page(k, 0, applied, api.count(k) or 1)) for k in kinds}
    lister.apply_lists(cache, lists)


def _site(frame: Any) -> str:
    name = frame.filename
    for base in (str(ROOT), str(Path(sys.prefix) / "lib")):
        if name.startswith(base):
            return f"{os.path.relpath(name, base)}:{frame.lineno}"
    return f"{name}:{frame.lineno}"


def child(size: int, endpoints: int, policies: int, trace: bool) -> JSON:
    import svcproxy.controller.handlers  # noqa: F401  (registers the handlers with kopf, as main does)

    gc.collect()
    out: JSON = {
        "services": size,
        "endpoints_each": endpoints,
        "policies": policies,
        "rss_after_import_mb": status_mb("VmRSS"),
    }
    if trace:  # after the imports: what they allocate is in rss_after_import_mb, and tracing
        import tracemalloc  # them costs a minute

        tracemalloc.start(8)
    asyncio.run(_scenario(size, endpoints, policies, out))
    keep = out.pop("keep")
    gc.collect()
    out["rss_end_mb"] = status_mb("VmRSS")
    if trace:
        import tracemalloc

        snap = tracemalloc.take_snapshot().filter_traces(
            [
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap*>"),
            ]
        )
        stats = snap.statistics("lineno")
        out["traced_total_mb"] = round(sum(s.size for s in stats) / 2**20, 1)
        out["top_sites"] = [
            {"site": _site(s.traceback[0]), "mb": round(s.size / 2**20, 2), "blocks": s.count}
            for s in stats[:25]
        ]
        # Who asked for it: the innermost frame in svcproxy or kopf (else the allocating frame).
        # The raw traces (tuples, most recent frame first): Traceback objects cost minutes here.
        owners: dict[tuple[str, int], list[int]] = {}
        for _, nbytes, frames, *_rest in snap.traces._traces:
            mine = next((f for f in frames if "svcproxy/" in f[0] or "/kopf/" in f[0]), frames[0])
            acc = owners.setdefault(mine, [0, 0])
            acc[0] += nbytes
            acc[1] += 1
        top = sorted(owners.items(), key=lambda kv: -kv[1][0])[:25]
        out["top_owners"] = [
            {"site": _site(tracemalloc.Frame(f)), "mb": round(b / 2**20, 2), "blocks": c} for f, (b, c) in top
        ]
    del keep
    return out


def run_child(size: int, args: argparse.Namespace, trace: bool) -> JSON:
    cmd = [
        *module_argv("benchmarks.operator_memory"),
        "--child",
        str(size),
        "--endpoints",
        str(args.endpoints),
        "--policies",
        str(args.policies),
        *(["--trace"] if trace else []),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(args.src.resolve())),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {size} failed: {proc.stderr[-3000:]}")
    result: JSON = json.loads(proc.stdout)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--policies", type=int, default=4)
    parser.add_argument("--trace", action="store_true", help="tracemalloc at the largest size")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--src",
        type=Path,
        default=ROOT / "operator",
        help="svcproxy sources to measure (an older commit's operator/: a before figure)",
    )
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.endpoints, args.policies, args.trace)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    commit = subprocess.run(
        ["git", "-C", str(args.src), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    report: JSON = {
        "benchmark": "operator_memory",
        "src": str(args.src),
        "commit": commit,
        "python": sys.version.split()[0],
        "runs": [],
    }
    for size in sizes:
        log(f"{size} Services x {args.endpoints} endpoints")
        report["runs"].append(run_child(size, args, False))
        log(json.dumps(report["runs"][-1]))
    if args.trace:
        log(f"{max(sizes)} Services under tracemalloc")
        report["trace"] = run_child(max(sizes), args, True)
    return emit(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
