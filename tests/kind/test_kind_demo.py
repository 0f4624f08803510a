"""``svcproxy demo --kind`` on the suite's cluster, run as a user runs it, then read back.

The demo installs the chart again (the images hack/kind.sh loaded), deploys its five
Services and policies in namespace svcproxy-demo with a client Pod on every node, and
sends every request by DNS name. Checked from what it printed and wrote (demo.json):
every policy Programmed on every node, no request failed, every name resolved to its
Service's ClusterIP, the ipvs policies shown as run by iptables (no IPVS here) with the
grids judged as iptables's, and each verdict true of the counts: ClientIP pins each client,
the canary's weight 1 against 4 shows in the shares, userspace rr spreads exactly, iptables
spreads at random. ``--down`` deletes the namespace at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kindlib import Kind

NS = "svcproxy-demo"
REQUESTS = 30  # per client Pod per Service: a multiple of 3 for userspace rr's exact spread
HANG = 600  # seconds: only a guard against a demo that never returns


@dataclass
class DemoRun:
    proc: subprocess.CompletedProcess[str]
    summary: dict[str, Any]  # demo.json
    out: Path


@pytest.fixture(scope="module")
def run(kind: Kind, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    out = tmp_path_factory.mktemp("demo-kind")
    try:
        proc = subprocess.run([sys.executable, "-m", "svcproxy.cli", "demo", "--kind", "--out",
                               str(out), "--requests", str(REQUESTS), "--down"],
                              capture_output=True, text=True, timeout=HANG, check=False)
        path = out / "demo.json"
        summary = json.loads(path.read_text()) if path.exists() else {"services": []}
        yield DemoRun(proc, summary, out)
    finally:
        # A demo that stopped half-way did not reach its --down: the suite's later tests
        # share the cluster.
        kind.kubectl("delete", "namespace", NS, "--wait=false", "--ignore-not-found", check=False)


def service(summary: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in summary["services"] if s["service"] == name]
    assert len(found) == 1, f"the demo showed {name} {len(found)} times"
    return found[0]


def totals(s: dict[str, Any]) -> dict[str, int]:
    return {p: sum(row.get(p, 0) for row in s["clients"].values()) for p in s["pods"]}


def test_every_policy_programmed_everywhere_and_every_request_answered(run: DemoRun,
                                                                     kind: Kind) -> None:
    proc, summary = run.proc, run.summary
    assert proc.returncode == 0, (f"demo exited {proc.returncode}:\n{proc.stderr[-3000:]}\n"
                                  f"{proc.stdout[-2000:]}")
    nodes = sorted(n["metadata"]["name"] for n in kind.json("get", "nodes")["items"])
    assert summary["via"] == "DNS name" and summary["node_names"] == nodes
    assert len(summary["services"]) == 5
    for s in summary["services"]:
        assert s["status"]["nodes_programmed"] == s["status"]["nodes_total"] == len(nodes), s["status"]
        assert s["failed"] == 0 and s["errors"] == [], s["errors"]
        assert sorted(s["clients"]) == nodes  # one client row per node
        assert all(sum(row.values()) == REQUESTS for row in s["clients"].values())
        assert set(totals(s)) == set(s["pods"])
        resolved = summary["resolved"][s["service"]]
        assert resolved["name"] == f"{s['service']}.{NS}.svc.cluster.local"
        assert resolved["addresses"] == [resolved["cluster_ip"]] == [s["status"]["cluster_ip"]]


def test_ipvs_policies_shown_as_run_by_iptables(run: DemoRun) -> None:
    proc, summary = run.proc, run.summary
    assert summary["ipvs_nodes"] == []
    nodes = ", ".join(summary["node_names"])
    assert [n for n in summary["fallback"] if n.startswith(f"ipvs runs as iptables on {nodes} (")]
    for name in ("echo-rr", "echo-sticky", "web-canary"):
        s = service(summary, name)
        assert s["policy"].endswith(" -> iptables"), s["policy"]
        n = len(summary["node_names"])
        assert s["status"]["mode"] == f"ipvs (iptables on {n}/{n} nodes)", s["status"]
        said = s["status"]["policy_mode"]  # the policy's own status names the nodes
        assert said.startswith("ipvs (iptables on ") and said.endswith(")"), said
        assert sorted(said[len("ipvs (iptables on "):-1].split(", ")) == summary["node_names"]
    assert service(summary, "echo-iptables")["policy"] == "iptables"
    assert service(summary, "echo-userspace")["status"]["mode"] == "userspace"
    tail = proc.stdout.split(f"$ kubectl -n {NS} get spp,pvs,pn", 1)
    assert len(tail) == 2, "the demo did not show kubectl get spp,pvs,pn"
    pn_rows = [line for line in tail[1].splitlines() if line.startswith("proxynode")]
    assert len(pn_rows) == len(summary["node_names"])
    assert all("iptables(ipvs)" in row for row in pn_rows), pn_rows


def test_verdicts_hold_for_the_counts(run: DemoRun) -> None:
    proc, summary = run.proc, run.summary
    clients = len(summary["node_names"])
    sticky = service(summary, "echo-sticky")
    assert sticky["expect"] == "pinned"
    assert all(len([p for p, n in row.items() if n]) == 1 for row in sticky["clients"].values())
    assert sticky["verdict"].startswith(f"{clients}/{clients} clients pinned")
    canary = service(summary, "web-canary")
    assert canary["expect"] == "weighted" and canary["verdict"].startswith("shares follow the weights")
    share = {p: n / (REQUESTS * clients) for p, n in totals(canary).items()}
    weights = canary["weights"]
    assert sorted(weights.values()) == [1, 4, 4]
    # iptables draws each connection with probability 1/9 or 4/9: wide bounds (> 4 sd each).
    for pod, weight in weights.items():
        assert (share[pod] < 0.3) if weight == 1 else (share[pod] > 0.2), share
    for name in ("echo-rr", "echo-iptables"):  # rr asked for, but iptables picks at random
        s = service(summary, name)
        assert s["expect"] == "random" and s["verdict"].startswith("random pick per connection")
        assert len([p for p, n in totals(s).items() if n]) >= 2, totals(s)
    userspace = service(summary, "echo-userspace")
    assert userspace["expect"] == "even" and userspace["verdict"].startswith("even spread")
    fair = REQUESTS / len(userspace["pods"])
    for client, row in userspace["clients"].items():
        assert all(abs(row.get(p, 0) - fair) <= 1 for p in userspace["pods"]), (client, row)
    for s in summary["services"]:
        assert f"{s['service']}  ({s['policy']}): {s['verdict']}" in proc.stdout
    assert (run.out / "clients-x-pods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_down_deletes_the_demo_namespace(run: DemoRun, kind: Kind) -> None:
    assert re.search(rf"deleting namespace {NS}", run.proc.stderr), run.proc.stderr[-1000:]
    phase = kind.kubectl("get", "namespace", NS, "-o", "jsonpath={.status.phase}", check=False)
    assert phase in ("", "Terminating"), phase
