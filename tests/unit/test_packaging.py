"""What ships: the wheel and the images carry svcproxy only, never the lab or the demo.

The lab (lab/svcproxy_lab, distribution svcproxy-lab) is a development tool. This builds
the wheel from a copy of the checkout (lab included, so a packaging rule that picked it up
would show) and reads the Dockerfile's COPY lines, which must bring in operator/ only.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAB_MARKERS = ("svcproxy/lab/", "svcproxy_lab", "svcproxy/demo.py", "demo.py", "toolchain/", "guest/")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".wheels")
    for folder in ("operator", "lab"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("svcproxy-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_holds_the_product(wheel_names: list[str]) -> None:
    assert "svcproxy/cli.py" in wheel_names
    assert "svcproxy/py.typed" in wheel_names
    assert any(n.startswith("svcproxy/dataplane/ipvs/") for n in wheel_names)


def test_the_wheel_holds_nothing_of_the_lab(wheel_names: list[str]) -> None:
    leaked = [n for n in wheel_names if any(m in n for m in LAB_MARKERS)]
    assert leaked == []
    tops = {n.split("/", 1)[0] for n in wheel_names}
    assert tops == {"svcproxy", "svcproxy-0.1.0.dist-info"}


def _copy_sources(dockerfile: str) -> list[str]:
    """The sources of every COPY in the Dockerfile that reads the build context."""
    sources = []
    for line in dockerfile.splitlines():
        words = line.split()
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_the_images_copy_operator_only() -> None:
    sources = _copy_sources((ROOT / "Dockerfile").read_text())
    assert sorted(sources) == ["README.md", "operator", "pyproject.toml"]
    # The build context lets in the same three and nothing else.
    allowed = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")]
    assert allowed == ["!pyproject.toml", "!README.md", "!operator/"]


def test_operator_holds_no_lab_code() -> None:
    files = [p.relative_to(ROOT).as_posix() for p in (ROOT / "operator").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)]
    assert files, "operator/ is empty"
    assert [f for f in files if "/lab/" in f or f.endswith("demo.py") or "svcproxy_lab" in f] == []
    for f in files:
        if f.endswith(".py"):
            text = (ROOT / f).read_text()
            assert "import svcproxy_lab" not in text and "from svcproxy_lab" not in text, f


def test_lab_commands_say_how_to_get_the_lab_where_it_is_missing() -> None:
    # Without site-packages, from operator/ alone: svcproxy is there, the lab is not.
    for command in ("lab", "demo"):
        proc = subprocess.run([sys.executable, "-S", "-m", "svcproxy.cli", command, "--help"],
                              cwd=ROOT / "operator", capture_output=True, text=True, check=False,
                              timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "development tool" in proc.stderr and "make venv" in proc.stderr
