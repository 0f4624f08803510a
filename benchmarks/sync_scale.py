"""sync_scale: the agent's cold sync and one-change cost at 1k vs 10k Services; prints JSON.

Issue #9's ``sync_scale`` (and the agent issue's figures). For each mode it
builds, in the same run and the same kernel, one node network namespace per
table size (1k and 10k Services x 10 endpoints by default) and in each an
:class:`~svcproxy.agent.agent.Agent` with the real proxier:

* ``cold_sync_seconds``: the agent's first (full) sync of the whole table,
  against the kernel's own loader reading the same table into a fresh netns
  (``ipvsadm -R``, ``iptables-restore``): the practical limit.
* ``one_change``: one ProxyVirtualServer changes one endpoint (upsert ->
  tracker -> partial sync -> kernel), alternately on the small and the large
  table so noise hits both alike; median of ``--repeat`` each, and their
  ratio (issue #9: at most 1.2). For iptables the same restore input is also
  fed to the tool alone on the same table: the floor the kernel and the tool
  set (``tool_one_change_seconds``).

iptables runs on the host kernel (its ``iptables`` backend, usually nft;
``--legacy`` for x_tables); ipvs runs inside a user-mode-linux guest (the
host kernel has no IPVS). No traffic is sent. Usage (root, from the repo):

    .venv/bin/python -m benchmarks.sync_scale [--sizes 1000,10000] [--ipvs-sizes 1000,10000]
        [--repeat 21] [--tool-timeout 180] [--legacy] [--output benchmarks/results/sync_scale.json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import _source as source
from benchmarks._report import log
from benchmarks._source import module_argv
from benchmarks._sync import Observer, measure_full_sync, median, program, timed_sync

ROOT = Path(__file__).resolve().parents[1]
# Before svcproxy is imported: with --src DIR the run re-executes with DIR's svcproxy.
SOURCES = source.use()

from svcproxy.agent.agent import Agent  # noqa: E402
from svcproxy.agent.tracker import ChangeTracker  # noqa: E402

# From proxier, not capabilities: --src may name sources older than that module.
from svcproxy.dataplane.proxier import ModeCounts, SyncResult  # noqa: E402
from svcproxy.dataplane.table import RealServer, Table, VirtualServer  # noqa: E402


def _source() -> str:
    """The svcproxy sources measured (``--src DIR``, else this checkout's ``operator/``)."""
    return SOURCES


REALS = 10

def servers(n: int) -> list[VirtualServer]:
    out = []
    for i in range(n):
        reals = [
            RealServer(f"10.244.{(k // 250) % 250}.{k % 250 + 1}", 8080)
            for k in range(i * REALS, (i + 1) * REALS)
        ]
        vip = f"10.96.{i // 250}.{i % 250 + 1}"
        out.append(VirtualServer.create("TCP", vip, 80, reals, owner=f"bench/svc{i}"))
    return out


def swapped(vs: VirtualServer) -> VirtualServer:
    """``vs`` with its last endpoint replaced: one endpoint change."""
    return vs.with_reals([*vs.real_servers[:-1], RealServer("10.244.255.1", 8080)]).canonical()


def rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Direct:
    """A proxier whose blocking halves run in its own worker thread, like the agent's
    ``asyncio.to_thread`` (pyroute2 runs an event loop of its own, so not in the
    agent's loop). The thread starts at once, so it lives in the netns the caller is
    in now (a thread inherits its creator's netns) and opens its sockets there."""

    def __init__(self, proxier: Any) -> None:
        self.proxier = proxier
        self.mode = proxier.mode
        self.pool = concurrent.futures.ThreadPoolExecutor(1)
        self.pool.submit(lambda: None).result()

    async def _call(self, func: Callable[..., SyncResult], *args: Any) -> SyncResult:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    def capabilities(self) -> Any:
        return self.proxier.capabilities()

    def counts(self) -> ModeCounts:
        counts: ModeCounts = self.proxier.counts()
        return counts

    async def sync(self, desired: Table, only: frozenset[str] | None = None) -> SyncResult:
        return await self._call(self.proxier.sync_blocking, desired, only)

    async def cleanup(self) -> SyncResult:
        return await self._call(self.proxier.cleanup_blocking)

    async def close(self) -> None:
        return None


def unpaced_tracker() -> ChangeTracker:
    """A tracker that lets each change be synced at once: the one-change figures are the
    cost of a sync, not the agent's pacing (since the adaptive window, a partial sync
    waits as long as the previous one took; sources from before it have no such option)."""
    pacing = {"pause_ratio": 0.0} if "pause_ratio" in inspect.signature(ChangeTracker).parameters else {}
    return ChangeTracker(min_interval=0.0, full_interval=1e9, **pacing)  # type: ignore[arg-type]


class Node:
    """One table size: an agent with the real proxier, and the changes to time."""

    def __init__(self, mode: str, n: int, proxier: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.mode, self.n, self.loop = mode, n, loop
        self.servers = servers(n)
        self.agent = Agent({mode: Direct(proxier)}, node_name=f"bench-{n}",  # type: ignore[dict-item]
                           tracker=unpaced_tracker())
        self.first = self.servers[0]
        self.flip = False
        self.kernel_seconds = 0.0  # time inside the kernel tool / netlink (see timed())
        self.own: list[float] = []  # per change: the agent's own time (total - kernel)

    def timed(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """``func`` (a kernel call: iptables-restore, a netlink batch) with its time
        counted, so a change's cost splits into the kernel's and the agent's own."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return func(*args, **kwargs)
            finally:
                self.kernel_seconds += time.monotonic() - start
        return wrapper

    def _run_batch(self) -> float:
        return timed_sync(self.agent, self.loop)

    def cold(self) -> dict[str, Any]:
        self.agent.replace_all(program(self.mode, vs, "v0") for vs in self.servers)
        took = self._run_batch()
        return {"services": self.n, "real_servers_each": REALS, "cold_sync_seconds": round(took, 3)}

    def one_change(self) -> float:
        """Upsert one ProxyVirtualServer with one endpoint swapped (then back), sync it."""
        self.flip = not self.flip
        vs = swapped(self.first) if self.flip else self.first
        self.agent.upsert(program(self.mode, vs, "v1" if self.flip else "v0"))
        self.kernel_seconds = 0.0
        took = self._run_batch()
        self.own.append(took - self.kernel_seconds)
        return took

    def full_resync(self) -> float:
        self.agent.tracker.request_full()
        return self._run_batch()


def interleaved(nodes: list[Node], repeat: int) -> dict[int, float]:
    """Median one-change time per size, sizes taking turns (noise hits all alike)."""
    times: dict[int, list[float]] = {node.n: [] for node in nodes}
    for node in nodes:  # warm-up: first partial sync after the full one
        node.one_change()
        node.one_change()
        node.own.clear()
    for _ in range(repeat):
        for node in nodes:
            times[node.n].append(node.one_change())
    return {n: median(t) for n, t in times.items()}


def ratio(per_size: dict[int, float]) -> float | None:
    sizes = sorted(per_size)
    if len(sizes) < 2 or not per_size[sizes[0]]:
        return None
    return round(per_size[sizes[-1]] / per_size[sizes[0]], 2)


# iptables, host kernel ------------------------------------------------------------------


def iptables_text(table: list[VirtualServer]) -> str:
    """The whole table as one iptables-restore input (what the tool alone loads)."""
    from svcproxy.dataplane.iptables import rules

    ordered = sorted(table, key=lambda v: v.key)
    chains = [c for vs in ordered for c in rules.chains_of(vs)]
    return "\n".join([
        "*nat",
        *(f":{c} - [0:0]" for c in (*rules.BASE_CHAINS, *chains)),
        *rules.base_rules(),
        *(rules.service_jump(vs) for vs in ordered),
        *(r for vs in ordered for r in rules.service_rules(vs, ("10.244.0.0/16",), False)),
        "COMMIT",
        "",
    ])


def restore_tool(ns: str, legacy: bool, text: str, timeout: float | None = None) -> float | None:
    """Seconds for the tool alone to apply ``text`` in ``ns``; None past ``timeout``."""
    tool = "iptables-legacy-restore" if legacy else "iptables-restore"
    start = time.monotonic()
    try:
        subprocess.run(["ip", "netns", "exec", ns, tool, "--noflush", "-w", "5"],
                       input=text, text=True, check=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return round(time.monotonic() - start, 3)


def bench_iptables(sizes: list[int], repeat: int, legacy: bool, tool_timeout: float) -> dict[str, Any]:
    from svcproxy.dataplane.iptables.proxier import IptablesProxier
    from svcproxy.dataplane.netfilter import Netfilter, detect_backend

    loop = asyncio.new_event_loop()
    tag = uuid.uuid4().hex[:6]
    names = {n: f"svcpb-{tag}-{n}" for n in sizes}
    ref = f"svcpb-{tag}-ref"
    nodes: list[Node] = []
    by_size: dict[int, Node] = {}
    inputs: dict[int, list[str]] = {n: [] for n in sizes}
    report: dict[str, Any] = {"backend": "iptables-legacy" if legacy else detect_backend()[0], "sizes": []}

    class Recording(Netfilter):
        def __init__(self, n: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.n = n

        def restore(self, text: str) -> None:
            inputs[self.n].append(text)
            start = time.monotonic()
            try:
                super().restore(text)
            finally:
                if self.n in by_size:
                    by_size[self.n].kernel_seconds += time.monotonic() - start

    try:
        for ns in [*names.values(), ref]:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        for n in sizes:
            table = servers(n)
            text = iptables_text(table)
            entry: dict[str, Any] = {"rules": text.count("\n-A ")}
            log(f"iptables {n}: tool alone loads {entry['rules']} rules in one input")
            entry["tool_cold_seconds"] = restore_tool(ref, legacy, text, tool_timeout)
            if entry["tool_cold_seconds"] is None:
                entry["tool_cold_note"] = f"did not finish in {tool_timeout:.0f} s (stopped)"
            if not legacy:  # the x_tables tool on the same input, for the record
                subprocess.run(["ip", "netns", "del", ref], check=True)
                subprocess.run(["ip", "netns", "add", ref], check=True)
                entry["legacy_tool_cold_seconds"] = restore_tool(ref, True, text, tool_timeout)
            subprocess.run(["ip", "netns", "del", ref], check=True)
            subprocess.run(["ip", "netns", "add", ref], check=True)
            proxier = IptablesProxier(Recording(n, netns=names[n], legacy=legacy),
                                      Netfilter(ipv6=True, netns=names[n], legacy=legacy))
            node = Node("iptables", n, proxier, loop)
            by_size[n] = node
            log(f"iptables {n}: agent cold sync")
            entry.update(node.cold())
            entry["cold_sync_restore_inputs"] = len(inputs[n])
            entry["cold_vs_tool"] = (round(entry["cold_sync_seconds"] / entry["tool_cold_seconds"], 2)
                                     if entry["tool_cold_seconds"] else None)
            report["sizes"].append(entry)
            nodes.append(node)
        log("iptables: one change, sizes interleaved")
        for n in sizes:
            inputs[n].clear()
        agent = interleaved(nodes, repeat)
        tool: dict[int, float] = {}
        for n in sizes:  # the tool alone with the inputs the agent just wrote, same table
            pair = inputs[n][-2:]
            runs = [restore_tool(names[n], legacy, pair[i % 2]) or 0.0 for i in range(repeat)]
            tool[n] = median(runs)
        for entry, node in zip(report["sizes"], nodes, strict=True):
            entry["one_change_seconds"] = round(agent[node.n], 4)
            entry["tool_one_change_seconds"] = round(tool[node.n], 4)
            entry["agent_own_seconds"] = round(median(node.own), 5)
            log(f"iptables {node.n}: full resync")
            entry["full_resync_seconds"] = round(node.full_resync(), 3)
        report["one_change_ratio"] = ratio(agent)
        report["tool_one_change_ratio"] = ratio(tool)
        report["agent_own_ratio"] = ratio({node.n: median(node.own) for node in nodes})
        report["agent_rss_mb"] = rss_mb()
    finally:
        for ns in [*names.values(), ref]:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        loop.close()
    return report


# the periodic full sync (iptables, host kernel) -------------------------------------------


class Restores(Observer):
    """The iptables-restore inputs a full sync wrote: (end time, input) each."""

    def __init__(self) -> None:
        self.inputs: list[tuple[float, str]] = []

    def clear(self) -> None:
        self.inputs.clear()

    def written(self) -> dict[str, Any]:
        return {"steady_full_restore_inputs": len(self.inputs),
                "steady_full_restored_lines": sum(text.count("\n") for _, text in self.inputs)}

    def landed(self, marker: RealServer) -> float | None:
        needle = f"{marker.address}:{marker.port}"
        return next((t for t, text in self.inputs if needle in text), None)


def bench_full_sync(sizes: list[int], repeat: int, changes: int, legacy: bool,
                    offset: float) -> dict[str, Any]:
    """Steady-state full syncs and one change landing ``offset`` s into a full sync
    (``_sync.measure_full_sync``), seen through the iptables-restore inputs: per size,
    the inputs and lines the last steady full sync restored; the latency ends with the
    iptables-restore whose input holds the new endpoint. Works with older sources too
    (``--baseline-src``).
    """
    from svcproxy.dataplane.iptables.proxier import IptablesProxier
    from svcproxy.dataplane.netfilter import Netfilter

    loop = asyncio.new_event_loop()
    tag = uuid.uuid4().hex[:6]
    report: dict[str, Any] = {"offset_seconds": offset, "sizes": []}
    restores = Restores()

    class Recording(Netfilter):
        def restore(self, text: str) -> None:
            super().restore(text)
            restores.inputs.append((time.monotonic(), text))

    for n in sizes:
        ns = f"svcpf-{tag}-{n}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            proxier = IptablesProxier(Recording(netns=ns, legacy=legacy),
                                      Netfilter(ipv6=True, netns=ns, legacy=legacy))
            agent = Agent({"iptables": proxier}, node_name=f"bench-{n}",
                          tracker=ChangeTracker(min_interval=0.05, full_interval=1e9))
            report["sizes"].append(measure_full_sync(
                agent, loop, "iptables", servers(n), {"services": n}, restores,
                repeat=repeat, changes=changes, offset=offset, label="full_sync"))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    loop.close()
    report["agent_rss_mb"] = rss_mb()
    return report


# ipvs, inside a UML guest --------------------------------------------------------------


def _node_netns(ns: str) -> None:
    subprocess.run(["ip", "netns", "add", ns], check=True)
    # IPVS refuses real servers the netns has no route to.
    for cmd in (["link", "set", "lo", "up"], ["link", "add", "pods", "type", "dummy"],
                ["addr", "add", "10.244.0.1/16", "dev", "pods"], ["link", "set", "pods", "up"]):
        subprocess.run(["ip", "netns", "exec", ns, "ip", *cmd], check=True)


def ipvsadm_lines(table: list[VirtualServer]) -> list[str]:
    lines = []
    for vs in table:
        lines.append(f"-A -t {vs.address}:{vs.port} -s {vs.scheduler}")
        lines += [f"-a -t {vs.address}:{vs.port} -r {r.address}:{r.port} -m -w {r.weight}"
                  for r in vs.real_servers]
    return lines


def bench_ipvs_inner(sizes: list[int], repeat: int) -> dict[str, Any]:
    """Runs in the guest. Each size gets its own netns (IPVS state is per netns); the
    agent of each size loads first, ``ipvsadm -R`` then loads the same table into a
    fresh netns (a second load into a kernel that just held a big table is slower)."""
    from pyroute2.netns import setns

    from svcproxy.dataplane.modes import DataplaneConfig, build_proxier

    loop = asyncio.new_event_loop()
    report: dict[str, Any] = {"sizes": []}
    nodes: list[Node] = []
    for n in sizes:
        ns, ref = f"bench-agent-{n}", f"bench-ref-{n}"
        _node_netns(ns)
        _node_netns(ref)
        setns(ns)  # the proxier's netlink sockets open here and stay here
        proxier = build_proxier("ipvs", DataplaneConfig(set_sysctls=False))
        node = Node("ipvs", n, proxier, loop)
        kernel, addresses = proxier._kernel, proxier._addresses  # type: ignore[attr-defined]
        kernel.execute = node.timed(kernel.execute)
        for name in ("add_addresses", "delete_addresses", "addresses", "ensure_interface"):
            setattr(addresses, name, node.timed(getattr(addresses, name)))
        entry = node.cold()
        log(f"ipvs {n}: agent cold {entry['cold_sync_seconds']} s")
        start = time.monotonic()
        subprocess.run(["ip", "netns", "exec", ref, "ipvsadm", "-R"],
                       input="\n".join(ipvsadm_lines(node.servers)) + "\n", text=True, check=True)
        entry["tool_cold_seconds"] = round(time.monotonic() - start, 3)
        entry["cold_vs_tool"] = round(entry["cold_sync_seconds"] / entry["tool_cold_seconds"], 2)
        subprocess.run(["ip", "netns", "del", ref], check=True)
        report["sizes"].append(entry)
        nodes.append(node)
    agent = interleaved(nodes, repeat)
    for entry, node in zip(report["sizes"], nodes, strict=True):
        entry["one_change_seconds"] = round(agent[node.n], 4)
        entry["agent_own_seconds"] = round(median(node.own), 5)
        entry["full_resync_seconds"] = round(node.full_resync(), 3)
    report["one_change_ratio"] = ratio(agent)
    report["agent_own_ratio"] = ratio({node.n: median(node.own) for node in nodes})
    report["agent_rss_mb"] = rss_mb()
    report["kernel"] = os.uname().release
    report["svcproxy_file"] = sys.modules["svcproxy"].__file__
    loop.close()
    return report


def bench_ipvs(sizes: list[int], repeat: int) -> dict[str, Any]:
    from svcproxy_lab.uml import booted_guest

    mem = "2048M" if max(sizes) >= 5000 else "1024M"
    with tempfile.TemporaryDirectory() as state, booted_guest("bench-ipvs", state, mem=mem) as guest:
        proc = guest.run(
            [*module_argv("benchmarks.sync_scale", "--inner-ipvs"),
             ",".join(map(str, sizes)), "--repeat", str(repeat), "--src", _source()],
            # The guest's python would otherwise import the svcproxy installed in the venv,
            # which need not be _source() (a worktree run by another checkout's venv).
            env={"PYTHONPATH": _source()}, timeout=3600,
        )
    if proc.returncode != 0:
        return {"error": proc.stderr.decode()[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def parse_sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="iptables table sizes ('' to skip)")
    parser.add_argument("--ipvs-sizes", default="1000,10000", help="ipvs table sizes ('' to skip)")
    parser.add_argument("--repeat", type=int, default=21, help="one-change samples per size")
    parser.add_argument("--legacy", action="store_true", help="iptables-legacy instead of iptables")
    parser.add_argument("--tool-timeout", type=float, default=180.0,
                        help="stop the tool's one-input cold load after this many seconds")
    parser.add_argument("--output", help="also write the JSON report to this file")
    parser.add_argument("--src", help="svcproxy sources to measure (default: this checkout's operator/)")
    parser.add_argument("--baseline-src",
                        help="also measure these sources first (e.g. an older commit's operator/)")
    parser.add_argument("--baseline-sizes", help="iptables sizes of the baseline (default: --sizes)")
    parser.add_argument("--full-sync", action="store_true",
                        help="only the periodic full sync (iptables, --sizes): steady-state cost and"
                             " one change landing during it (--full-repeat, --changes, --offset)")
    parser.add_argument("--full-sync-modes", default="iptables",
                        help="modes of --full-sync: iptables (host, --sizes), ipvs (UML guest, --ipvs-sizes;"
                             " full_sync_ipvs.py)")
    parser.add_argument("--full-repeat", type=int, default=3, help="steady full syncs per size")
    parser.add_argument("--changes", type=int, default=5, help="changes during a full sync per size")
    parser.add_argument("--offset", type=float, default=0.1,
                        help="seconds into the full sync at which the change lands")
    parser.add_argument("--inner-ipvs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner_ipvs:
        print(json.dumps(bench_ipvs_inner(parse_sizes(args.inner_ipvs), args.repeat)))
        return 0
    report: dict[str, Any] = {
        "command": "python -m benchmarks.sync_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "source": _source(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": subprocess.run(["uname", "-r"], capture_output=True, text=True,
                                 check=False).stdout.strip(),
    }
    if args.full_sync:
        return _main_full_sync(args, report)
    if args.baseline_src:
        log(f"baseline: {args.baseline_src}")
        proc = subprocess.run(
            [*module_argv("benchmarks.sync_scale", "--src", args.baseline_src),
             "--sizes", args.baseline_sizes if args.baseline_sizes is not None else args.sizes,
             "--ipvs-sizes", args.ipvs_sizes, "--repeat", str(args.repeat),
             "--tool-timeout", str(args.tool_timeout), *(["--legacy"] if args.legacy else [])],
            stdout=subprocess.PIPE, text=True, check=False,
        )
        report["baseline"] = json.loads(proc.stdout) if proc.returncode == 0 else {
            "error": f"exit status {proc.returncode}"}
    if parse_sizes(args.sizes):
        report["iptables"] = bench_iptables(parse_sizes(args.sizes), args.repeat, args.legacy,
                                            args.tool_timeout)
    if parse_sizes(args.ipvs_sizes):
        report["ipvs"] = bench_ipvs(parse_sizes(args.ipvs_sizes), args.repeat)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def _main_full_sync(args: argparse.Namespace, report: dict[str, Any]) -> int:
    modes = args.full_sync_modes.split(",")
    if "ipvs" in modes:
        from benchmarks.full_sync_ipvs import bench_full_sync_ipvs

        report["full_sync_ipvs"] = bench_full_sync_ipvs(
            parse_sizes(args.ipvs_sizes), args.full_repeat, args.changes, args.offset, args.baseline_src)
    if "iptables" not in modes:
        return _write(report, args.output)
    extra = ["--full-repeat", str(args.full_repeat), "--changes", str(args.changes),
             "--offset", str(args.offset), *(["--legacy"] if args.legacy else [])]
    if args.baseline_src:
        log(f"baseline: {args.baseline_src}")
        proc = subprocess.run(
            [*module_argv("benchmarks.sync_scale", "--src", args.baseline_src), "--full-sync",
             "--sizes", args.baseline_sizes if args.baseline_sizes is not None else args.sizes, *extra],
            stdout=subprocess.PIPE, text=True, check=False,
        )
        report["baseline"] = json.loads(proc.stdout) if proc.returncode == 0 else {
            "error": f"exit status {proc.returncode}"}
    report["full_sync"] = bench_full_sync(parse_sizes(args.sizes), args.full_repeat, args.changes,
                                          args.legacy, args.offset)
    return _write(report, args.output)


def _write(report: dict[str, Any], output: str | None) -> int:
    text = json.dumps(report, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
