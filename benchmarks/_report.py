"""What every benchmark script shares for its output: progress on stderr, /proc memory
figures, and the final JSON (stdout, and a file when asked)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB."""
    for text in Path("/proc/self/status").read_text().splitlines():
        if text.startswith(field + ":"):
            return round(int(text.split()[1]) / 1024, 1)
    raise RuntimeError(f"no {field} in /proc/self/status")


def emit(report: dict[str, Any], output: Path | None) -> int:
    """Print the report as JSON (and write it to ``output``); the script's exit status."""
    text = json.dumps(report, indent=2)
    if output:
        output.write_text(text + "\n")
    print(text)
    return 0
