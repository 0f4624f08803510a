"""``svcproxy lab down`` leaves no process, namespace, interface, route or mount behind.

The test takes the session's lab down, checks the machine, runs ``down`` a
second time, checks that a failed ``up`` (a taken port; a node that cannot be
made) leaves nothing either, then brings the lab back up so later tests still
have one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from svcproxy_lab import controlplane, network
from svcproxy_lab.node import pid_alive, read_pid

if TYPE_CHECKING:
    from conftest import Lab

pytestmark = pytest.mark.lab


def _lab_processes(state_dir: Path) -> list[str]:
    """Live processes whose command line names the lab's state folder."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Clients that merely name the kubeconfig (kubectl of a test) are not the lab's.
        if str(state_dir) in cmdline and pid_alive(int(proc.name)) \
                and "kubectl" not in cmdline.split(" ", 1)[0]:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_down_leaves_nothing_behind(lab: Lab) -> None:
    lab.require_owned()
    assert lab.state_dir is not None
    state = lab.state_dir
    # Give down something to clean: a Pod (namespace, veth, echo) and a client namespace.
    lab.kubectl("run", "leftover", "--image=svcproxy.io/echo", "--port=80")
    pod = lab.wait_until(
        "the leftover Pod to run",
        lambda: (p := json.loads(lab.kubectl("get", "pod", "leftover", "-o", "json")))
        and p["status"].get("podIP") and p,
    )
    assert lab.request("node-1", pod["status"]["podIP"], 80).split()[0] == "leftover"
    pids = [read_pid(f) for f in (state / "pids").glob("*.pid")]
    pids += [json.loads(f.read_text()).get("pid") for f in state.glob("nodes/*/pods/*.json")]
    assert len([p for p in pids if p]) >= 8  # 4 control plane + 3 kubelets + the echo
    assert _lab_processes(state), "the check for leftover processes sees nothing while up"
    assert network.leftovers(), "the check for leftover plumbing sees nothing while up"

    lab.down()

    assert [p for p in pids if isinstance(p, int) and pid_alive(p)] == []
    assert _lab_processes(state) == []
    assert network.leftovers() == []
    assert [n for n in network.netns_list() if n.startswith("svcp-node")] == []
    routes = subprocess.run(["ip", "route", "show", "table", "all"], capture_output=True,
                            text=True, check=True).stdout
    assert not [r for r in routes.splitlines()
                if any(c in r for c in ("10.96.", "10.244.", "172.29.", "svcpbr0", "svcp-n"))]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert [m for m in mounts if network.LAB_NETNS.match(Path(m).name)] == []

    lab.down()  # a second time is fine
    assert network.leftovers() == []

    # A port the control plane needs, taken by someone else: up refuses and says which.
    with socket.socket() as squatter:
        # etcd's last connections may sit in TIME_WAIT; a listener still blocks the port.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 2379))
        squatter.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "svcproxy.cli", "lab", "up", "--no-svcproxy",
             "--state-dir", str(state)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 1
    assert "port 2379 (for etcd) is taken" in proc.stderr
    lab.down()

    # A step failing after the control plane and node-1 are up (node-2's namespace name
    # taken by a plain file, which no `ip` command can enter): up takes all of it down.
    bogus = Path("/run/netns/svcp-node-2")
    bogus.touch()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "svcproxy.cli", "lab", "up", "--no-svcproxy",
             "--state-dir", str(state)], capture_output=True, text=True, timeout=600, check=False)
    finally:
        bogus.unlink(missing_ok=True)
    assert proc.returncode == 1
    assert "starting the lab kubelet on node-1" in proc.stderr  # it got that far
    assert "taking down what it started" in proc.stderr
    assert "network setup failed" in proc.stderr and "svcp-node-2" in proc.stderr
    assert _lab_processes(state) == []
    assert network.leftovers() == []
    assert controlplane.port_free(6443)
    assert not (state / "lab.json").exists()

    lab.up()  # later tests still get a lab
    assert "node-1" in lab.kubectl("get", "nodes")
