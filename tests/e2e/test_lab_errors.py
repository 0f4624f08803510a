"""``svcproxy lab up`` says clearly what is wrong: not root, another lab, a stale state folder.

(A taken port is checked in ``test_lab_teardown.py``, the one place the lab is down.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from svcproxy_lab.node import pid_alive, read_pid

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab


def lab_cmd(*args: str, user: int | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "svcproxy.cli", "lab", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)


def test_up_without_root_says_so(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    proc = lab_cmd("up", "--state-dir", str(tmp_path / "lab"), user=65534)
    assert proc.returncode == 1
    assert "needs root" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_second_lab_is_refused_while_one_runs(lab: Lab, tmp_path: Path) -> None:
    lab.require_local()
    proc = lab_cmd("up", "--no-svcproxy", "--state-dir", str(tmp_path / "other"))
    assert proc.returncode == 1
    assert f"another lab runs from {lab.state_dir}" in proc.stderr
    assert "node-1" in lab.kubectl("get", "nodes")  # the running lab is untouched


def test_stale_state_is_detected_and_cleaned(lab: Lab) -> None:
    lab.require_owned()
    assert lab.state_dir is not None
    # Simulate a crash: every process of the lab dies at once.
    pids = [read_pid(f) for f in (lab.state_dir / "pids").glob("*.pid")]
    pids += [json.loads(f.read_text()).get("pid")
             for f in lab.state_dir.glob("nodes/*/pods/*.json")]
    for pid in pids:
        if isinstance(pid, int) and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    lab.wait_until("the lab's processes to die",
                   lambda: not [p for p in pids if isinstance(p, int) and pid_alive(p)])
    status = lab_cmd("status", "--state-dir", str(lab.state_dir))
    assert status.returncode == 1
    assert "stale state" in status.stdout
    proc = lab_cmd("up", "--no-svcproxy", "--state-dir", str(lab.state_dir))
    assert proc.returncode == 0, proc.stderr
    assert "stale lab state" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(lab.kubeconfig)
    nodes = lab.kubectl_json("get", "nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == lab.nodes
