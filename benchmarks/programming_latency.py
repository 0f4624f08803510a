"""Programming latency: API write -> kernel NAT state on every node, svcproxy vs kube-proxy.

For each size N a fresh 3-node netns lab gets N selectorless Services with 10 endpoints
each (hand-written EndpointSlices). Each system then programs the same Services in turn
(kube-proxy iptables, kube-proxy nftables, svcproxy with one iptables-mode policy selecting
all of them) and the same churn runs against it: replace one endpoint of a random Service,
add a Service, remove one, toggle ClientIP affinity (the Service's own field for kube-proxy;
a second policy selecting one Service for svcproxy). Each change waits until every node's
kernel shows it, read by one ``nft monitor``-fed reader per node (``_lab/kernel_watch.py``),
then ``--gap`` seconds pass before the next one. Prints JSON on stdout (progress on stderr)
and can draw ``--png``. Run as root, holding the lab turn:

    flock /run/svcproxy-lab-turn.lock .venv/bin/python -m benchmarks.programming_latency \\
        --sizes 100,1000 --changes 60 --png benchmarks/programming_latency.png

``--dataplane ipvs`` measures IPVS instead: 3 user-mode-linux nodes (``--ipvs-nodes 3``),
kube-proxy in ipvs mode vs svcproxy with one ``mode: ipvs`` (scheduler rr) policy, the same
churn (affinity is the IPVS persistence flag), read by a polling reader in each guest
(``_lab/ipvs_watch.py`` / ``_lab/uml_watch.py``: no event stream exists for IPVS); the JSON
adds each guest's clock offset from the host and the readers' poll interval and cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._lab import harness
from benchmarks._lab.harness import (
    NAMESPACE,
    POLICY_PATH,
    SVC_PATH,
    BenchLab,
    KernelWatchers,
    Population,
    Seen,
    say,
)
from benchmarks._lab.uml_watch import IpvsWatchers, sample_guest, scrape_guest_histograms
from svcproxy_lab.cluster import LabError
from svcproxy_lab.stats import histogram_summary, ratio, summary

SYSTEMS = ("kube-proxy-iptables", "kube-proxy-nftables", "svcproxy-iptables")
IPVS_SYSTEMS = ("kube-proxy-ipvs", "svcproxy-ipvs")
PARTIAL: list[dict[str, Any]] = []  # each size's results, filled in as they are measured
K8S_VERSION = "v1.36.3"


def key(cluster_ip: str) -> str:
    return f"{cluster_ip}:{harness.PORT}"


class Phase:
    """One system programming the lab's Services, and the churn measured against it."""

    def __init__(self, bench: BenchLab, watchers: KernelWatchers, pop: Population, system: str,
                 timeout: float) -> None:
        self.bench = bench
        self.w = watchers
        self.pop = pop
        self.system = system
        self.timeout = timeout
        self.cold_timeout = 240.0
        self.samples: dict[str, list[float]] = {"endpoint": [], "add": [], "remove": [], "affinity": []}
        self.timeouts: dict[str, int] = {k: 0 for k in self.samples}
        self.added: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.operator_args: list[str] = []
        self.affinity_on = False

    @property
    def is_svcproxy(self) -> bool:
        return self.system.startswith("svcproxy")

    @property
    def in_guests(self) -> bool:
        return self.system.endswith("-ipvs")

    @property
    def mode(self) -> str:
        return self.system.rsplit("-", 1)[1]

    def processes(self) -> list[str]:
        node = self.bench.node_names[0]
        if self.is_svcproxy:
            return ["operator", f"{node}-agent"]
        return [f"{node}-kube-proxy"]

    def start(self) -> float | None:
        """Start the system; seconds until every node programs every Service (cold sync)."""
        start = time.monotonic()
        if self.is_svcproxy:
            self.bench.start_svcproxy(self.operator_args)
            harness.create_policy(self.bench._api(), harness.policy_body("bench-all", mode=self.mode))
            # The affinity churn flips this one; priority 10 wins svc-0 from bench-all.
            harness.create_policy(self.bench._api(), harness.policy_body(
                "bench-one", mode=self.mode, services=["svc-0"], affinity=False, priority=10))
        else:
            self.bench.start_kube_proxy(self.system.removeprefix("kube-proxy-"))
        done = self.w.wait_programmed(len(self.pop.services), timeout=self.cold_timeout)
        if done is None:
            return None
        cold = round(time.monotonic() - start, 2)
        if self.is_svcproxy:
            # Churn starts once the operator is idle: policy Programmed, every Service handed over.
            api = self.bench._api()
            harness.wait_policy(api, "bench-all", time.time(), self.cold_timeout, poll=1)
            harness.wait_handover(api, len(self.pop.services), self.cold_timeout)
        return cold

    def sync_histograms(self) -> list[harness.Histograms]:
        """Each node's sync-duration histogram as the system itself exports it."""
        port, name = harness.SYNC_HISTOGRAMS["svcproxy" if self.is_svcproxy else "kube-proxy"]
        if self.in_guests:
            return [scrape_guest_histograms(self.bench, node, port, name) for node in self.bench.node_names]
        return [harness.scrape_histograms(node, port, name) for node in self.bench.node_names]

    def sample_processes(self) -> dict[str, dict[str, float] | None]:
        if not self.in_guests:
            return harness.sample_processes(self.bench, self.processes())
        # The agents and kube-proxy run in the guests: read their /proc there.
        node = self.bench.node_names[0]
        name = "agent" if self.is_svcproxy else "kube-proxy"
        out = {f"{node}-{name}": sample_guest(self.bench, node, name)}
        if self.is_svcproxy:
            out["operator"] = harness.sample(self.bench.pid("operator"))
        return out

    def stop(self) -> str | None:
        """Stop kube-proxy (svcproxy runs last); what went wrong in its cleanup, if anything."""
        if self.is_svcproxy:
            return None
        problem = None
        try:
            self.bench.stop_kube_proxy()
        except LabError as exc:
            if not self.in_guests:
                raise
            # In the UML guests `kube-proxy --cleanup` fails on its ip6tables-legacy rules;
            # what matters here is that its IPVS virtual servers are gone: checked below.
            problem = str(exc)[-600:]
            say(f"kube-proxy cleanup reported an error (IPVS checked next): {problem}")
        self.bench._api().merge_patch(f"{SVC_PATH}/svc-0", {"spec": {"sessionAffinity": "None"}})
        if self.in_guests:
            left = {n: sum(c.values()) for n, c in self.w.count().items()}
            if any(left.values()):
                raise SystemExit(f"kube-proxy left IPVS virtual servers behind {left}; "
                                 "svcproxy would be measured against them")
        return problem

    def measure(self, kind: str, k: str, ok: Any, t0: float) -> None:
        took = self.w.when(k, ok, t0, self.timeout)
        self.w.unwatch(k)
        if took is None:
            self.timeouts[kind] += 1
        else:
            self.samples[kind].append(took)
        # Every change, with wall-clock start and each node's time, to line up with the logs.
        self.records.append({"kind": kind, "key": k, "t0": round(t0, 3),
                             "took": None if took is None else round(took, 4),
                             "nodes": dict(self.w.last_per_node) if took is not None else None})

    def endpoint(self, rng: random.Random) -> None:
        name = rng.choice(sorted(set(self.pop.services) - set(self.added) - {"svc-0"}))
        cluster_ip = self.pop.services[name][0]
        k = key(cluster_ip)
        self.w.watch(k)
        old, new, t0 = self.bench.replace_endpoint(self.pop, name)
        want_new, gone = f"{new}:{harness.TARGET_PORT}", f"{old}:{harness.TARGET_PORT}"
        self.measure("endpoint", k, lambda s: want_new in s.targets and gone not in s.targets, t0)

    def add(self) -> None:
        index = self.pop.next_index
        k = key(harness.vip(index))
        self.w.watch(k)
        name, _, t0 = self.bench.add_service(self.pop)
        self.added.append(name)
        self.measure("add", k, lambda s: len(s.targets) == harness.ENDPOINTS, t0)

    def remove(self) -> None:
        name = self.added.pop(0)
        k = key(self.pop.services[name][0])
        self.w.watch(k)
        t0 = self.bench.remove_service(self.pop, name)
        # nf_tables: no rule left; IPVS: the virtual server itself is gone.
        self.measure("remove", k, lambda s: not s.targets and not s.present, t0)

    def affinity(self) -> None:
        k = key(self.pop.services["svc-0"][0])
        self.w.watch(k)
        self.affinity_on = not self.affinity_on
        want = self.affinity_on
        api = self.bench._api()
        t0 = time.time()
        if self.is_svcproxy:
            api.merge_patch(f"{POLICY_PATH}/bench-one",
                            {"spec": {"sessionAffinity": {"type": "ClientIP" if want else "None"}}})
        else:
            api.merge_patch(f"{SVC_PATH}/svc-0",
                            {"spec": {"sessionAffinity": "ClientIP" if want else "None"}})

        def ok(s: Seen) -> bool:
            return s.affinity == want and len(s.targets) == harness.ENDPOINTS

        self.measure("affinity", k, ok, t0)

    def churn(self, changes: int, gap: float, seed: int) -> None:
        """``changes`` operations: 60 % endpoint swaps, 15 % adds, 15 % removes, 10 % affinity."""
        rng = random.Random(seed)
        plan = (["endpoint"] * (changes * 60 // 100) + ["add"] * (changes * 15 // 100)
                + ["remove"] * (changes * 15 // 100))
        plan += ["affinity"] * (changes - len(plan))
        rng.shuffle(plan)
        for i, planned in enumerate(plan, start=1):
            op = "add" if planned == "remove" and not self.added else planned
            if op == "endpoint":
                self.endpoint(rng)
            elif op == "add":
                self.add()
            elif op == "remove":
                self.remove()
            else:
                self.affinity()
            if i % 10 == 0:
                say(f"{self.system}: {i}/{len(plan)} changes; endpoint so far "
                    f"{summary(self.samples['endpoint'])}")
            time.sleep(gap)
        while self.added:  # leave the Service count as it was for the next system
            self.remove()


def run_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    ipvs = args.dataplane == "ipvs"
    if ipvs:
        # 256 MB (the lab's default) holds the kubelet and one proxy, but kube-proxy or the
        # agent with 1k Services, the reader and the page cache come close to it.
        os.environ.setdefault("SVCPROXY_UML_MEM", "512M")
    out: dict[str, Any] = {"services": n, "endpoints_each": harness.ENDPOINTS, "nodes": 3,
                           "node_kind": "uml" if ipvs else "netns"}
    PARTIAL.append(out)  # what main() writes if the run fails before this size is done
    pop = Population()
    with BenchLab(Path(args.state_dir), ipvs_nodes=3 if ipvs else 0) as bench:
        bench.up()
        bench.populate(n, pop)
        watchers: KernelWatchers = (IpvsWatchers(bench, args.poll_interval, args.correct_clock)
                                    if ipvs else KernelWatchers(bench.node_names))
        with watchers:
            if isinstance(watchers, IpvsWatchers):
                out["guest_clock_before"] = watchers.calibrate()
                say(f"guest clocks vs host: {out['guest_clock_before']}")
            for system in args.systems:
                say(f"--- {system} with {n} Services")
                phase = Phase(bench, watchers, pop, system, args.timeout)
                phase.operator_args = args.operator_args.split()
                cold = phase.start()
                if cold is None:
                    out[system] = {"error": f"not programmed on every node in {phase.cold_timeout:.0f} s"}
                    phase.stop()
                    continue
                before = phase.sample_processes()
                syncs_before = phase.sync_histograms()
                if isinstance(watchers, IpvsWatchers):
                    watchers.reader_stats(reset=True)  # the readers' figures cover the churn only
                phase.churn(args.changes, args.gap, args.seed)
                reader = watchers.reader_stats() if isinstance(watchers, IpvsWatchers) else None
                after = phase.sample_processes()
                syncs_after = phase.sync_histograms()
                out[system] = {
                    "cold_sync_s": cold,
                    **{kind: summary(s) for kind, s in phase.samples.items()},
                    "timeouts": phase.timeouts,
                    "processes_after_churn": after,
                    "cpu_s_during_churn": harness.cpu_delta(before, after),
                    # The system's own account of its syncs during the churn, all nodes:
                    # kube-proxy's sync_proxy_rules histogram, the agent's by kind.
                    "own_sync_metrics": histogram_summary(syncs_before, syncs_after),
                    "slowest": sorted(phase.records, key=lambda r: -(r["took"] or 1e9))[:8],
                }
                if reader is not None:
                    # What the IPVS readers could resolve during this churn (poll gaps, cost).
                    out[system]["reader"] = reader
                if args.records:
                    out[system]["records"] = phase.records
                say(f"{system} with {n} Services: {json.dumps(out[system])}")
                cleanup = phase.stop()
                if cleanup:
                    out[system]["cleanup_error"] = cleanup
            out["reader_errors"] = watchers.errors
            if isinstance(watchers, IpvsWatchers):
                out["guest_clock_after"] = watchers.calibrate()
                out["clock_corrected"] = args.correct_clock
    mine_name = "svcproxy-ipvs" if ipvs else "svcproxy-iptables"
    for kp in ("kube-proxy-ipvs",) if ipvs else ("kube-proxy-iptables", "kube-proxy-nftables"):
        mine, theirs = out.get(mine_name), out.get(kp)
        if mine and theirs and "error" not in mine and "error" not in theirs:
            out[f"ratio_{kp}_over_svcproxy"] = {
                f"{kind}_{q}": ratio(theirs[kind].get(q), mine[kind].get(q))
                for kind in ("endpoint", "add", "remove", "affinity") for q in ("p50", "p99")
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="numbers of Services, comma-separated")
    parser.add_argument("--dataplane", choices=("iptables", "ipvs"), default="iptables",
                        help="iptables: 3 netns nodes, nf_tables readers; ipvs: 3 UML nodes, IPVS readers")
    parser.add_argument("--systems", default="",
                        help=f"which systems, in order (svcproxy last): {','.join(SYSTEMS)} "
                             f"(--dataplane iptables, the default list) or {','.join(IPVS_SYSTEMS)} (ipvs)")
    parser.add_argument("--poll-interval", type=float, default=0.005,
                        help="ipvs: seconds between the guest readers' polls")
    parser.add_argument("--no-correct-clock", dest="correct_clock", action="store_false",
                        help="ipvs: keep the guests' own stamps (default: subtract each guest's "
                             "clock offset from the host's, measured before the churn)")
    parser.add_argument("--changes", type=int, default=60, help="changes per system and size")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds between changes (kube-proxy's minSyncPeriod is 1 s)")
    parser.add_argument("--timeout", type=float, default=20, help="give up on one change after this")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--records", action="store_true", help="keep every change in the JSON")
    parser.add_argument("--state-dir", default=str(harness.DEFAULT_STATE))
    parser.add_argument("--operator-args", default="",
                        help="extra options for `svcproxy operator`, space-separated (e.g. --workers=0)")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--png", help="draw programming latency vs number of Services here")
    args = parser.parse_args()
    known = IPVS_SYSTEMS if args.dataplane == "ipvs" else SYSTEMS
    args.systems = [s for s in args.systems.split(",") if s] or list(known)
    unknown = set(args.systems) - set(known)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)} for --dataplane {args.dataplane}; "
                     f"choose from {known}")
    if "kube-proxy-ipvs" in args.systems and shutil.which("ipset") is None:
        parser.error("kube-proxy's ipvs mode needs the ipset tool: apt-get install ipset (hack/setup.sh)")
    if known[-1] in args.systems[:-1]:
        parser.error(f"{known[-1]} must come last (the lab cannot stop svcproxy)")
    result = {
        "benchmark": "programming_latency",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "kubernetes": K8S_VERSION,
        "namespace": NAMESPACE,
        "dataplane": args.dataplane,
        "uml_mem": os.environ.get("SVCPROXY_UML_MEM", "512M") if args.dataplane == "ipvs" else None,
        "gap_s": args.gap,
        "operator_args": args.operator_args,
        "changes_per_system": args.changes,
        "sizes": [],
    }
    complete = False
    try:
        for n in args.sizes.split(","):
            run_size(int(n), args)
        complete = True
    finally:
        # Sizes and systems measured so far survive a failure later in the run.
        result["sizes"] = PARTIAL
        result["complete"] = complete
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    if args.png:
        import plot

        plot.programming_latency([result], Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
