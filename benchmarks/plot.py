"""Plots of the lab benchmarks' JSON: programming latency vs number of Services.

Called on its own to redraw from one saved result (one run: figures of different
runs are never drawn side by side):

    .venv/bin/python -m benchmarks.plot benchmarks/results/programming_latency-1000.json \\
        --png benchmarks/programming_latency.png

Each system gets one line for the p50 and a dashed one for the p99 of the
"replace one endpoint" change (the issue's target), on log-log axes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLOURS = {"svcproxy-iptables": "tab:green", "kube-proxy-iptables": "tab:red",
           "kube-proxy-nftables": "tab:blue"}


def points(results: list[dict[str, Any]], change: str) -> dict[str, dict[int, dict[str, float]]]:
    """system -> N -> summary of ``change``; a later result for the same N wins."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for result in results:
        for size in result["sizes"]:
            for system in COLOURS:
                stats = size.get(system, {}).get(change)
                if stats and stats.get("n"):
                    out.setdefault(system, {})[size["services"]] = stats
    return out


def run_label(result: dict[str, Any]) -> str:
    """The Kubernetes version and CPUs the run recorded (its provenance), for the title."""
    prov = result.get("provenance") or {}
    version = prov.get("kubernetes") or result.get("kubernetes") or "Kubernetes version not recorded"
    cpus = prov.get("cpus") or (result.get("machine") or {}).get("cpus")
    return f"{version}, {cpus} CPUs" if cpus else str(version)


def programming_latency(results: list[dict[str, Any]], png: Path, change: str = "endpoint") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, by_size in sorted(points(results, change).items()):
        sizes = sorted(by_size)
        for q, style in (("p50", "-"), ("p99", "--")):
            ax.plot(sizes, [by_size[n][q] * 1000 for n in sizes], style, marker="o",
                    color=COLOURS[system], label=f"{system} {q}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Services (10 endpoints each), 3 nodes")
    ax.set_ylabel("API write -> kernel on every node (ms)")
    ax.set_title(f"Programming latency, change: {change} ({run_label(results[0])})")
    ax.axhline(250, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="one programming_latency JSON file (one run)")
    parser.add_argument("--png", required=True)
    parser.add_argument("--change", default="endpoint", choices=("endpoint", "add", "remove", "affinity"))
    args = parser.parse_args()
    results = [json.loads(Path(args.result).read_text())]
    programming_latency(results, Path(args.png), args.change)
    print(json.dumps({"png": args.png, "points": points(results, args.change)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
