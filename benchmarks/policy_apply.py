"""Policy apply: ``kubectl apply`` of a ServiceProxyPolicy -> ``Programmed=True``, by selected Services.

A fresh 3-node netns lab gets max(--sizes) selectorless Services (10 endpoints each); the
first k of them carry the label ``bench.svcproxy.io/g<k>=true`` for every k in --sizes. With
the operator and the three agents running (no kube-proxy), each repetition applies a policy
(iptables mode) selecting the k Services with the real kubectl, polls the policy until its
``Programmed`` condition is True for its generation (every agent reports every selected
Service at its current contentHash), then deletes it and waits until it is gone (label
removed, programs withdrawn, finalizer released) before the next one. Prints JSON on stdout,
progress on stderr. Run as root, holding the lab turn:

    flock /run/svcproxy-lab-turn.lock .venv/bin/python -m benchmarks.policy_apply --sizes 1,100,1000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._lab import harness
from benchmarks._lab.harness import POLICY_PATH, BenchLab, Population, say
from benchmarks._report import provenance
from svcproxy_lab.kubeapi import ApiError
from svcproxy_lab.stats import summary

PVS_PATH = f"/apis/svcproxy.io/v1alpha1/namespaces/{harness.NAMESPACE}/proxyvirtualservers"


def group_labels(sizes: list[int]) -> Any:
    def labels(i: int) -> dict[str, str]:
        return {f"bench.svcproxy.io/g{k}": "true" for k in sizes if i < k}

    return labels


def kubectl_apply(bench: BenchLab, body: dict[str, Any]) -> tuple[float, float]:
    """Run ``kubectl apply -f -``: (wall time just before it starts, seconds kubectl took)."""
    state = bench.lab.load()
    assert state is not None
    argv = [str(Path(state["bin_dir"]) / "kubectl"), "--kubeconfig", str(bench.lab.admin_kubeconfig),
            "apply", "-f", "-"]
    t0 = time.time()
    proc = subprocess.run(argv, input=json.dumps(body), capture_output=True, text=True, check=False)
    took = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl apply failed: {proc.stderr.strip()}")
    return t0, took


def wait_gone(bench: BenchLab, name: str, timeout: float) -> float | None:
    """Seconds until the policy and every program in the namespace are gone, or None."""
    api = bench._api()
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if api.get_or_none(f"{POLICY_PATH}/{name}") is None and not api.get(PVS_PATH)["items"]:
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def wait_agents(bench: BenchLab, n: int, timeout: float = 60) -> None:
    api = bench._api()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(api.get("/apis/svcproxy.io/v1alpha1/proxynodes")["items"]) >= n:
                return
        except ApiError as exc:  # 404 / 429 while the just-applied CRDs come up
            say(f"waiting for ProxyNodes: {exc}")
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {n} ProxyNodes after {timeout:.0f} s: see the agent logs")


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sizes = sorted(int(k) for k in args.sizes.split(","))
    out: list[dict[str, Any]] = []
    with BenchLab(Path(args.state_dir)) as bench:
        bench.up()
        bench.populate(max(sizes), Population(), labels=group_labels(sizes))
        bench.start_svcproxy(args.operator_args.split())
        wait_agents(bench, 3)
        for k in sizes:
            reps = args.reps if k < 1000 else args.reps_large
            programmed: list[float] = []
            kubectl: list[float] = []
            withdrawn: list[float] = []
            failures = 0
            for r in range(reps):
                name = f"apply-{k}-{r}"
                body = harness.policy_body(name, selector={f"bench.svcproxy.io/g{k}": "true"})
                if r == 0:
                    body_t0 = time.monotonic()
                    while time.monotonic() - body_t0 < 30:  # the CRD is served a moment after start
                        try:
                            t0, took_kubectl = kubectl_apply(bench, body)
                            break
                        except RuntimeError as exc:
                            say(f"retrying kubectl apply: {exc}")
                            time.sleep(0.5)
                else:
                    t0, took_kubectl = kubectl_apply(bench, body)
                poll = 0.05 if k < 1000 else 0.2
                took = harness.wait_policy(bench._api(), name, t0, args.timeout, poll=poll)
                if took is None:
                    failures += 1
                else:
                    programmed.append(took)
                    kubectl.append(took_kubectl)
                bench._api().delete(f"{POLICY_PATH}/{name}")
                gone = wait_gone(bench, name, args.timeout)
                if gone is not None:
                    withdrawn.append(gone)
                say(f"{k} Services, rep {r + 1}/{reps}: Programmed after "
                    f"{'-' if took is None else f'{took:.3f}'} s (kubectl {took_kubectl:.3f} s); "
                    f"withdrawn in {'-' if gone is None else f'{gone:.2f}'} s")
            out.append({"services": k, "reps": reps, "programmed": summary(programmed),
                        "kubectl_alone": summary(kubectl), "delete_to_gone": summary(withdrawn),
                        "timeouts": failures, "poll_s": poll})
        out.append({"processes": harness.sample_processes(
            bench, ["operator", *[f"{n}-agent" for n in bench.node_names]])})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,100,1000", help="numbers of selected Services")
    parser.add_argument("--reps", type=int, default=10, help="repetitions below 1000 Services")
    parser.add_argument("--reps-large", type=int, default=4, help="repetitions at 1000 Services and more")
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--state-dir", default=str(harness.DEFAULT_STATE))
    parser.add_argument("--operator-args", default="",
                        help="extra options for `svcproxy operator`, space-separated (e.g. --workers=0)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    result = {
        "benchmark": "policy_apply",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(),
        "mode": "iptables (netns nodes)",
        "operator_args": args.operator_args,
        "sizes": run(args),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
