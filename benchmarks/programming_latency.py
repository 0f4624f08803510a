"""Programming latency: API write -> kernel NAT state on every node, svcproxy vs kube-proxy.

For each size N a fresh 3-node netns lab gets N selectorless Services with 10 endpoints
each (hand-written EndpointSlices owned by their Service, so the garbage collector deletes
them with it). The systems (kube-proxy iptables, kube-proxy nftables, svcproxy with one
iptables-mode policy selecting every Service) take turns in the same lab: ``--repetitions``
rounds, each running every system once, the order rotated per round (A B C, B C A, ...).
Each system is started, cold-synced, measured, then stopped and its kernel state checked
gone, so the next one starts from the same state.

In its turn a system gets, for every ``--rates`` value, the same open-loop sequence of
changes (``latency_schedule.schedule``: Poisson arrivals, drawn once per size and rate):
each change fires at its scheduled time whether or not earlier ones have landed, and is one
user action: replace the oldest endpoint of a Service (one slice update), add a Service
(the Service, then its slice), delete a Service (the slice is left to the garbage
collector), turn ClientIP affinity on for one Service (kube-proxy: the Service's field;
svcproxy: a policy selecting that Service). One ``nft monitor``-fed reader per node
(``_lab/kernel_watch.py``) keeps every state of every watched VIP with its commit time;
a change's time on a node is the first commit after its write at which its expected state
holds, its latency the slowest node's; not seen within ``--timeout`` on every node is a
failure, counted. The readers also write probe rules into a table of their own at random
times, which gives the detector's own lag in the same run.

Run as root from the repository root, holding the lab lock:

    flock /tmp/svcproxy-lab.lock .venv/bin/python -m benchmarks.programming_latency \\
        --sizes 100,1000 --rates 1,5,20 --repetitions 3 --changes 60 \\
        --out benchmarks/results/programming_latency.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import latency_schedule as ls
from benchmarks._lab import harness
from benchmarks._lab.harness import (
    NAMESPACE,
    POLICY_PATH,
    SLICE_PATH,
    SVC_PATH,
    BenchLab,
    KernelWatchers,
    Population,
    Seen,
    ignore_missing,
    say,
)
from benchmarks._report import provenance
from svcproxy_lab.cluster import LabError

SYSTEMS = ("kube-proxy-iptables", "kube-proxy-nftables", "svcproxy-iptables")
HARNESS = "open-loop-v2"  # what the README test looks for in the JSON
REPO = Path(__file__).resolve().parent.parent
HANDOVER_LABEL = "service.kubernetes.io/service-proxy-name"
PVS_PATH = f"/apis/svcproxy.io/v1alpha1/namespaces/{NAMESPACE}/proxyvirtualservers"


def key(cluster_ip: str) -> str:
    return f"{cluster_ip}:{harness.PORT}"


def vip_of(service: str) -> str:
    return harness.vip(int(service.removeprefix("svc-")))


class Fired:
    """One change as written: when, and what its kernel state must look like."""

    def __init__(self, change: ls.Change, scheduled: float) -> None:
        self.change = change
        self.scheduled = scheduled
        self.key = key(vip_of(change.service))
        self.t0: float | None = None
        self.ok: Callable[[Seen], bool] = lambda s: False
        self.error: str | None = None


class Turn:
    """One system's turn: start, cold sync, the sequences at every rate, stop and check."""

    def __init__(self, bench: BenchLab, watchers: KernelWatchers, pop: Population, system: str,
                 args: argparse.Namespace) -> None:
        self.bench = bench
        self.w = watchers
        self.pop = pop
        self.system = system
        self.args = args
        self.size = len(pop.services)
        self.locks: dict[str, threading.Lock] = {}

    @property
    def is_svcproxy(self) -> bool:
        return self.system.startswith("svcproxy")

    def start(self) -> float | None:
        """Start the system; seconds until every node programs every Service (cold sync)."""
        start = time.monotonic()
        if self.is_svcproxy:
            self.bench.start_svcproxy(self.args.operator_args.split())
            harness.create_policy(self.bench._api(), harness.policy_body("bench-all", mode="iptables"))
        else:
            self.bench.start_kube_proxy(self.system.removeprefix("kube-proxy-"))
        if self.w.wait_programmed(self.size, timeout=240) is None:
            return None
        cold = round(time.monotonic() - start, 2)
        if self.is_svcproxy:
            # Changes start once the operator is idle: policy Programmed, every Service handed over.
            api = self.bench._api()
            harness.wait_policy(api, "bench-all", time.time(), 240, poll=1)
            harness.wait_handover(api, self.size, 240)
        return cold

    # --- one change -------------------------------------------------------------

    def fire(self, f: Fired) -> Fired:
        """Make the change's API write(s) (in a pool thread); one writer per Service at a time."""
        c = f.change
        lock = self.locks.setdefault(c.service, threading.Lock())
        try:
            with lock:
                self._write(f, c)
        except Exception as exc:
            f.error = f"write failed: {type(exc).__name__}: {str(exc)[:300]}"
        return f

    def _write(self, f: Fired, c: ls.Change) -> None:
        api = self.bench._api()
        if c.kind == "endpoint":
            old, new, f.t0 = self.bench.replace_endpoint(self.pop, c.service)
            want, gone = f"{new}:{harness.TARGET_PORT}", f"{old}:{harness.TARGET_PORT}"
            f.ok = lambda s: want in s.targets and gone not in s.targets
        elif c.kind == "add":
            _, _, f.t0 = self.bench.add_service(self.pop, index=int(c.service.removeprefix("svc-")))
            f.ok = lambda s: len(s.targets) == harness.ENDPOINTS
        elif c.kind == "remove":
            f.t0 = self.bench.remove_service(self.pop, c.service)
            f.ok = lambda s: not s.targets and not s.present
        else:
            f.t0 = time.time()
            if self.is_svcproxy:
                harness.create_policy(api, harness.policy_body(
                    f"bench-aff-{c.service}", mode="iptables", services=[c.service],
                    affinity=True, priority=10))
            else:
                api.merge_patch(f"{SVC_PATH}/{c.service}", {"spec": {"sessionAffinity": "ClientIP"}})
            f.ok = lambda s: s.affinity and len(s.targets) == harness.ENDPOINTS

    # --- one sequence -------------------------------------------------------------

    def replay(self, changes: list[ls.Change], rate: float, repetition: int) -> list[dict[str, Any]]:
        """Fire ``changes`` on schedule, then wait for each to land or time out; the records."""
        self.w.watch_many(sorted({key(vip_of(c.service)) for c in changes}))
        begin = time.time() + 0.5
        futures = []
        with ThreadPoolExecutor(max_workers=8) as pool:
            for c in changes:
                delay = begin + c.at - time.time()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(self.fire, Fired(c, begin + c.at)))
            fired = [fut.result() for fut in futures]
        timeout = self.args.timeout

        def settled() -> bool:
            now = time.time()
            return all(f.t0 is None or now > f.t0 + timeout
                       or None not in self.w.first_seen(f.key, f.ok, f.t0).values() for f in fired)

        self.w.wait_until(settled, timeout + 5, f"{self.system} changes at {rate}/s")
        return [self.record(f, rate, repetition) for f in fired]

    def record(self, f: Fired, rate: float, repetition: int) -> dict[str, Any]:
        c = f.change
        out: dict[str, Any] = {
            "system": self.system, "size": self.size, "rate": rate, "repetition": repetition,
            "index": c.index, "kind": c.kind, "service": c.service, "key": f.key,
            "scheduled": round(f.scheduled, 4), "write": None if f.t0 is None else round(f.t0, 4),
            "nodes": None, "latency": None, "failure": f.error,
        }
        if f.t0 is None:
            return out
        t0 = f.t0
        seen = self.w.first_seen(f.key, f.ok, t0)
        late = [n for n, t in seen.items() if t is None or t - t0 > self.args.timeout]
        out["nodes"] = {n: None if t is None else round(t - t0, 4) for n, t in seen.items()}
        if late:
            out["failure"] = f"not seen within {self.args.timeout:g} s on {', '.join(late)}"
        else:
            out["latency"] = round(max(t for t in seen.values() if t is not None) - t0, 4)
        return out

    # --- back to the start state ---------------------------------------------------

    def restore(self, changes: list[ls.Change]) -> None:
        """Undo a sequence: added Services deleted, removed ones back, affinity off; settled."""
        api = self.bench._api()
        for c in changes:
            if c.kind == "add":
                ignore_missing(partial(api.delete, f"{SVC_PATH}/{c.service}"))
                with self.pop.lock:
                    self.pop.services.pop(c.service, None)
            elif c.kind == "affinity" and self.is_svcproxy:
                ignore_missing(partial(api.delete, f"{POLICY_PATH}/bench-aff-{c.service}"))
            elif c.kind == "affinity":
                api.merge_patch(f"{SVC_PATH}/{c.service}", {"spec": {"sessionAffinity": "None"}})
        gone = {f"{c.service}-bench" for c in changes if c.kind in ("add", "remove")}

        def collected() -> bool:
            items = api.get(SLICE_PATH)["items"]
            return not gone & {i["metadata"]["name"] for i in items}

        wait_for(collected, 60, "the garbage collector to delete the slices of deleted Services")
        for c in changes:
            # A remove whose write failed left its Service in place.
            if c.kind == "remove" and api.get_or_none(f"{SVC_PATH}/{c.service}") is None:
                self.bench.add_service(self.pop, index=int(c.service.removeprefix("svc-")))
        self.pop.next_index = self.size
        affinity_keys = [key(vip_of(c.service)) for c in changes if c.kind == "affinity"]
        self.settle(affinity_keys)
        for k in {key(vip_of(c.service)) for c in changes}:
            self.w.unwatch(k)

    def settle(self, affinity_keys: list[str], timeout: float = 120) -> None:
        """Wait until every node has exactly the base Services, none with affinity."""
        def no_affinity() -> bool:
            return all(not (self.w.history.get((n, k)) or [Seen(0, (), False)])[-1].affinity
                       for n in self.w.nodes for k in affinity_keys)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            full = [c.get(str(harness.ENDPOINTS), 0) for c in self.w.count().values()]
            if all(n == self.size for n in full) and no_affinity():
                return
            time.sleep(0.5)
        raise SystemExit(f"{self.system}: the nodes did not return to {self.size} Services without "
                         f"affinity in {timeout:.0f} s (entries with 10 endpoints per node: {full}); "
                         "the next sequence would start from another state")

    def stop(self) -> dict[str, Any]:
        """Stop the system and check it left no kernel state; what had to be cleaned."""
        if not self.is_svcproxy:
            try:
                self.bench.stop_kube_proxy()
            except LabError as exc:
                return {"cleanup_error": str(exc)[-600:], **self.check_clean()}
            return self.check_clean()
        return stop_svcproxy(self)

    def check_clean(self) -> dict[str, Any]:
        left = {n: sum(v for k, v in c.items() if k != "0") for n, c in self.w.count().items()}
        if any(left.values()):
            raise SystemExit(f"{self.system} left service entries behind {left}; the next system "
                             "would be measured against them")
        return {"entries_left": 0}


def stop_svcproxy(turn: Turn) -> dict[str, Any]:
    """Delete the policies, let the operator and agents withdraw, stop them, sweep, check."""
    api = turn.bench._api()
    for item in api.get(POLICY_PATH)["items"]:
        ignore_missing(partial(api.delete, f"{POLICY_PATH}/{item['metadata']['name']}"))

    def unlabelled() -> bool:
        return not api.get(SVC_PATH, labelSelector=HANDOVER_LABEL)["items"]

    def withdrawn() -> bool:
        return all(not c.get(str(harness.ENDPOINTS)) for c in turn.w.count().values())

    out: dict[str, Any] = {"labels_removed_by_operator": wait_for(unlabelled, 60, "handover labels removed"),
                           "withdrawn_by_agents": wait_for(withdrawn, 60, "agents to withdraw")}
    out["policies_deleted_by_operator"] = wait_for(
        lambda: not api.get(POLICY_PATH)["items"], 60, "the operator to release the policies")
    turn.bench.stop_svcproxy()
    for item in api.get(POLICY_PATH)["items"]:  # its finalizer would block the next turn's create
        api.merge_patch(f"{POLICY_PATH}/{item['metadata']['name']}", {"metadata": {"finalizers": None}})
    for svc in api.get(SVC_PATH, labelSelector=HANDOVER_LABEL)["items"]:
        api.merge_patch(f"{SVC_PATH}/{svc['metadata']['name']}",
                        {"metadata": {"labels": {HANDOVER_LABEL: None}}})
    left_pvs = api.get(PVS_PATH)["items"]
    for pvs in left_pvs:
        ignore_missing(partial(api.delete, f"{PVS_PATH}/{pvs['metadata']['name']}"))
    out["programs_left"] = len(left_pvs)
    owned = turn.w.ask("owned")
    out["chains_left"] = {n: r.get("chains", []) for n, r in owned.items()}
    if any(out["chains_left"].values()):
        swept = turn.w.ask("sweep")
        out["sweep_errors"] = {n: r.get("error") for n, r in swept.items() if r.get("error")}
        still = {n: r.get("chains") for n, r in turn.w.ask("owned").items() if r.get("chains")}
        if still:
            raise SystemExit(f"svcproxy chains are still in the kernel after the sweep {still}: "
                             "the next system would be measured against them")
    return {**out, **turn.check_clean()}


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    say(f"timed out after {timeout:.0f} s waiting for {what}")
    return False


def run_turn(turn: Turn, schedules: dict[float, list[ls.Change]], repetition: int,
             records: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's turn in one repetition; records appended as each rate finishes."""
    begin = time.time()
    cold = turn.start()
    info: dict[str, Any] = {"system": turn.system, "size": turn.size, "repetition": repetition,
                            "start": round(begin, 3), "cold_sync_s": cold}
    if cold is None:
        info["error"] = "not programmed on every node in 240 s"
    else:
        for rate, changes in schedules.items():
            got = turn.replay(changes, rate, repetition)
            records.extend(got)
            failed = sum(1 for r in got if r["latency"] is None)
            say(f"{turn.system} rep {repetition} at {rate}/s: {len(got) - failed} landed, {failed} failed")
            turn.restore(changes)
    info["stop"] = turn.stop()
    info["end"] = round(time.time(), 3)
    return info


def run_size(n: int, args: argparse.Namespace, result: dict[str, Any]) -> None:
    schedules = {rate: ls.schedule(n, rate, args.changes, args.seed) for rate in args.rates}
    result["schedules"][str(n)] = {str(r): [c.__dict__ for c in s] for r, s in schedules.items()}
    pop = Population()
    with BenchLab(Path(args.state_dir)) as bench:
        bench.up()
        result["provenance"].update(bench.versions())
        bench.populate(n, pop)
        with KernelWatchers(bench.node_names) as watchers:
            result["detector_writer"] = watchers.writer
            watchers.probe(True, args.probe_rate, args.seed)
            try:
                for rep in range(args.repetitions):
                    for system in ls.rotation(args.systems, rep):
                        say(f"--- {system}, repetition {rep}, {n} Services")
                        turn = Turn(bench, watchers, pop, system, args)
                        result["turns"].append(run_turn(turn, schedules, rep, result["records"]))
            finally:
                watchers.probe(False)
                time.sleep(0.5)
                result["probes"].extend({"size": n, **p} for p in watchers.probes)
                result["reader_errors"].extend(watchers.errors)


def detector_lag(result: dict[str, Any]) -> dict[str, Any]:
    """The readers' lag from their probes: all, and per system by the turn they fell in."""
    probes = result["probes"]
    out: dict[str, Any] = {
        "written_to_seen": ls.lag_summary([p["seen"] - p["written"] for p in probes]),
        "acked_to_seen": ls.lag_summary([p["seen"] - p["acked"] for p in probes]),
        "by_system": {},
    }
    for system in {t["system"] for t in result["turns"]}:
        spans = [(t["start"], t["end"]) for t in result["turns"] if t["system"] == system]
        mine = [p["seen"] - p["written"] for p in probes if any(a <= p["written"] <= b for a, b in spans)]
        out["by_system"][system] = ls.lag_summary(mine)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000", help="numbers of Services, comma-separated")
    parser.add_argument("--rates", default="1,5,20", help="changes per second, comma-separated")
    parser.add_argument("--repetitions", type=int, default=3,
                        help="rounds of every system, order rotated per round (at least 3 for figures)")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help="comma-separated, from " + ",".join(SYSTEMS))
    parser.add_argument("--changes", type=int, default=60, help="changes per sequence (size, rate)")
    parser.add_argument("--timeout", type=float, default=20,
                        help="a change not seen on every node by then fails")
    parser.add_argument("--probe-rate", type=float, default=5.0,
                        help="detector lag probes per second per node")
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--state-dir", default=str(harness.DEFAULT_STATE))
    parser.add_argument("--operator-args", default="", help="extra options for `svcproxy operator`")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if set(args.systems) - set(SYSTEMS):
        parser.error(f"unknown systems {sorted(set(args.systems) - set(SYSTEMS))}; choose from {SYSTEMS}")
    if args.repetitions < 1:
        parser.error("--repetitions must be at least 1 (3 or more for figures worth quoting)")
    return args


def main() -> int:
    args = parse_args()
    result: dict[str, Any] = {
        "benchmark": "programming_latency", "harness": HARNESS,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(), "namespace": NAMESPACE,
        "settings": {k: v for k, v in vars(args).items() if k not in ("state_dir", "out")},
        "schedules": {}, "turns": [], "records": [], "probes": [], "reader_errors": [],
    }
    complete = False
    try:
        for n in args.sizes.split(","):
            run_size(int(n), args, result)
        complete = True
    finally:
        # What was measured so far survives a failure later in the run.
        result["complete"] = complete
        result["summary"] = ls.summarize(result["records"])
        result["detector_lag"] = detector_lag(result)
        text = json.dumps(result, indent=1)
        print(json.dumps({"summary": result["summary"]["over_repetitions"],
                          "detector_lag": result["detector_lag"]}, indent=1))
        if args.out:
            Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
