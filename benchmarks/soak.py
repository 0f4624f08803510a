"""Churn soak: steady traffic for ``--minutes`` while objects churn and processes die; prints JSON.

A lab of 3 nodes (network namespaces; with ``--ipvs-nodes`` the last ones are UML guests
with IPVS, by default one when a UML kernel is there) runs the operator and the agents.
``--steady`` Services, each with its own echo Deployment that stays ready throughout and
its own policy, take steady traffic from the client namespace behind every node: new TCP
connections at ``--rate`` per second per node, in turn over the steady Services, open loop,
every request recorded (``_lab/soak_client.py``). Meanwhile, from ``--seed``:

- churn (``soak_plan.next_op``, Poisson at ``--churn-rate`` steps/s) on other Services:
  selectorless ones with hand-written EndpointSlices and Deployment-backed ones, their
  endpoints, replicas and Pods, and policies selecting them, created, changed, deleted;
  the steady Services' own policies switched between modes;
- faults (``soak_plan.fault_schedule``, about one per ``--fault-every`` s, at least one of
  each): kill -9 of an agent or of the operator (the supervisor restarts it after
  ``--restart-delay`` s, as a kubelet would), a kube-apiserver restart, and an etcd
  compaction to the current revision plus defragmentation (watches from older
  resourceVersions get 410 Gone and their clients list again);
- every ``--sample-every`` s: the RSS of the operator and of each agent, and the ready
  endpoints of each steady Service.

Then churn stops, the run waits until every node reports every program applied, stops the
traffic, and checks each node for leaks: its svcproxy kernel objects (iptables chains and
rules of either flavour, IPVS virtual and real servers, svcproxy0 addresses, listeners) as
the soak left them against the same node after ``agent --cleanup`` and a fresh sync.
The JSON: provenance, parameters, faults with their times, supervisor restarts, churn
steps, per-Service request counts and every failed request to a steady Service with its
nearest fault, RSS slopes (``soak_report.rss_trend``), the leak check, a verdict. The
pure parts are ``soak_plan.py`` and ``soak_report.py``.

Run as root from the repository root, holding the lab lock (``--minutes 2`` is the smoke run):

    flock /tmp/svcproxy-lab.lock .venv/bin/python -m benchmarks.soak --minutes 30 \\
        --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import soak_plan as plan
from benchmarks import soak_report as report
from benchmarks._lab.harness import BenchLab, say
from benchmarks._lab.soak_lab import SVC_PATH, SoakLab, Supervisor, apply_op, create_steady, list_world
from benchmarks._report import emit, provenance
from svcproxy_lab.kubeapi import ApiError
from svcproxy_lab.node import uml_available

DEFAULT_STATE = Path("/tmp/svcproxy-soak-lab")
LOG_MARKS = {"tracebacks": "Traceback", "relists_410": "resourceVersion expired",
             "watch_failures": "watch failed"}


def ipvs_nodes(arg: int) -> int:
    """``--ipvs-nodes``; -1: one UML node when this machine has a UML kernel, else none."""
    if arg >= 0:
        return arg
    if not uml_available():
        return 0
    from svcproxy_lab.uml import UmlError, kernel_dir
    try:
        kernel_dir()
    except UmlError as exc:
        say(f"no UML kernel ({exc}); all nodes are network namespaces (ipvs falls back to iptables)")
        return 0
    return 1


def wait_for(check: Callable[[], bool], timeout: float, what: str, poll: float = 1.0) -> float | None:
    """Seconds until ``check()`` held (API errors count as not yet), or None after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if check():
                return round(time.monotonic() - start, 2)
        except (OSError, ApiError):
            pass
        time.sleep(poll)
    say(f"timed out after {timeout:.0f} s waiting for {what}")
    return None


def settle(soak: SoakLab, timeout: float) -> dict[str, Any]:
    """Wait until no Pod is starting or terminating, the operator has a program for every
    selected Service and none else, every policy is observed with no Service Pending, and
    every node reports every program applied: 3 polls in a row, 3 s apart, with the same
    programs (a change in between restarts the count)."""
    last: dict[str, Any] = {}
    seen: list[dict[str, str]] = []

    def settled() -> bool:
        programs = soak.programs()
        pods = report.pods_pending(soak.pods())
        nodes = report.pending_programs(programs, soak.reports())
        operator = report.operator_pending(plan.NAMESPACE, programs, soak.services(), soak.policies())
        last.update(pods=pods, nodes=nodes, operator=operator)
        if pods or nodes or operator or (seen and seen[-1] != programs):
            seen.clear()
        if not (pods or nodes or operator):
            seen.append(programs)
        return len(seen) >= 3

    took = wait_for(settled, timeout, "the operator and every node to settle", poll=3.0)
    return {"settled": took is not None, "seconds": took, "pending": last}


class Run:
    """One soak run's shared state: the threads write here, the report reads it."""

    def __init__(self, soak: SoakLab, args: argparse.Namespace, modes: list[str]) -> None:
        self.soak = soak
        self.args = args
        self.modes = modes
        self.supervisor = Supervisor(soak)
        self.stop = threading.Event()
        self.begin = 0.0
        self.faults: list[dict[str, Any]] = []
        self.churn: list[dict[str, Any]] = []
        self.rss: dict[str, list[report.Sample]] = {}
        self.ready: list[tuple[float, str, int | None]] = []
        self.timelines: dict[str, list[tuple[float, str]]] = {}
        self.steady: list[str] = [f"steady-{i}" for i in range(args.steady)]

    def sleep_until(self, at: float) -> bool:
        """Sleep until ``at`` s after the start; False when the run is stopping."""
        return not self.stop.wait(max(0.0, self.begin + at - time.time()))

    # --- faults ------------------------------------------------------------------------

    def strike(self, fault: plan.Fault) -> dict[str, Any]:
        sup, soak = self.supervisor, self.soak
        rec: dict[str, Any] = {"planned_at": fault.at, "kind": fault.kind, "target": fault.target,
                               "t": round(time.time(), 3)}
        name = {"agent_kill": f"agent/{fault.target}", "operator_kill": "operator"}.get(fault.kind)
        say(f"fault: {fault.kind} {fault.target}".rstrip())
        try:
            if fault.kind == "agent_kill":
                sup.expect(name or "", self.args.restart_delay)
                soak.kill_agent(fault.target)
            elif fault.kind == "operator_kill":
                sup.expect("operator", self.args.restart_delay)
                soak.kill_operator()
            elif fault.kind == "apiserver_restart":
                sup.expect("control-plane", 3600)
                try:
                    soak.restart_apiserver()
                finally:
                    sup.release("control-plane")
                rec["restarted_t"] = round(time.time(), 3)
            else:
                rec["detail"] = soak.compact_etcd()
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        rec["done_t"] = round(time.time(), 3)
        if name and "error" not in rec:
            deadline = time.monotonic() + 120
            while rec.get("restarted_t") is None and time.monotonic() < deadline:
                rec["restarted_t"] = sup.restarted_after(name, rec["t"])
                time.sleep(0.5)
        return rec

    def run_faults(self, schedule: list[plan.Fault]) -> None:
        for fault in schedule:
            if not self.sleep_until(fault.at):
                return
            self.faults.append(self.strike(fault))

    # --- churn -------------------------------------------------------------------------

    def run_churn(self, times: list[float]) -> None:
        rng = random.Random(f"churn:{self.args.seed}")
        addresses = [n.address for n in self.soak.nodes.values()]
        index = 0
        for at in times:
            if not self.sleep_until(at):
                return
            t = time.time()
            try:
                world = list_world(self.soak.api, index)
            except (OSError, ApiError) as exc:
                self.churn.append({"t": round(t, 3), "kind": "list", "ok": False,
                                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                continue
            self.follow_modes(t, world.steady_modes)
            op = plan.next_op(rng, world, self.modes, addresses)
            index += op.kind in ("add_service", "add_policy")  # names are never reused
            row: dict[str, Any] = {"t": round(t, 3), "kind": op.kind, "target": op.target, "ok": True}
            try:
                apply_op(self.soak.api, op)
            except Exception as exc:
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            if op.kind == "switch_steady" and row["ok"]:
                self.timelines[op.target].append((t, op.params["mode"]))
            self.churn.append(row)

    def follow_modes(self, t: float, modes: dict[str, str]) -> None:
        """A steady policy's mode as listed, when it differs from the last one written
        (a write whose answer was lost may still have landed)."""
        for svc, mode in modes.items():
            line = self.timelines.setdefault(svc, [])
            if not line or line[-1][1] != mode:
                line.append((t, mode))

    # --- samples -------------------------------------------------------------------------

    def run_sampler(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            readings: dict[str, Callable[[], tuple[int, float] | None]] = {
                "operator": self.soak.operator_rss}
            readings |= {f"agent/{n}": partial(self.soak.agent_rss, n) for n in self.soak.nodes}
            for name, read in readings.items():
                try:
                    got = read()
                except Exception as exc:  # a guest busy past the command timeout: skip one
                    say(f"sample of {name} failed: {type(exc).__name__}: {exc}")
                    got = None
                if got is not None:
                    self.rss.setdefault(name, []).append(report.Sample(t, got[0], got[1]))
            for svc, n in self.soak.ready_endpoints(self.steady).items():
                self.ready.append((t, svc, n))
            self.stop.wait(self.args.sample_every)


def set_up(run: Run) -> list[dict[str, Any]]:
    """The namespace and the steady Services, ready and programmed everywhere; their targets."""
    soak, api = run.soak, run.soak.api
    if api.get_or_none(f"/api/v1/namespaces/{plan.NAMESPACE}") is None:
        api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                          "metadata": {"name": plan.NAMESPACE}})
    wait_for(lambda: api.get_or_none(f"/api/v1/namespaces/{plan.NAMESPACE}/serviceaccounts/default")
             is not None, 60, "the default ServiceAccount")
    for i, svc in enumerate(run.steady):
        mode = run.modes[i % len(run.modes)]
        create_steady(api, svc, run.args.replicas, mode)
        run.timelines[svc] = [(time.time(), mode)]
    if wait_for(lambda: all((n or 0) >= run.args.replicas
                            for n in soak.ready_endpoints(run.steady).values()),
                240, "the steady Pods to be ready") is None:
        raise SystemExit("the steady Services' Pods did not become ready; see the kubelet logs in "
                         f"{soak.ctx.log_dir}")
    settled = settle(soak, 240)
    if not settled["settled"]:
        raise SystemExit(f"the steady Services were not programmed on every node: {settled}")
    return [{"svc": svc, "ip": api.get(f"{SVC_PATH}/{svc}")["spec"]["clusterIP"], "port": plan.PORT}
            for svc in run.steady]


def leak_check(soak: SoakLab, node: str, timeout: float) -> dict[str, Any]:
    """The node's objects as the soak left them vs after ``agent --cleanup`` and a fresh sync."""
    programs = soak.programs()
    before = report.kernel_objects(soak.dump(node))
    last = (soak.reports().get(node) or {}).get("lastSyncTime")
    error = soak.cleanup_agent(node)
    left = report.owned_only(report.kernel_objects(soak.dump(node)))
    soak.start_missing([node])

    def fresh() -> bool:
        status = soak.reports()[node]
        return (status is not None and status.get("lastSyncTime") != last
                and not report.pending_programs(soak.programs(), {node: status}))

    took = wait_for(fresh, timeout, f"the fresh agent on {node} to apply every program")
    out = report.leak_diff(before, report.kernel_objects(soak.dump(node)))
    now = soak.programs()
    # A program that changed in between makes both dumps right and different: say so.
    changed = sorted(k for k in programs.keys() | now.keys() if programs.get(k) != now.get(k))
    return {**out, "cleanup_error": error, "left_after_cleanup": sorted(left.elements()),
            "fresh_sync_settled_s": took, "programs_changed_during_check": changed}


def log_offsets(soak: SoakLab) -> dict[str, int]:
    logs = ["operator", *(f"{n}-agent" for n in soak.nodes)]
    return {name: _size(soak.ctx.log_dir / f"{name}.log") for name in logs}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_counts(soak: SoakLab, offsets: dict[str, int]) -> dict[str, dict[str, int]]:
    """Lines of each log written during the run that carry a mark (``LOG_MARKS``)."""
    out = {}
    for name, offset in offsets.items():
        with (soak.ctx.log_dir / f"{name}.log").open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
        out[name] = {k: sum(1 for ln in lines if mark in ln) for k, mark in LOG_MARKS.items()}
    return out


def soak(run: Run, result: dict[str, Any]) -> None:
    args, sk = run.args, run.soak
    duration = args.minutes * 60
    schedule = plan.fault_schedule(args.seed, duration, list(sk.nodes), args.fault_every)
    times = plan.churn_times(args.seed, duration, args.churn_rate)
    result["plan"] = {"faults": [f.__dict__ for f in schedule], "churn_steps": len(times)}
    targets = set_up(run)
    sk.start_clients(targets, args.rate, args.timeout, duration + args.settle_timeout + 600)
    time.sleep(3)  # the clients' first requests (a guest's Python takes a second to start)
    offsets = log_offsets(sk)
    run.begin = time.time()
    result["timeline"] = {"start": round(run.begin, 3)}
    threads = [threading.Thread(target=run.run_faults, args=(schedule,), daemon=True),
               threading.Thread(target=run.run_churn, args=(times,), daemon=True),
               threading.Thread(target=run.run_sampler, daemon=True)]
    run.supervisor.thread.start()
    for th in threads:
        th.start()
    say(f"soak running for {args.minutes:g} min: {len(schedule)} faults, {len(times)} churn steps")
    run.stop.wait(duration)
    run.stop.set()
    result["timeline"]["churn_end"] = round(time.time(), 3)
    for th in threads:
        th.join(timeout=300)
    say("churn stopped; waiting for the operator and every node to settle")
    result["settle"] = settle(sk, args.settle_timeout)
    result["timeline"]["settled"] = round(time.time(), 3)
    result["clients_finished"] = sk.stop_clients(args.timeout + 30)
    run.supervisor.stop.set()
    run.supervisor.thread.join(timeout=30)
    result["leak_check"] = {}
    for n in sk.nodes:
        say(f"leak check on {n}: dump, agent --cleanup, fresh sync, dump")
        result["leak_check"][n] = leak_check(sk, n, args.settle_timeout)
    result["timeline"]["end"] = round(time.time(), 3)
    result["logs"] = log_counts(sk, offsets)


def summarize(run: Run, result: dict[str, Any]) -> None:
    """Fill in the analysed parts of ``result`` from what the run recorded."""
    result["faults"] = run.faults
    result["restarts"] = run.supervisor.events
    churn_kinds: dict[str, dict[str, int]] = {}
    for row in run.churn:
        c = churn_kinds.setdefault(row["kind"], {"ok": 0, "failed": 0})
        c["ok" if row["ok"] else "failed"] += 1
    result["churn"] = {"by_kind": churn_kinds, "steps": run.churn}
    result["steady"] = {"modes": {s: [[round(t, 3), m] for t, m in line]
                                  for s, line in run.timelines.items()},
                        "readiness": report.readiness(run.ready)}
    result["requests"] = report.request_summary(run.soak.requests(), run.timelines, run.faults,
                                                grace=run.args.restart_grace)
    result["rss"] = {name: report.rss_trend(samples, run.args.rss_settle)
                     for name, samples in sorted(run.rss.items())}
    leaks = result.get("leak_check") or {}
    requests = result["requests"]
    result["verdict"] = {
        "steady_requests": requests["sent"], "steady_failed": requests["failed"],
        "steady_failed_unexplained": requests["failed_unexplained"],
        "steady_ready_throughout": all(r["ready_throughout"]
                                       for r in result["steady"]["readiness"].values()),
        "unexpected_exits": sum(1 for e in run.supervisor.events if e["cause"] != "fault"),
        "fault_errors": sum(1 for f in run.faults if "error" in f),
        "settled": (result.get("settle") or {}).get("settled"),
        "leaked_objects": sum(v["leaked_count"] for v in leaks.values()),
        "missing_objects": sum(v["missing_count"] for v in leaks.values()),
        "left_after_cleanup": sum(len(v["left_after_cleanup"]) for v in leaks.values()),
        "rss_slope_mb_per_hour": {n: r["slope_mb_per_hour"] for n, r in result["rss"].items()},
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the churn (2: the smoke run)")
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--ipvs-nodes", type=int, default=-1,
                   help="UML nodes with IPVS among the 3 (-1: one if a UML kernel is there)")
    p.add_argument("--steady", type=int, default=3, help="steady Services")
    p.add_argument("--replicas", type=int, default=2, help="ready Pods per steady Service")
    p.add_argument("--rate", type=float, default=6.0, help="new connections per second per node")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per request")
    p.add_argument("--churn-rate", type=float, default=0.5, help="churn steps per second")
    p.add_argument("--fault-every", type=float, default=90.0, help="mean seconds between faults")
    p.add_argument("--restart-delay", type=float, default=2.0,
                   help="seconds a killed agent or operator stays down")
    p.add_argument("--restart-grace", type=float, default=15.0,
                   help="seconds after an agent's restart its userspace portals may still be down")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--rss-settle", type=float, default=30.0,
                   help="seconds after each (re)start left out of the RSS slope")
    p.add_argument("--settle-timeout", type=float, default=300.0)
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE)
    p.add_argument("--keep-lab", action="store_true", help="leave the lab up afterwards")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    if args.minutes <= 0 or args.rate <= 0 or args.steady < 1 or args.replicas < 1:
        p.error("--minutes, --rate, --steady and --replicas must be positive")
    try:  # before the lab comes up: a run too short for its faults fails at once
        plan.fault_schedule(args.seed, args.minutes * 60, ["node-1", "node-2", "node-3"],
                            args.fault_every)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main() -> int:
    args = parse_args()
    os.environ.setdefault("SVCPROXY_UML_MEM", "512M")  # room for Pods, the agent, the client
    ipvs = ipvs_nodes(args.ipvs_nodes)
    modes = ["iptables", "userspace", *(["ipvs"] if ipvs else [])]
    result: dict[str, Any] = {
        "benchmark": "soak", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(),
        "parameters": {**{k: v for k, v in vars(args).items() if k not in ("state_dir", "out")},
                       "ipvs_nodes": ipvs, "modes": modes},
    }
    bench = BenchLab(args.state_dir, nodes=3, ipvs_nodes=ipvs)
    run: Run | None = None
    complete = False
    try:
        bench.up()
        bench.start_svcproxy()
        result["provenance"].update(bench.versions())
        run = Run(SoakLab(bench), args, modes)
        result["lab"] = {"nodes": {n: type(node).__name__ for n, node in run.soak.nodes.items()},
                         "logs": str(run.soak.ctx.log_dir),
                         "requests": {n: str(run.soak.requests_file(n)) for n in run.soak.nodes}}
        soak(run, result)
        complete = True
    except BaseException as exc:  # Ctrl-C too: what was measured so far is still printed
        result["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        say(f"the soak stopped early: {result['error']}")
    finally:
        result["complete"] = complete
        if run is not None:
            run.stop.set()
            run.supervisor.stop.set()
            summarize(run, result)
        if not args.keep_lab:
            bench.down()
    emit(result, args.out)
    return 0 if complete else 1

if __name__ == "__main__":
    sys.exit(main())
