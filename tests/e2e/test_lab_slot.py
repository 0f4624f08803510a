"""A module with a lab of its own gets the machine's one lab slot through ``lab_slot``.

The session's lab steps aside for the module and is back afterwards; this
module runs a one-node lab in its own state folder to prove both halves.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from svcproxy_lab.cluster import Lab as LabCluster

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab
SMALL = Path("/tmp/svcproxy-e2e-small-lab")


def lab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "svcproxy.cli", "lab", *args,
                           "--state-dir", str(SMALL)],
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def small_lab(lab: Lab, lab_slot: None) -> Iterator[Path]:
    try:
        proc = lab_cli("up", "--nodes", "1", "--no-svcproxy")
        assert proc.returncode == 0, proc.stderr
        yield Path(proc.stdout.strip().splitlines()[-1])
    finally:
        lab_cli("down")  # after a failed up too: one killed by the timeout undoes nothing


def test_a_lab_of_its_own_runs_while_the_session_lab_steps_aside(
    lab: Lab, small_lab: Path
) -> None:
    assert lab.state_dir is not None
    assert not LabCluster(lab.state_dir).alive()
    assert LabCluster(SMALL).alive()
    nodes = json.loads(subprocess.run(
        [lab.kubectl_bin, "--kubeconfig", str(small_lab), "get", "nodes", "-o", "json"],
        capture_output=True, text=True, check=True, timeout=60).stdout)["items"]
    assert [n["metadata"]["name"] for n in nodes] == ["node-1"]
