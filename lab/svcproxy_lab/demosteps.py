"""The steps both demos take through kubectl, and what they print at the end.

The lab demo (``demo.py``) and the kind demo (``demokind.py``) differ in where the
cluster comes from and how the clients send their traffic; everything between is
here: progress lines (:func:`say`), deploying the workload of ``demoplan``,
applying the five policies at once, waiting until each is Programmed on every
node, the empty :class:`~svcproxy_lab.demoview.Outcome` of each Service, and
:func:`show` (table, grids, picture, ``demo.json``, ``kubectl get spp,pvs,pn``) and
:func:`exit_status`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.compile.program import endpoint_weight
from svcproxy_lab import demoview
from svcproxy_lab.cluster import LabError
from svcproxy_lab.demoplan import (
    DEPLOYMENTS,
    SERVICES,
    DemoService,
    policy_manifest,
    programmed_row,
    workload,
)
from svcproxy_lab.demoview import Outcome


class Clock:
    """Seconds since the demo started, for the progress lines."""

    start = time.monotonic()

    @classmethod
    def reset(cls) -> None:
        cls.start = time.monotonic()

    @classmethod
    def elapsed(cls) -> float:
        return time.monotonic() - cls.start


def say(msg: str) -> None:
    print(f"[demo {Clock.elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


class Kubectl:
    def __init__(self, bin_dir: Path, kubeconfig: Path) -> None:
        self.argv = [str(bin_dir / "kubectl"), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float | None = None) -> str:
        """kubectl's stdout; raises LabError when it fails, TimeoutExpired after ``timeout``."""
        proc = subprocess.run([*self.argv, *args], input=input, capture_output=True, text=True,
                              check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "-o", "json"))


def wait_agents(kubectl: Kubectl, nodes: int, logs_hint: str, timeout: float = 120) -> list[str]:
    """The names of the nodes whose agent has reported (its ProxyNode exists and is Ready)."""
    deadline = time.monotonic() + timeout
    ready: list[str] = []
    while time.monotonic() < deadline:
        ready = [
            pn["metadata"]["name"]
            for pn in kubectl.json("get", "pn")["items"]
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in (pn.get("status") or {}).get("conditions", []))
        ]
        if len(ready) >= nodes:
            say(f"agents report from {', '.join(sorted(ready))}")
            return sorted(ready)
        time.sleep(0.5)
    raise LabError(f"only {ready} of {nodes} agents reported after {timeout:.0f} s; {logs_hint}")


def deploy(kubectl: Kubectl, namespace: str, container: dict[str, Any],
           extra: Sequence[dict[str, Any]] = ()) -> None:
    """The Deployments (Pods of ``container``), one Service per DemoService, and ``extra``."""
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([*workload(container, namespace), *extra]))
    for name, _, _ in DEPLOYMENTS:
        kubectl("-n", namespace, "rollout", "status", f"deployment/{name}", "--timeout=180s")
    pods = sum(r for _, _, r in DEPLOYMENTS)
    say(f"{pods} echo Pods Ready behind {len(SERVICES)} Services in namespace {namespace}")


def apply_policies(kubectl: Kubectl, namespace: str) -> None:
    """All five policies in one apply; policies of an earlier demo in the namespace go."""
    mine = {s.name for s in SERVICES}
    old = kubectl.json("-n", namespace, "get", "spp")["items"]
    stale = [p["metadata"]["name"] for p in old if p["metadata"]["name"] not in mine]
    if stale:
        kubectl("-n", namespace, "delete", "spp", *stale)
        say(f"deleted policies of an earlier demo: {', '.join(stale)}")
    # Server-side apply with one field manager: a rerun states each whole spec again.
    kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=svcproxy-demo",
            "-f", "-", input=yaml.safe_dump_all([policy_manifest(s, namespace) for s in SERVICES]))
    say(f"applied {len(SERVICES)} policies at once: " + "; ".join(
        f"{s.name}: {s.title}" for s in SERVICES))


def wait_programmed(kubectl: Kubectl, namespace: str, timeout: float = 180) -> dict[str, dict[str, Any]]:
    """Each policy's table row once every policy is Programmed on every node."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        for obj in kubectl.json("-n", namespace, "get", "spp")["items"]:
            name = obj["metadata"]["name"]
            row = programmed_row(obj)
            if row is not None and name not in rows:
                say(f"policy {name} ({row['mode']}) Programmed on {row['programmed']} nodes")
            if row is not None:
                rows[name] = row
        if all(s.name in rows for s in SERVICES):
            return rows
        time.sleep(0.5)
    waiting = [s.name for s in SERVICES if s.name not in rows]
    raise LabError(f"policies {', '.join(waiting)} not Programmed on every node after "
                   f"{timeout:.0f} s: see `kubectl -n {namespace} describe spp` and the agent logs")


def outcome_for(kubectl: Kubectl, namespace: str, s: DemoService, status: dict[str, Any], *,
                requests: int, title: str | None = None, expect: str | None = None) -> Outcome:
    """An empty Outcome: the Service's Pods, their weights under its policy, its status.

    ``title`` and ``expect`` replace the policy's own where nodes run it in another mode.
    """
    items = kubectl.json("-n", namespace, "get", "pods", "-l", f"app={s.app}")["items"]
    labels = {p["metadata"]["name"]: p["metadata"].get("labels") or {} for p in items}
    policy = ServiceProxyPolicy.model_validate(policy_manifest(s, namespace))
    weights = {pod: endpoint_weight(policy, lab) for pod, lab in labels.items()}
    return Outcome(name=s.name, title=title or s.title, expect=expect or s.expect,
                   pods=sorted(labels), weights=weights, requests=requests, status=status)


def show(outcomes: list[Outcome], kubectl: Kubectl, out: Path, *, namespace: str, how: str,
         summary: dict[str, Any], notes: Sequence[str] = ()) -> None:
    """The table, ``notes`` under it, ``how`` the traffic ran, a grid per Service, the picture,
    ``demo.json`` (``summary`` and every Service's numbers) and ``kubectl get spp,pvs,pn``."""
    print(f"\n{len(outcomes)} Services in namespace {namespace}, each with its own policy:\n")
    print(demoview.table(outcomes))
    for note in notes:
        print(note)
    print(f"\n{how}:")
    for o in outcomes:
        print()
        print(demoview.grid(o))
    demoview.plot(outcomes, out / "clients-x-pods.png")
    summary = {"namespace": namespace, **summary, "elapsed_s": round(Clock.elapsed(), 1),
               "services": [o.to_json() for o in outcomes]}
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\npictures: {out / 'clients-x-pods.png'}; numbers: {out / 'demo.json'}")
    print(f"\n$ kubectl -n {namespace} get spp,pvs,pn")
    print(kubectl("-n", namespace, "get", "spp,pvs,pn").rstrip())


def exit_status(outcomes: list[Outcome]) -> int:
    """Says the first errors of each Service; 1 if any request failed or went astray."""
    for o in outcomes:
        for err in o.errors[:3]:
            say(f"failed request ({o.name}): {err}")
    return 1 if any(o.failed or o.errors for o in outcomes) else 0
