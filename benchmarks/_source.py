"""Which svcproxy a benchmark measures: ``--src DIR`` (e.g. an older commit's ``operator/``
for a before/after run), else the one installed, this checkout's.

:func:`use` runs before the script imports svcproxy. With a ``--src`` other than this
checkout's it re-executes the running module once with DIR first on ``PYTHONPATH``, so
svcproxy comes from there and nothing edits ``sys.path``. :func:`module_argv` is how a
benchmark starts itself (or a sibling) in a namespace or a guest: ``python -m`` from the
repo root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_SOURCES = ROOT / "operator"
_MARK = "SVCPROXY_BENCH_SRC"  # set in the re-executed process: the sources it runs


def requested(argv: list[str] | None = None) -> Path:
    """The folder named by ``--src`` on the command line, else this checkout's sources."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--src" and i + 1 < len(args):
            return Path(args[i + 1]).resolve()
        if arg.startswith("--src="):
            return Path(arg.split("=", 1)[1]).resolve()
    return CHECKOUT_SOURCES


def use() -> str:
    """Make svcproxy come from the requested sources (re-executing if need be); their folder."""
    src = requested()
    if src == CHECKOUT_SOURCES or os.environ.get(_MARK) == str(src):
        return str(src)
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    if spec is None:
        raise SystemExit("--src needs the benchmark run as a module: python -m benchmarks.NAME")
    path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, **{_MARK: str(src)})
    os.execve(sys.executable, [sys.executable, "-m", spec.name, *sys.argv[1:]], env)
    raise AssertionError("unreachable")  # pragma: no cover


def module_argv(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` run from the repo root, wherever the caller's cwd is."""
    return ["env", "-C", str(ROOT), sys.executable, "-m", module, *args]
