"""Benchmark of the agent's data plane: cold syncs and one-endpoint changes; prints JSON.

iptables mode runs on the host kernel in a throw-away network namespace;
ipvs mode runs inside a user-mode-linux guest (the host kernel has no IPVS).
Each cold sync is compared with the kernel's own tool loading the same table
in the same kernel in the same run (``iptables-restore``, ``ipvsadm -R``).
No traffic is sent. Usage (root):

    .venv/bin/python benchmarks/agent_sync.py [--sizes 1000,10000] [--ipvs-sizes 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by

REALS = 10


def table(n: int) -> dict[Any, VirtualServer]:
    out = []
    for i in range(n):
        vip = f"10.96.{i // 250}.{i % 250 + 1}"
        reals = []
        for j in range(REALS):
            k = i * REALS + j
            reals.append(RealServer(f"10.244.{(k // 250) % 250}.{k % 250 + 1}", 8080))
        out.append(VirtualServer.create("TCP", vip, 80, reals, owner=f"bench/svc{i}"))
    return make_table(out)


def changed_one(t: dict[Any, VirtualServer]) -> tuple[dict[Any, VirtualServer], str]:
    vs = next(iter(t.values()))
    new = vs.with_reals([*vs.real_servers[:-1], RealServer("10.244.255.1", 8080)]).canonical()
    return owned_by({vs.key: new}, {vs.owner}), vs.owner


def one_change(sync: Any, t: dict[Any, VirtualServer]) -> float:
    """Median time of a partial sync that swaps one real server (and back)."""
    changed, owner = changed_one(t)
    original = owned_by(t, {owner})
    times = []
    for i in range(7):
        start = time.monotonic()
        result = sync(changed if i % 2 == 0 else original, frozenset({owner}))
        times.append(time.monotonic() - start)
        assert result.ok and result.total_operations, (result.errors, result.operations)
    return round(sorted(times)[len(times) // 2], 4)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# iptables, host kernel --------------------------------------------------------------


def bench_iptables(n: int) -> dict[str, Any]:
    from svcproxy.dataplane.iptables import rules
    from svcproxy.dataplane.iptables.proxier import IptablesProxier
    from svcproxy.dataplane.netfilter import Netfilter

    t = table(n)
    out: dict[str, Any] = {"services": n, "real_servers_each": REALS}
    ns = f"svcpb-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        # The kernel's own tool: the same rule text, one iptables-restore.
        servers = [t[k] for k in sorted(t)]
        chains = [c for vs in servers for c in rules.chains_of(vs)]
        text = "\n".join(
            [
                "*nat",
                *(f":{c} - [0:0]" for c in (*rules.BASE_CHAINS, *chains)),
                *rules.base_rules(),
                *(rules.service_jump(vs) for vs in servers),
                *(r for vs in servers for r in rules.service_rules(vs, ("10.244.0.0/16",), False)),
                "COMMIT",
                "",
            ]
        )
        start = time.monotonic()
        subprocess.run(
            ["ip", "netns", "exec", ns, "iptables-restore", "--noflush"],
            input=text, text=True, check=True,
        )
        out["iptables_restore_seconds"] = round(time.monotonic() - start, 3)
        out["rules"] = text.count("\n-A ")
        subprocess.run(["ip", "netns", "del", ns], check=True)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        proxier = IptablesProxier(Netfilter(netns=ns), Netfilter(ipv6=True, netns=ns))
        start = time.monotonic()
        result = proxier.sync_blocking(t)
        out["cold_sync_seconds"] = round(time.monotonic() - start, 3)
        out["cold_sync_operations"] = result.operations
        assert result.ok, result.errors
        out["one_endpoint_change_seconds"] = one_change(proxier.sync_blocking, t)
        start = time.monotonic()
        proxier.sync_blocking(t)
        out["full_resync_seconds"] = round(time.monotonic() - start, 3)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    return out


# ipvs, inside a UML guest ------------------------------------------------------------


def bench_ipvs_inner(n: int) -> dict[str, Any]:
    """Runs in the guest. Each load gets a fresh netns (IPVS state is per netns): a
    second load into a kernel that just held a big table is up to 3x slower (seen with
    both tools), so the agent goes first and ipvsadm -R second, into separate netns."""
    from pyroute2.netns import setns

    from svcproxy.dataplane.modes import DataplaneConfig, build_proxier

    ours, ref = f"bench-ours-{n}", f"bench-ref-{n}"
    for ns in (ours, ref):
        subprocess.run(["ip", "netns", "add", ns], check=True)
        # IPVS refuses real servers the netns has no route to.
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "pods", "type", "dummy"],
                    ["addr", "add", "10.244.0.1/16", "dev", "pods"],
                    ["link", "set", "pods", "up"]):
            subprocess.run(["ip", "netns", "exec", ns, "ip", *cmd], check=True)
    setns(ours)

    t = table(n)
    out: dict[str, Any] = {"services": n, "real_servers_each": REALS}
    lines = []
    for vs in t.values():
        lines.append(f"-A -t {vs.address}:{vs.port} -s {vs.scheduler}")
        lines += [
            f"-a -t {vs.address}:{vs.port} -r {r.address}:{r.port} -m -w {r.weight}"
            for r in vs.real_servers
        ]
    proxier = build_proxier("ipvs", DataplaneConfig(set_sysctls=False))
    sync = proxier.sync_blocking  # type: ignore[attr-defined]
    start = time.monotonic()
    result = sync(t)
    out["cold_sync_seconds"] = round(time.monotonic() - start, 3)
    out["cold_sync_operations"] = dict(result.operations)
    out["cold_sync_errors"] = [str(e) for e in result.errors][:3]
    out["one_endpoint_change_seconds"] = one_change(sync, t)
    start = time.monotonic()
    result = sync(t)
    out["full_resync_seconds"] = round(time.monotonic() - start, 3)
    out["full_resync_operations"] = dict(result.operations)
    start = time.monotonic()
    proxier.cleanup_blocking()  # type: ignore[attr-defined]
    out["cleanup_seconds"] = round(time.monotonic() - start, 3)
    out["agent_rss_mb"] = round(rss_mb(), 1)
    subprocess.run(["ip", "netns", "del", ours], check=True)
    start = time.monotonic()
    subprocess.run(["ip", "netns", "exec", ref, "ipvsadm", "-R"],
                   input="\n".join(lines) + "\n", text=True, check=True)
    out["ipvsadm_restore_seconds"] = round(time.monotonic() - start, 3)
    subprocess.run(["ip", "netns", "del", ref], check=True)
    return out


def bench_ipvs(sizes: list[int]) -> list[dict[str, Any]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))
    from svcproxy.lab.uml import booted_guest

    results = []
    with tempfile.TemporaryDirectory() as state, booted_guest(
        "bench-ipvs", state, mem="1536M"
    ) as guest:
        for n in sizes:
            proc = guest.run(
                [sys.executable, str(Path(__file__).resolve()), "--inner-ipvs", str(n)],
                timeout=3600,
            )
            if proc.returncode != 0:
                results.append({"services": n, "error": proc.stderr.decode()[-2000:]})
            else:
                results.append(json.loads(proc.stdout.decode().strip().splitlines()[-1]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="iptables table sizes")
    parser.add_argument("--ipvs-sizes", default="1000,10000", help="ipvs table sizes (guest)")
    parser.add_argument("--inner-ipvs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner_ipvs:
        print(json.dumps(bench_ipvs_inner(args.inner_ipvs)))
        return 0
    report: dict[str, Any] = {"iptables": [], "ipvs": []}
    for n in [int(s) for s in args.sizes.split(",") if s]:
        report["iptables"].append(bench_iptables(n))
    report["iptables_agent_rss_mb"] = round(rss_mb(), 1)
    ipvs_sizes = [int(s) for s in args.ipvs_sizes.split(",") if s]
    if ipvs_sizes:
        report["ipvs"] = bench_ipvs(ipvs_sizes)
    for mode in ("iptables", "ipvs"):
        runs = [r for r in report[mode] if "one_endpoint_change_seconds" in r]
        if len(runs) >= 2 and runs[0]["one_endpoint_change_seconds"]:
            report[f"{mode}_change_ratio_largest_vs_smallest"] = round(
                runs[-1]["one_endpoint_change_seconds"] / runs[0]["one_endpoint_change_seconds"], 2
            )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
