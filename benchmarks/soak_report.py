"""The pure analysis of ``soak.py``: RSS slopes, the kernel-object leak check, the request summary.

``rss_trend`` fits one least-squares slope through a process's RSS samples, one
intercept per incarnation (a killed agent's successor starts from a fresh heap), after
each incarnation's first ``settle`` seconds. ``kernel_objects`` turns a node's dumps
(iptables-save of either flavour, ``ipvsadm -Sn``, the svcproxy0 addresses, ``ss``
listeners) into a multiset of normalised lines, and ``leak_diff`` compares the node as
the soak left it with the same node after a fresh sync. ``request_summary`` counts every
request per Service and node and lists each failed one with its nearest fault and, where
one applies, the cause the design accepts (a userspace-mode Service has no proxy on a node
while that node's agent is down). No I/O: tested in tests/unit/test_benchmarks_soak.py.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from svcproxy_lab.stats import percentile

EPHEMERAL_FIRST = 32768  # Linux's default ip_local_port_range starts here
USERSPACE_DOWN = "userspace proxy down with its agent"
MAX_LISTED_FAILURES = 1000


# --- RSS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One RSS reading of one process: wall time, pid (its incarnation), MB."""

    t: float
    pid: int
    rss_mb: float


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than two distinct x."""
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    if den == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / den


def _incarnations(samples: Iterable[Sample]) -> list[list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.t):
        groups.setdefault(s.pid, []).append(s)
    return sorted(groups.values(), key=lambda g: g[0].t)


def _per_hour(value: float | None) -> float | None:
    return None if value is None else round(value * 3600, 2)


def rss_trend(samples: Iterable[Sample], settle: float = 30.0) -> dict[str, Any]:
    """RSS slope (MB/hour) of one process over the run, min and max, per incarnation too.

    The slope is the pooled within-incarnation fit (a common slope, one intercept per pid):
    a restart's drop to a fresh heap is not growth, and a restart is no excuse to hide
    growth either. Samples from each incarnation's first ``settle`` seconds (imports,
    first list, first full sync) are left out of the fits, not out of min and max."""
    groups = _incarnations(samples)
    num = den = 0.0
    fitted = 0
    per = []
    for group in groups:
        start = group[0].t
        kept = [(s.t, s.rss_mb) for s in group if s.t - start >= settle]
        if len(kept) >= 2:
            mx = sum(x for x, _ in kept) / len(kept)
            my = sum(y for _, y in kept) / len(kept)
            num += sum((x - mx) * (y - my) for x, y in kept)
            den += sum((x - mx) ** 2 for x, _ in kept)
            fitted += len(kept)
        per.append({"pid": group[0].pid, "start": round(start, 3), "end": round(group[-1].t, 3),
                    "samples": len(group), "slope_mb_per_hour": _per_hour(slope(kept)),
                    "min_mb": min(s.rss_mb for s in group), "max_mb": max(s.rss_mb for s in group)})
    every = [s.rss_mb for g in groups for s in g]
    return {
        "samples": len(every), "fitted_samples": fitted, "settle_s": settle,
        "incarnations": len(groups),
        "slope_mb_per_hour": _per_hour(num / den) if den else None,
        "min_mb": min(every) if every else None, "max_mb": max(every) if every else None,
        "first_mb": groups[0][0].rss_mb if groups else None,
        "last_mb": groups[-1][-1].rss_mb if groups else None,
        "per_incarnation": per,
    }


# --- kernel objects ----------------------------------------------------------------------

_TO_PORTS = re.compile(r"--to-ports \d+")
IPTABLES_DUMPS = ("iptables-nft", "iptables-legacy", "ip6tables-nft", "ip6tables-legacy")


def _iptables_lines(source: str, text: str) -> list[str]:
    """svcproxy's chains and every rule naming one, per table; counters dropped and the
    userspace portals' REDIRECT ports (ephemeral listeners) written as <port>."""
    out, table = [], "?"
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":SVCPROXY"):
            out.append(f"{source} {table} :{line[1:].split()[0]}")
        elif line.startswith("-A ") and "SVCPROXY" in line:
            out.append(f"{source} {table} {_TO_PORTS.sub('--to-ports <port>', line)}")
    return out


def _ipvs_lines(text: str) -> list[str]:
    return [f"ipvs {ln.strip()}" for ln in text.splitlines() if ln.strip().startswith(("-A ", "-a "))]


def _address_lines(text: str) -> list[str]:
    """Addresses of ``ip -o addr show dev svcproxy0`` (the IPVS VIPs); not the IPv6
    link-local one, which the kernel derives from each new link's random MAC."""
    out = []
    for line in text.splitlines():
        words = line.split()
        for i, word in enumerate(words[:-1]):
            if word in ("inet", "inet6") and not words[i + 1].lower().startswith("fe80:"):
                out.append(f"svcproxy0 {word} {words[i + 1]}")
    return out


def _listener_lines(text: str) -> list[str]:
    """``ss -Hlntu`` rows as protocol and local address; an ephemeral port (a userspace
    portal's listener: the kernel picks it) as <ephemeral>, so a fresh agent's compare."""
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 5:
            continue
        host, _, port = words[4].rpartition(":")
        shown = "<ephemeral>" if port.isdigit() and int(port) >= EPHEMERAL_FIRST else port
        out.append(f"listen {words[0]} {host}:{shown}")
    return out


def kernel_objects(dumps: Mapping[str, str]) -> Counter[str]:
    """A node's svcproxy kernel objects as a multiset of normalised lines, from its dumps:
    ``iptables-nft`` / ``iptables-legacy`` / ``ip6tables-*`` (iptables-save text),
    ``ipvs`` (``ipvsadm -Sn``), ``svcproxy0`` (``ip -o addr show dev svcproxy0``) and
    ``listen`` (``ss -Hlntu`` in the node's network namespace). Missing dumps count as empty."""
    lines: list[str] = []
    for source in IPTABLES_DUMPS:
        lines += _iptables_lines(source, dumps.get(source, ""))
    lines += _ipvs_lines(dumps.get("ipvs", ""))
    lines += _address_lines(dumps.get("svcproxy0", ""))
    lines += _listener_lines(dumps.get("listen", ""))
    return Counter(lines)


def owned_only(objects: Counter[str]) -> Counter[str]:
    """What ``agent --cleanup`` must remove: everything but the listeners (its HTTP ports
    and the kubelet's stay; the portals' go with the agent process itself)."""
    return Counter({k: v for k, v in objects.items() if not k.startswith("listen ")})


def leak_diff(before: Counter[str], fresh: Counter[str]) -> dict[str, Any]:
    """Objects the soak left that a fresh sync does not make (leaked) and the reverse
    (missing), each sorted, with their counts."""
    leaked = sorted((before - fresh).elements())
    missing = sorted((fresh - before).elements())
    return {"objects_before": sum(before.values()), "objects_fresh": sum(fresh.values()),
            "leaked": leaked, "missing": missing,
            "leaked_count": len(leaked), "missing_count": len(missing)}


def pending_programs(programs: Mapping[str, str],
                     reports: Mapping[str, Mapping[str, Any] | None]) -> dict[str, list[str]]:
    """Per node, what keeps it from being settled: programs (``namespace/name`` ->
    contentHash) it does not report applied at that hash, programs it reports that no
    longer exist, or no report at all. A program the node refuses (listed in its errors)
    is settled too: nothing of it is meant to be in the kernel."""
    out: dict[str, list[str]] = {}
    for node, status in reports.items():
        if status is None:
            out[node] = ["no ProxyNode report"]
            continue
        applied = status.get("applied") or {}
        refused = {e.get("service") for e in status.get("errors") or []}
        late = [f"not applied: {k}" for k, h in sorted(programs.items())
                if applied.get(k) != h and k not in refused]
        stale = [f"applied but gone: {k}" for k in sorted(applied) if k not in programs]
        if late or stale:
            out[node] = late + stale
    return out


def pods_pending(pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Pods still changing their Services' endpoints: terminating, or neither Ready nor
    failed (a churn step's new Pods and deleted ones take seconds to settle)."""
    out = []
    for pod in pods:
        name = pod["metadata"]["name"]
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        if pod["metadata"].get("deletionTimestamp"):
            out.append(f"Pod terminating: {name}")
        elif not ready and status.get("phase") not in ("Failed", "Succeeded"):
            out.append(f"Pod not ready: {name}")
    return sorted(out)


def selects(spec: Mapping[str, Any], name: str, labels: Mapping[str, str]) -> bool:
    """Whether a policy spec selects the Service (by name, or by ``matchLabels``: the only
    selectors the soak writes)."""
    if spec.get("services") is not None:
        return name in spec["services"]
    match = (spec.get("serviceSelector") or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in match.items())


def operator_pending(namespace: str, programs: Mapping[str, str],
                     services: Mapping[str, Mapping[str, str]],
                     policies: Sequence[Mapping[str, Any]]) -> list[str]:
    """What keeps the operator from being settled in ``namespace``: a selected Service
    (``services``: name -> labels) without a program, a program no policy selects, a
    policy being deleted, not observed at its generation, or with a Service row Pending."""
    live = [p for p in policies if not p["metadata"].get("deletionTimestamp")]
    wanted = {f"{namespace}/{name}" for name, labels in services.items()
              if any(selects(p["spec"], name, labels) for p in live)}
    have = {k for k in programs if k.startswith(f"{namespace}/")}
    out = [f"no program yet: {k}" for k in sorted(wanted - have)]
    out += [f"program of no policy: {k}" for k in sorted(have - wanted)]
    for p in policies:
        meta, status = p["metadata"], p.get("status") or {}
        name = meta["name"]
        if meta.get("deletionTimestamp"):
            out.append(f"policy being deleted: {name}")
            continue
        if status.get("observedGeneration") != meta.get("generation"):
            out.append(f"policy not observed at its generation: {name}")
        out += [f"Pending in {name}: {row.get('name')}" for row in status.get("services") or []
                if row.get("state") == "Pending"]
    return out


# --- requests ----------------------------------------------------------------------------


def nearest_fault(t: float, faults: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The fault whose start is nearest to ``t`` (before or after), with the offset
    ``t - fault start`` in seconds."""
    started = [f for f in faults if f.get("t") is not None]
    if not started:
        return None
    best = min(started, key=lambda f: abs(t - float(f["t"])))
    return {"kind": best["kind"], "target": best.get("target", ""), "t": best["t"],
            "offset_s": round(t - float(best["t"]), 3)}


def modes_at(timeline: Sequence[tuple[float, str]], t: float, landing: float = 10.0) -> list[str]:
    """The modes a Service may have been in at ``t``: the last one written at or before
    ``t``, and the one before it while that write was less than ``landing`` s old."""
    past = [(at, mode) for at, mode in sorted(timeline) if at <= t]
    if not past:
        return []
    out = [past[-1][1]]
    if len(past) > 1 and t - past[-1][0] < landing:
        out.append(past[-2][1])
    return sorted(set(out))


def agent_down(faults: Sequence[Mapping[str, Any]], node: str, t: float, grace: float) -> bool:
    """Whether ``node``'s agent was down at ``t``: killed, not yet restarted, or restarted
    less than ``grace`` s ago (it lists and syncs before its userspace portals answer)."""
    for f in faults:
        if f.get("kind") != "agent_kill" or f.get("target") != node or f.get("t") is None:
            continue
        back = f.get("restarted_t") or float(f["t"]) + 60.0
        if float(f["t"]) <= t <= float(back) + grace:
            return True
    return False


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "max": round(max(values), 2)}


def request_summary(records: Iterable[Mapping[str, Any]],
                    timelines: Mapping[str, Sequence[tuple[float, str]]],
                    faults: Sequence[Mapping[str, Any]], grace: float = 15.0) -> dict[str, Any]:
    """Per Service and node: sent, ok, failed, ok latency (ms); every failed request with
    its time, node, error, the Service's possible modes, its nearest fault and the cause
    the design accepts if one applies; totals and the count of failures nothing explains."""
    counts: dict[str, dict[str, Counter[str]]] = {}
    latency: dict[str, list[float]] = {}
    failures: list[dict[str, Any]] = []
    for r in records:
        svc, node = str(r["svc"]), str(r["node"])
        c = counts.setdefault(svc, {}).setdefault(node, Counter())
        c["sent"] += 1
        if r["ok"]:
            c["ok"] += 1
            latency.setdefault(svc, []).append(float(r.get("ms") or 0.0))
            continue
        c["failed"] += 1
        t = float(r["t"])
        modes = modes_at(timelines.get(svc, ()), t)
        cause = (USERSPACE_DOWN if "userspace" in modes and agent_down(faults, node, t, grace)
                 else None)
        failures.append({"t": round(t, 3), "node": node, "service": svc, "error": r.get("err"),
                         "modes": modes, "nearest_fault": nearest_fault(t, faults), "cause": cause})
    failures.sort(key=lambda f: f["t"])
    per_service = {svc: {"nodes": {n: dict(c) for n, c in sorted(by_node.items())},
                         "latency_ms": _latency(latency.get(svc, []))}
                   for svc, by_node in sorted(counts.items())}
    total: Counter[str] = Counter()
    for by_node in counts.values():
        for c in by_node.values():
            total.update(c)
    return {
        "per_service": per_service,
        "sent": total["sent"], "ok": total["ok"], "failed": total["failed"],
        "failed_unexplained": sum(1 for f in failures if f["cause"] is None),
        "failed_by_cause": dict(Counter(f["cause"] or "unexplained" for f in failures)),
        "failures": failures[:MAX_LISTED_FAILURES],
        "failures_left_off": max(0, len(failures) - MAX_LISTED_FAILURES),
    }


def readiness(samples: Iterable[tuple[float, str, int | None]]) -> dict[str, dict[str, Any]]:
    """Per steady Service, from (time, Service, ready endpoints or None when the API did not
    answer): whether it had a ready endpoint at every answered sample, the minimum, and
    when it had none."""
    out: dict[str, dict[str, Any]] = {}
    for t, svc, ready in sorted(samples):
        row = out.setdefault(svc, {"samples": 0, "unanswered": 0, "min_ready": None, "none_ready_at": []})
        row["samples"] += 1
        if ready is None:
            row["unanswered"] += 1
            continue
        row["min_ready"] = ready if row["min_ready"] is None else min(row["min_ready"], ready)
        if ready == 0:
            row["none_ready_at"].append(round(t, 3))
    for row in out.values():
        row["ready_throughout"] = row["min_ready"] is not None and row["min_ready"] > 0
    return out
