"""Data-path benchmark: request latency and throughput through a VIP vs straight to the Pod; prints JSON.

Per proxy mode, throw-away network namespaces: a client (a Pod-like client,
no default route), a node that routes and holds the mode's rules (programmed
by svcproxy's own proxier in a helper process inside the node netns), and
one backend with a small echo server. The client alternates rounds straight
to the backend (``direct``) and through the VIP (``vip``) in ABBA order, so
drift on this shared machine falls on both sides alike; the figures are
ratios VIP/direct from the same run on the same node. iptables and userspace
run on the host kernel; ipvs in a user-mode-linux guest (the host has no
IPVS), compared with direct in the same guest. Measured: latency with a new
TCP connection per request (where the modes differ: NAT or proxying happens
at connection setup) and on one persistent connection, p50/p99 in µs, and
throughput in requests/s with ``--concurrency`` client processes. Traffic
never starts or ends in the root netns. Usage (root, from the repo; JSON on
stdout, progress on stderr; --serve, --client, --program and --inner are
this file's own helper roles inside the namespaces or the guest):

    .venv/bin/python -m benchmarks.dataplane [--modes ipvs,iptables,userspace] [--png out.png]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from benchmarks._source import module_argv
from svcproxy_lab.echo import serve_lines
from svcproxy_lab.stats import nearest_rank
from svcproxy_lab.topology import (
    BACKEND_IP,
    CLIENT_IP,
    CLIENT_VIP_IP,
    NODE_BACKEND_SIDE,
    POD_CIDR,
    PathTopology,
    sh,
)

if TYPE_CHECKING:
    from svcproxy.dataplane.proxier import Proxier

SCRIPT = Path(__file__).resolve()
BACKEND_PORT = 8080
VIP, VIP_PORT = "10.96.9.10", 80
PATHS = ("direct", "vip")
TARGET_P50_RATIO = 1.05  # issue 9: ipvs and iptables add no more than 5 % to p50
REQUEST = b"GET\n"


# --- pure helpers (unit tested in tests/unit/test_benchmarks_dataplane.py) ----------


def summarize(rounds: Sequence[Sequence[float]], errors: int = 0) -> dict[str, Any]:
    """p50/p99/mean over all rounds pooled (microseconds), plus each round's p50."""
    pooled = [s for r in rounds for s in r]
    return {
        "p50_us": round(nearest_rank(pooled, 50), 1),
        "p99_us": round(nearest_rank(pooled, 99), 1),
        "mean_us": round(statistics.fmean(pooled), 1),
        "requests": len(pooled),
        "errors": errors,
        "round_p50_us": [round(nearest_rank(r, 50), 1) for r in rounds if r],
    }


def ab_order(rounds: int) -> list[str]:
    """``rounds`` rounds of each path in ABBA order: direct, vip, vip, direct, direct, vip, ...

    Alternating which side goes first cancels a linear drift in machine load."""
    order: list[str] = []
    for i in range(rounds):
        order.extend(PATHS if i % 2 == 0 else reversed(PATHS))
    return order


def ratio(vip: float, direct: float) -> float | None:
    """VIP/direct rounded to 3 places; None when direct is zero (nothing to compare with)."""
    return round(vip / direct, 3) if direct else None


def paired_ratio(vip: Sequence[float], direct: Sequence[float]) -> float | None:
    """Median of round-by-round ratios (round i of vip against round i of direct, which ran
    next to it): less moved by one noisy round than a ratio of pooled figures."""
    pairs = [v / d for v, d in zip(vip, direct, strict=False) if d]
    return round(statistics.median(pairs), 3) if pairs else None


def compare(direct: dict[str, Any], vip: dict[str, Any]) -> dict[str, Any]:
    """Ratios VIP/direct of two :func:`summarize` results, and what the VIP adds to p50 in µs."""
    v, d = vip, direct
    return {"p50": ratio(v["p50_us"], d["p50_us"]), "p50_added_us": round(v["p50_us"] - d["p50_us"], 1),
            "p99": ratio(v["p99_us"], d["p99_us"]),
            "p50_paired_median": paired_ratio(v["round_p50_us"], d["round_p50_us"])}


def verdict(mode: str, p50_ratio: float | None) -> dict[str, Any]:
    """The issue's target for ipvs and iptables (p50 within 5 % of direct); userspace has none."""
    if mode == "userspace":
        return {"target": "none (reported as measured)"}
    met = p50_ratio is not None and p50_ratio <= TARGET_P50_RATIO
    return {"target": f"new-connection p50 ratio <= {TARGET_P50_RATIO}", "met": met}


def expected_peer(mode: str) -> str:
    """Who the backend sees as the client through the VIP: the client itself (the client is
    in the cluster CIDR, so no masquerade), or the node for userspace (the proxy connects)."""
    return NODE_BACKEND_SIDE if mode == "userspace" else CLIENT_VIP_IP


# --- roles that run inside the namespaces ---------------------------------------------


def _connect(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    return s


def _exchange(s: socket.socket) -> bytes:
    s.sendall(REQUEST)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("the server closed the connection before answering")
        answer += chunk
    return answer


def _one_new(host: str, port: int) -> bytes:
    with _connect(host, port) as s:
        return _exchange(s)


def _requests(host: str, port: int, persistent: bool, count: float, seconds: float) -> dict[str, Any]:
    """Requests one after another (each on a new connection, or all on one) until ``count``
    are done or ``seconds`` have passed; the time of each in microseconds."""
    deadline = time.monotonic() + seconds
    samples: list[float] = []
    errors, first_error = 0, ""
    conn = _connect(host, port) if persistent else None
    clock = time.perf_counter_ns
    while len(samples) + errors < count and time.monotonic() < deadline:
        start = clock()
        try:
            _exchange(conn) if conn else _one_new(host, port)
        except OSError as err:
            errors += 1
            first_error = first_error or f"{type(err).__name__}: {err}"
            if conn:
                conn.close()
                conn = _connect(host, port)
            continue
        samples.append((clock() - start) / 1000)
    if conn:
        conn.close()
    return {"samples_us": [round(s, 1) for s in samples], "errors": errors, "first_error": first_error}


def _worker(job: tuple[str, int, bool, float], go: Any, out: Any) -> None:
    """One load process: waits for the others at the barrier, then sends requests back to
    back for ``seconds``; puts (done, errors, elapsed, first error) on ``out``."""
    host, port, persistent, seconds = job
    try:
        go.wait(timeout=120)
        start = time.monotonic()
        got = _requests(host, port, persistent, float("inf"), seconds)
        out.put((len(got["samples_us"]), got["errors"], time.monotonic() - start, got["first_error"]))
    except BaseException as err:
        out.put((0, 1, 1.0, f"{type(err).__name__}: {err}"))


def _throughput(cmd: dict[str, Any]) -> dict[str, Any]:
    """``workers`` forked clients released together by a barrier (forking is slow in a UML
    guest: a start time fixed in advance could pass before the last one exists)."""
    ctx = multiprocessing.get_context("fork")
    workers, go, out = int(cmd["workers"]), ctx.Barrier(int(cmd["workers"])), ctx.Queue()
    job = (cmd["host"], cmd["port"], cmd["conn"] == "persistent", float(cmd["seconds"]))
    procs = [ctx.Process(target=_worker, args=(job, go, out)) for _ in range(workers)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=float(cmd["seconds"]) + 180) for _ in procs]
    for proc in procs:
        proc.join()
    return {"requests": sum(r[0] for r in results), "errors": sum(r[1] for r in results),
            "rps": round(sum(r[0] / r[2] for r in results), 1),
            "first_error": next((r[3] for r in results if r[3]), "")}


def client_loop() -> None:
    """Load client in the client netns: one JSON command per stdin line, one JSON answer
    per stdout line (started once per mode: Python starts slowly in a UML guest)."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, before = json.loads(line), syn_retransmits()
        if cmd["op"] == "ask":
            try:
                answer: dict[str, Any] = {"answer": _one_new(cmd["host"], cmd["port"]).decode()}
            except OSError as err:
                answer = {"error": f"{type(err).__name__}: {err}"}
        elif cmd["op"] == "latency":
            answer = _requests(cmd["host"], cmd["port"], cmd["conn"] == "persistent", cmd["count"],
                               cmd.get("max_seconds", 30))
        else:
            answer = _throughput(cmd)
        print(json.dumps({**answer, "syn_retransmits": syn_retransmits() - before}), flush=True)


def syn_retransmits() -> int:
    """TcpExt TCPSynRetrans of this netns: a dropped SYN stalls a new connection for 1 s."""
    names, values = [ln.split() for ln in Path("/proc/net/netstat").read_text().splitlines()[:2]]
    return int(values[names.index("TCPSynRetrans")])


def hold_program(mode: str) -> None:
    """In the node netns: program VIP:80 -> backend:8080 with svcproxy's proxier for ``mode``,
    report the sync on stdout, keep it (and, for userspace, serve it) until stdin closes,
    then clean up what the proxier owns."""
    import asyncio

    from svcproxy.dataplane.modes import DataplaneConfig, build_proxier

    # Built outside the event loop, as the agent does: pyroute2's sync IPRoute runs a loop
    # of its own in its constructor.
    proxier = build_proxier(mode, DataplaneConfig(cluster_cidrs=(POD_CIDR,)))
    asyncio.run(_hold(proxier))


async def _hold(proxier: Proxier) -> None:
    import asyncio

    from svcproxy.dataplane.table import RealServer, VirtualServer, make_table

    caps = proxier.capabilities()
    vs = VirtualServer.create("TCP", VIP, VIP_PORT, [RealServer(BACKEND_IP, BACKEND_PORT)],
                              scheduler="rr", owner="bench/dataplane")
    result = await proxier.sync(make_table([vs]))
    print(json.dumps({"available": caps.available, "reason": caps.reason,
                      "operations": dict(result.operations),
                      "errors": [f"{type(e).__name__}: {e}" for e in result.errors]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await proxier.cleanup()
    await proxier.close()


def log(msg: str) -> None:
    print(f"[dataplane {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def read_json(proc: subprocess.Popen[bytes], what: str) -> dict[str, Any]:
    out: BinaryIO | None = proc.stdout  # type: ignore[assignment]
    line = out.readline() if out else b""
    if not line:
        raise RuntimeError(f"the {what} process exited ({proc.poll()}) without answering: see stderr")
    return cast(dict[str, Any], json.loads(line))


def ask(proc: subprocess.Popen[bytes], **cmd: Any) -> dict[str, Any]:
    """One command to the --client process, its answer."""
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(cmd).encode() + b"\n")
    proc.stdin.flush()
    return read_json(proc, "client")


@contextmanager
def programmed(mode: str) -> Iterator[tuple[PathTopology, dict[str, Any]]]:
    topo = PathTopology(lambda *args: module_argv("benchmarks.dataplane", *args))
    try:
        topo.create()
        read_json(topo.start("be", "--serve", "be0", str(BACKEND_PORT)), "echo server")
        sync = read_json(topo.start("node", "--program", mode), f"{mode} proxier")
        if not sync["available"] or sync["errors"]:
            raise RuntimeError(f"{mode} proxier could not program the VIP: {sync}")
        yield topo, sync
    finally:
        topo.destroy()


def abba(client: subprocess.Popen[bytes], target: dict[str, tuple[str, int]], rounds: int, what: str,
         **cmd: Any) -> dict[str, list[dict[str, Any]]]:
    """The client's answers to ``cmd`` per path, ``rounds`` each, in ABBA order."""
    got: dict[str, list[dict[str, Any]]] = {p: [] for p in PATHS}
    for path in ab_order(rounds):
        host, port = target[path]
        got[path].append(answer := ask(client, host=host, port=port, **cmd))
        if answer["errors"]:
            log(f"{what} {path}: {answer['errors']} failed, first: {answer['first_error']}")
    return got


def measure_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode, fresh namespaces: check both paths, then interleaved rounds of each kind."""
    log(f"{mode}: namespaces, echo server, proxier")
    with programmed(mode) as (topo, sync):
        client = topo.start("cli", "--client")
        read_json(client, "client")
        target = {"direct": (BACKEND_IP, BACKEND_PORT), "vip": (VIP, VIP_PORT)}
        seen: dict[str, str] = {}
        for path, (host, port) in target.items():
            answer = ask(client, op="ask", host=host, port=port)
            if "error" in answer or not answer["answer"].startswith("be0 "):
                raise RuntimeError(f"{mode}: no answer from the backend via {path} {host}:{port}: {answer}")
            seen[path] = answer["answer"].split()[1].split(":")[0]
        result: dict[str, Any] = {
            "kernel": platform.release(), "sync_operations": sync["operations"], "backend_saw": seen,
            "path_as_expected": seen == {"direct": CLIENT_IP, "vip": expected_peer(mode)}}
        for conn, count in (("new", args.requests), ("persistent", args.persistent_requests)):
            for path in PATHS:  # warm-up: ARP, conntrack, caches, the client's own code paths
                host, port = target[path]
                ask(client, op="latency", host=host, port=port, conn=conn, count=max(20, count // 20))
            got = abba(client, target, args.rounds, f"{mode} {conn}", op="latency", conn=conn,
                       count=count, max_seconds=args.round_seconds)
            stats = {p: {**summarize([g["samples_us"] for g in got[p]], sum(g["errors"] for g in got[p])),
                         "syn_retransmits": sum(g["syn_retransmits"] for g in got[p])} for p in PATHS}
            result[f"{conn}_connection_latency"] = {**stats, "ratio": compare(stats["direct"], stats["vip"])}
            log(f"{mode} {conn}: p50 direct {stats['direct']['p50_us']} us, vip {stats['vip']['p50_us']} us")
        tput: dict[str, Any] = {}
        for conn in ("new", "persistent"):
            got = abba(client, target, args.throughput_rounds, f"{mode} throughput {conn}",
                       op="throughput", conn=conn, seconds=args.seconds, workers=args.concurrency)
            rps = {p: [g["rps"] for g in got[p]] for p in PATHS}
            direct, vip = statistics.median(rps["direct"]), statistics.median(rps["vip"])
            tput[f"{conn}_connection"] = {  # medians of the rounds: one stalled round is common here
                "direct_rps": round(direct, 1), "vip_rps": round(vip, 1), "ratio": ratio(vip, direct),
                "ratio_paired_median": paired_ratio(rps["vip"], rps["direct"]), "rounds_rps": rps,
                "errors": sum(g["errors"] for p in PATHS for g in got[p]),
                "syn_retransmits": {p: sum(g["syn_retransmits"] for g in got[p]) for p in PATHS}}
            log(f"{mode} throughput {conn}: direct {direct:.0f}/s, vip {vip:.0f}/s")
        result["throughput"] = tput
        # A full conntrack table drops new SYNs: show how close the rounds came.
        ct = "/proc/sys/net/netfilter/nf_conntrack_"
        count = subprocess.run(["ip", "netns", "exec", topo.ns("node"), "cat", ct + "count"],
                               capture_output=True, text=True, check=False).stdout.strip()
        result["conntrack"] = {"entries_after": int(count or 0), "max": int(Path(ct + "max").read_text())}
        result["verdict"] = verdict(mode, result["new_connection_latency"]["ratio"]["p50"])
        return result


def run_here(modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in modes:
        try:
            out[mode] = measure_mode(mode, args)
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            log(f"{mode}: FAILED: {err}")
            out[mode] = {"error": str(err)}
    return out


def run_in_guest(modes: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The same measurement inside a user-mode-linux guest (real IPVS); direct in the same guest."""
    from svcproxy_lab.uml import booted_guest

    argv = [*module_argv("benchmarks.dataplane", "--inner"), "--modes", ",".join(modes), "--requests",
            str(args.guest_requests), "--persistent-requests", str(args.guest_requests * 2)]
    for name in ("rounds", "round_seconds", "seconds", "concurrency", "throughput_rounds"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    log(f"booting a UML guest for {','.join(modes)}")
    with tempfile.TemporaryDirectory(prefix="svcpdp-") as state, \
            booted_guest("bench-dp", state, mem=args.guest_mem) as guest:
        proc = guest.run(argv, timeout=1800)
    for line in proc.stderr.decode(errors="replace").splitlines():
        print(f"  guest: {line}", file=sys.stderr)
    if proc.returncode != 0:
        return {m: {"error": f"guest run exited {proc.returncode}"} for m in modes}
    inner: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    for mode in inner.values():
        mode["where"] = "user-mode-linux guest"
    return inner


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m, r in report["modes"].items() if "error" not in r]
    panels = (
        ("latency, new connection per request (µs, log)",
         [(f"{s} {q}", ("new_connection_latency", s, f"{q}_us")) for q in ("p50", "p99") for s in PATHS]),
        ("VIP / direct (same run)",
         [(f"latency {q}", ("new_connection_latency", "ratio", q)) for q in ("p50", "p99")]
         + [(f"req/s {c} conn", ("throughput", f"{c}_connection", "ratio")) for c in ("new", "persistent")]),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (title, bars) in zip(axes, panels, strict=True):
        for i, (label, (a, b, c)) in enumerate(bars):
            ax.bar([x + (i - 1.5) * 0.2 for x in range(len(modes))],
                   [report["modes"][m][a][b][c] or 0 for m in modes], 0.2, label=label)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].axhline(TARGET_P50_RATIO, color="grey", linestyle="--", linewidth=1)
    fig.suptitle("svcproxy data path: VIP vs direct to the Pod, same run (ipvs: in a UML guest)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="iptables,userspace,ipvs",
                        help="modes to measure (ipvs always in a UML guest)")
    parser.add_argument("--guest-modes", default="ipvs",
                        help="modes also run in the UML guest (ipvs,iptables compares the two in one kernel)")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds per path (ABBA order)")
    parser.add_argument("--requests", type=int, default=250, help="requests per new-connection round")
    parser.add_argument("--persistent-requests", type=int, default=500)
    parser.add_argument("--guest-requests", type=int, default=100, help="requests per round in the guest")
    parser.add_argument("--round-seconds", type=float, default=5.0, help="cap on one latency round")
    parser.add_argument("--seconds", type=float, default=1.0, help="one throughput round")
    parser.add_argument("--throughput-rounds", type=int, default=5, help="per path and kind")
    parser.add_argument("--concurrency", type=int, default=2, help="client processes for throughput")
    parser.add_argument("--guest-mem", default="512M")
    parser.add_argument("--png", help="also write a plot here")
    parser.add_argument("--serve", nargs=2, metavar=("NAME", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--program", help=argparse.SUPPRESS)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_lines(args.serve[0], int(args.serve[1]))
    elif args.client:
        client_loop()
    elif args.program:
        hold_program(args.program)
    if args.serve or args.client or args.program:
        return 0
    if os.geteuid() != 0:
        print("dataplane benchmark: run as root (it creates network namespaces and programs "
              "netfilter/IPVS in them)", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"ipvs", "iptables", "userspace"}
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}: use ipvs, iptables, userspace")
    if args.inner:  # in the guest: a 512M guest gets 4,096 conntrack entries; the rounds leave
        # tens of thousands in TIME_WAIT (120 s), and a full table drops new SYNs.
        sh("modprobe", "-a", "ip_vs", "nf_conntrack")
        sh("sysctl", "-qw", "net.netfilter.nf_conntrack_max=262144")
        print(json.dumps(run_here(modes, args)))
        return 0
    # ipvs only in the guest; other modes on the host, and also in the guest when asked.
    host_modes = [m for m in modes if m != "ipvs"]
    guest_modes = [m for m in modes if m == "ipvs" or m in args.guest_modes.split(",")]
    report: dict[str, Any] = {
        "benchmark": "dataplane",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([".venv/bin/python", "-m", "benchmarks.dataplane", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "host_kernel": platform.release()},
        "settings": {k: getattr(args, k) for k in ("rounds", "requests", "persistent_requests",
                                                   "guest_requests", "seconds", "throughput_rounds",
                                                   "concurrency")},
        "topology": {"client": f"{CLIENT_IP} (to the Pod), {CLIENT_VIP_IP} (to the VIP)",
                     "backend": f"{BACKEND_IP}:{BACKEND_PORT}", "vip": f"{VIP}:{VIP_PORT}",
                     "hops": "client -> node (routes, the mode's rules) -> backend"},
        "modes": {},
    }
    for mode, res in run_here(host_modes, args).items():
        report["modes"][mode] = {"where": "host kernel, network namespaces", **res}
    if guest_modes:
        for mode, res in run_in_guest(guest_modes, args).items():
            report["modes"][f"{mode}@uml" if mode in report["modes"] else mode] = res
    if args.png:
        plot(report, args.png)
    print(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in report["modes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
