"""What every benchmark script shares for its output: progress on stderr, /proc memory
figures, the provenance of a run, and the final JSON (stdout, and a file when asked)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from svcproxy_lab.cluster import cached_bin_dir

REPO = Path(__file__).resolve().parent.parent


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB."""
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(field + ":"):
            return round(int(text.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


def provenance() -> dict[str, Any]:
    """Versions read from the tools and the checkout, not written down: the lab's
    Kubernetes (``kube-apiserver --version`` of the cached toolchain), svcproxy, git,
    kernel, nft, iptables, Python, CPUs."""
    def run(*argv: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=REPO)
        except OSError as exc:
            return f"unavailable: {exc}"
        return (proc.stdout or proc.stderr).strip()

    bin_dir = cached_bin_dir()
    return {
        "kubernetes": run(str(bin_dir / "kube-apiserver"), "--version") if bin_dir else "unavailable",
        "svcproxy": importlib.metadata.version("svcproxy"),
        "git_head": run("git", "rev-parse", "HEAD"),
        "git_dirty": bool(run("git", "status", "--porcelain", "--untracked-files=no")),
        "kernel": platform.release(),
        "nft": run("nft", "--version"),
        "iptables": run("iptables", "--version"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def emit(report: dict[str, Any], output: Path | None) -> int:
    """Print the report as JSON (and write it to ``output``); the script's exit status."""
    text = json.dumps(report, indent=2)
    if output:
        output.write_text(text + "\n")
    print(text)
    return 0
