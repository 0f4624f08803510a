"""``svcproxy demo`` still shows the point: five Services, five policies, real traffic.

Runs the demo as a user does (``python -m svcproxy.cli demo``, its own lab in its own
state folder, ``--down`` at the end) within a time bound, then reads what it printed
and the numbers it wrote (``demo.json``): at least five policies in different
modes and schedulers, every one Programmed on every node, a grid per Service on
stdout and the PNG beside the numbers, sh + ClientIP answering each client from one
Pod only, wrr following the canary weights, rr spreading evenly on the IPVS nodes,
no failed request, and the real ``kubectl get spp,pvs,pn`` at the end.

The machine holds one lab at a time: the module takes the lab slot (``lab_slot``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.lab,
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the demo's lab needs root"),
]

STATE = Path(os.environ.get("SVCPROXY_E2E_DEMO_STATE_DIR", "/tmp/svcproxy-e2e-demo-lab"))
BOUND = 900  # seconds for the whole demo: a lab from nothing (caches warm), traffic, teardown
REQUESTS = 12  # per client per Service: a multiple of 3 (rr over 3 Pods) for an exact spread


@dataclass
class DemoRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float
    summary: dict[str, Any]
    out: Path

    def service(self, name: str) -> dict[str, Any]:
        found = [s for s in self.summary["services"] if s["service"] == name]
        assert found, f"the demo showed no Service {name}: {[s['service'] for s in self.summary['services']]}"
        return found[0]


def svcproxy(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "svcproxy.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def demo(lab_slot: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    out = tmp_path_factory.mktemp("demo-out")
    start = time.monotonic()
    try:
        proc = svcproxy("demo", "--state-dir", str(STATE), "--out", str(out), "--down",
                        "--requests", str(REQUESTS), timeout=BOUND)
        seconds = time.monotonic() - start
        path = out / "demo.json"
        summary = json.loads(path.read_text()) if path.exists() else {"services": []}
        yield DemoRun(proc.returncode, proc.stdout, proc.stderr, seconds, summary, out)
    finally:
        # A demo that failed half-way leaves its lab up; the next module needs the slot.
        svcproxy("lab", "down", "--state-dir", str(STATE), timeout=300)


def test_demo_succeeds_within_its_time_bound(demo: DemoRun) -> None:
    assert demo.rc == 0, f"demo exited {demo.rc}:\n{demo.stderr[-3000:]}\n{demo.stdout[-3000:]}"
    assert demo.seconds < BOUND
    # a progress line per step, each with its elapsed seconds
    steps = re.findall(r"^\[demo +(\d+\.\d)s\] (.*)$", demo.stderr, re.M)
    assert any("Programmed on 3/3 nodes" in msg for _, msg in steps), demo.stderr[-2000:]
    elapsed = [float(s) for s, _ in steps]
    assert elapsed == sorted(elapsed) and len(elapsed) >= 10


def test_five_policies_in_different_modes_all_programmed_everywhere(demo: DemoRun) -> None:
    services = demo.summary["services"]
    assert len(services) >= 5
    kinds = {(s["status"]["mode"].split()[0], s["status"]["scheduler"]) for s in services}
    assert len(kinds) == len(services), f"two Services share a mode and scheduler: {kinds}"
    assert {m for m, _ in kinds} >= {"ipvs", "iptables", "userspace"}
    for s in services:
        assert s["status"]["nodes_programmed"] == s["status"]["nodes_total"] == demo.summary["nodes"]
        assert s["failed"] == 0, s["errors"]
        # the table row on stdout says the same
        assert re.search(rf"^{s['service']} +{re.escape(s['policy'])} .* 3/3$", demo.stdout, re.M)


def test_pictures_exist(demo: DemoRun) -> None:
    png = demo.out / "clients-x-pods.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in demo.stdout
    clients = 4 * demo.summary["nodes"]
    for s in demo.summary["services"]:
        assert len(s["clients"]) == clients
        header = f"{s['service']}  ({s['policy']}): "
        assert header in demo.stdout, f"no grid for {s['service']}"
        block = demo.stdout.split(header, 1)[1].splitlines()
        rows = [line for line in block[2:2 + clients] if line.startswith("node-")]
        assert len(rows) == clients, block[:clients + 2]


def test_sh_with_client_ip_pins_each_client_to_one_pod(demo: DemoRun) -> None:
    sticky = demo.service("echo-sticky")
    for client, row in sticky["clients"].items():
        answered = {pod: n for pod, n in row.items() if n}
        assert len(answered) == 1, f"{client} was answered by {answered}"
        assert sum(answered.values()) == REQUESTS
    assert sticky["verdict"].startswith(f"{len(sticky['clients'])}/{len(sticky['clients'])} clients pinned")


def test_wrr_follows_the_canary_weights(demo: DemoRun) -> None:
    canary = demo.service("web-canary")
    totals = {p: sum(row.get(p, 0) for row in canary["clients"].values()) for p in canary["pods"]}
    answered = sum(totals.values())
    weight_sum = sum(canary["weights"].values())
    assert sorted(canary["weights"].values()) == [1, 4, 4]
    for pod, weight in canary["weights"].items():
        # exact on the IPVS nodes; node-1 (iptables fallback) draws at random, hence the margin
        assert abs(totals[pod] / answered - weight / weight_sum) < 0.06, totals


def test_rr_spreads_evenly_on_ipvs_nodes(demo: DemoRun) -> None:
    rr = demo.service("echo-rr")
    ipvs_nodes = demo.summary["ipvs_nodes"]
    if not ipvs_nodes:
        pytest.skip("no user-mode-linux nodes: every node fell back to iptables")
    fair = REQUESTS / len(rr["pods"])
    for client, row in rr["clients"].items():
        if client.split()[0] in ipvs_nodes:
            assert all(abs(row.get(p, 0) - fair) <= 1 for p in rr["pods"]), (client, row)


def test_kubectl_get_shows_policies_programs_and_nodes(demo: DemoRun) -> None:
    tail = demo.stdout.split("$ kubectl -n demo get spp,pvs,pn", 1)
    assert len(tail) == 2, "the demo did not show kubectl get spp,pvs,pn"
    names = re.findall(r"^(\S+)/(\S+)", tail[1], re.M)
    kinds: dict[str, set[str]] = {}
    for kind, name in names:
        kinds.setdefault(kind.split(".")[0], set()).add(name)
    services = {s["service"] for s in demo.summary["services"]}
    assert kinds.get("serviceproxypolicy") == services
    assert kinds.get("proxyvirtualserver") == services
    assert kinds.get("proxynode") == {f"node-{i}" for i in range(1, demo.summary["nodes"] + 1)}
