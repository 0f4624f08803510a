"""``Lab.up`` and ``Lab.down`` (svcproxy_lab.cluster) when a step fails or another lab runs.

Faked at the lab module's boundary: root, the toolchain build, the owner file, the host's
network plumbing (bridge, sweep), the PKI, the control plane's start and the nodes. The
"processes" of the control plane and the nodes' kubelets are real ``sleep`` processes with
pid files, so the tests see whether ``down``'s own ``terminate`` really stops them.
The port check itself runs for real against a listener this test starts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from svcproxy_lab import cluster, controlplane, network
from svcproxy_lab.cluster import Lab, LabError
from svcproxy_lab.controlplane import ControlPlaneError
from svcproxy_lab.node import LabContext, node_name, pid_alive, read_pid, spawn, terminate

SLEEP = ["sleep", "600"]


class BootError(RuntimeError):
    """What a guest that does not boot raises (like ``uml.UmlBootError``)."""


@dataclass
class Machine:
    """What the fakes saw: network calls, nodes created and destroyed, processes started."""

    tmp: Path
    owner_file: Path
    calls: list[str] = field(default_factory=list)
    created: list[int] = field(default_factory=list)
    destroyed: list[int] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)  # "node-2 agent", in order
    fail_create: set[int] = field(default_factory=set)
    pids: list[int] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    listeners: dict[int, list[int]] = field(default_factory=dict)  # port -> pids

    def say(self, msg: str) -> None:
        self.said.append(msg)

    def spawn(self, pid_file: Path, argv: Sequence[str] = SLEEP) -> int:
        pid = spawn(argv, pid_file.parent.parent / "logs" / f"{pid_file.stem}.log", pid_file)
        self.pids.append(pid)
        return pid

    def alive(self) -> list[int]:
        return [p for p in self.pids if pid_alive(p)]


class FakeNode:
    """A node whose create may raise; its kubelet is a ``sleep`` with a pid file."""

    def __init__(self, index: int, ctx: LabContext, machine: Machine) -> None:
        self.index = index
        self.name = node_name(index)
        self.address = f"172.29.0.{10 + index}"
        self.pod_cidr = f"10.244.{index}.0/24"
        self.has_ipvs = False
        self._ctx = ctx
        self._machine = machine

    def create(self, ctx: LabContext) -> None:
        if self.index in self._machine.fail_create:
            raise BootError(f"guest {self.name} stopped while booting (exit -6)")
        self._machine.created.append(self.index)

    def _pid_file(self, name: str) -> Path:
        return self._ctx.pid_dir / f"{self.name}-{name}.pid"

    def run(self, argv: Sequence[str], *, timeout: float = 60,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(list(argv), 0, b"", b"")

    def start_process(self, name: str, argv: Sequence[str]) -> None:
        self._machine.spawn(self._pid_file(name))

    def process_alive(self, name: str) -> bool:
        pid = read_pid(self._pid_file(name))
        return pid is not None and pid_alive(pid)

    def stop_process(self, name: str, sig: int = 15) -> None:
        self._machine.stopped.append(f"{self.name} {name}")
        terminate(self._pid_file(name))

    def destroy(self) -> None:
        self._machine.destroyed.append(self.index)
        for pid_file in self._ctx.pid_dir.glob(f"{self.name}-*.pid"):
            terminate(pid_file)


class FakePki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def ensure(self, nodes: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Machine]:
    m = Machine(tmp_path, tmp_path / "svcproxy-lab.owner")
    bin_dir = tmp_path / "bin"

    def start(ctx: LabContext, pki: Any, say: Any) -> None:
        for component in controlplane.COMPONENTS:
            if not controlplane.running(ctx, component):
                m.spawn(controlplane.pid_file(ctx, component))

    monkeypatch.setattr(cluster, "require_root", lambda: None)
    monkeypatch.setattr(cluster, "ensure_toolchain", lambda say: bin_dir)
    monkeypatch.setattr(cluster, "OWNER_FILE", m.owner_file)
    monkeypatch.setattr(cluster, "Pki", FakePki)
    monkeypatch.setattr(cluster, "make_node", lambda kind, i, ctx: FakeNode(i, ctx, m))
    monkeypatch.setattr(network, "ensure_bridge", lambda: m.calls.append("ensure_bridge"))
    monkeypatch.setattr(network, "sweep", lambda: m.calls.append("sweep"))
    monkeypatch.setattr(controlplane, "start", start)
    monkeypatch.setattr(controlplane, "check_ports", lambda state_dir: m.calls.append("check_ports"))
    # This machine's real port 6443 may belong to a real lab: the tests say who listens.
    monkeypatch.setattr(controlplane, "listeners", lambda port: m.listeners.get(port, []))
    monkeypatch.setattr(Lab, "wait_nodes_ready", lambda self, nodes, say: None)
    try:
        yield m
    finally:  # a failing test must not leave sleeps behind
        for pid_file in tmp_path.rglob("*.pid"):
            terminate(pid_file)


def test_a_failed_first_up_takes_down_everything_it_started(machine: Machine) -> None:
    lab = Lab(machine.tmp / "lab")
    machine.fail_create = {2}

    with pytest.raises(BootError, match="guest node-2 stopped while booting"):
        lab.up(3, 0, svcproxy=False, say=machine.say)

    assert machine.created == [1]
    # Four control plane components and node-1's kubelet ran, and none of them does now.
    assert len(machine.pids) == 5
    assert machine.alive() == []
    assert not lab.alive()
    assert sorted(machine.destroyed) == [1, 2, 3]
    assert machine.calls == ["check_ports", "ensure_bridge", "sweep"]
    assert not machine.owner_file.exists()
    assert lab.load() is None
    assert not (lab.state_dir / "pids").exists()
    assert any("lab up failed (BootError: guest node-2" in s and "taking down" in s
               for s in machine.said)


def test_an_interrupted_first_up_is_taken_down_too(machine: Machine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    lab = Lab(machine.tmp / "lab")

    def interrupted(self: Lab, nodes: Any, say: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(Lab, "wait_nodes_ready", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lab.up(2, 0, svcproxy=False, say=machine.say)
    assert machine.created == [1, 2]
    assert machine.alive() == []
    assert "sweep" in machine.calls


def test_a_failed_up_of_a_running_lab_leaves_it_running(machine: Machine) -> None:
    lab = Lab(machine.tmp / "lab")
    lab.up(3, 0, svcproxy=False, say=machine.say)
    assert lab.alive()
    running = machine.alive()
    assert len(running) == 7  # 4 control plane + 3 kubelets
    # node-2's kubelet died; the next `up` restarts it, and node-3's create fails.
    terminate(lab.state_dir / "pids" / "node-2-kubelet.pid")
    machine.fail_create = {3}
    machine.calls.clear()

    with pytest.raises(BootError):
        lab.up(3, 0, svcproxy=False, say=machine.say)

    assert lab.alive()
    assert machine.destroyed == []
    assert "sweep" not in machine.calls
    assert machine.owner_file.read_text().strip() == str(lab.state_dir)
    assert lab.load() is not None
    lab.down(say=machine.say)
    assert machine.alive() == []


def test_a_taken_port_fails_before_anything_is_written_or_started(
    machine: Machine, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = Lab(machine.tmp / "lab")

    def taken(state_dir: Path) -> None:
        raise ControlPlaneError("port 6443 (for kube-apiserver) is taken by pid 1 (init)")

    monkeypatch.setattr(controlplane, "check_ports", taken)
    with pytest.raises(ControlPlaneError, match="port 6443"):
        lab.up(3, 0, svcproxy=False, say=machine.say)
    # Nothing to roll back, and above all no sweep of the plumbing another lab may own.
    assert machine.calls == []
    assert machine.pids == []
    assert not machine.owner_file.exists()
    assert lab.load() is None


def test_down_beside_another_running_lab_stops_only_its_own(machine: Machine) -> None:
    other = Lab(machine.tmp / "other")
    other_api = machine.spawn(other.state_dir / "pids" / "kube-apiserver.pid")
    machine.owner_file.write_text(f"{other.state_dir}\n")
    lab = Lab(machine.tmp / "lab")
    (lab.state_dir / "pids").mkdir(parents=True)
    lab.state_file.write_text('{"nodes": [{"index": 1, "kind": "netns"}], "bin_dir": "/x"}')
    own = [machine.spawn(lab.state_dir / "pids" / f"{name}.pid") for name in ("etcd", "node-1-kubelet")]

    lab.down(say=machine.say)

    assert [p for p in own if pid_alive(p)] == []
    assert pid_alive(other_api)
    assert machine.calls == []  # no sweep: svcp-node-1, svcpbr0 and the routes are the other's
    assert machine.destroyed == []
    assert machine.owner_file.read_text().strip() == str(other.state_dir)
    assert lab.load() is None
    assert any(f"another lab runs from {other.state_dir}" in s for s in machine.said)


def test_down_knows_the_running_lab_by_its_api_server_without_the_owner_file(
    machine: Machine,
) -> None:
    other = Lab(machine.tmp / "other")
    (other.state_dir / "pki").mkdir(parents=True)
    (other.state_dir / "pki" / "admin.kubeconfig").write_text("")
    # Its command line names the other lab's files, as a real API server's does.
    api = machine.spawn(other.state_dir / "pids" / "kube-apiserver.pid",
                        [sys.executable, "-c", "import time; time.sleep(600)",
                         f"--client-ca-file={other.state_dir}/pki/ca.crt"])
    machine.listeners[6443] = [api]
    # Popen returns once the child execs, a moment before its arguments show in /proc.
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{api}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    lab = Lab(machine.tmp / "lab")
    (lab.state_dir / "pids").mkdir(parents=True)
    lab.state_file.write_text('{"nodes": [{"index": 1, "kind": "netns"}], "bin_dir": "/x"}')

    lab.down(say=machine.say)

    assert machine.calls == []
    assert machine.destroyed == []
    assert pid_alive(api)
    assert any(f"another lab runs from {other.state_dir}" in s for s in machine.said)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """A process listening on a free port whose command line names a lab folder's etcd."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "lab.json").write_text("{}")
    code = ("import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, f"--data-dir={other}/etcd"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline()), other
    finally:
        proc.kill()
        proc.wait()


def test_a_port_held_by_another_labs_process_names_its_pid_and_folder(
    tmp_path: Path, listener: tuple[subprocess.Popen[str], int, Path]
) -> None:
    proc, port, other = listener
    assert controlplane.listeners(port) == [proc.pid]
    with pytest.raises(ControlPlaneError) as err:
        controlplane.check_ports(tmp_path / "mine", {"etcd": (port,)})
    msg = str(err.value)
    assert msg.startswith(f"port {port} (for etcd) is taken by pid {proc.pid} (")
    assert f"of another lab, in {other}: run `svcproxy lab down --state-dir {other}` first" in msg


def test_a_port_check_skips_what_this_lab_runs_and_names_a_stray_of_its_own(
    tmp_path: Path, listener: tuple[subprocess.Popen[str], int, Path]
) -> None:
    proc, port, other = listener
    # The listener is this lab's etcd, by its pid file: its port is no obstacle.
    (other / "pids").mkdir()
    (other / "pids" / "etcd.pid").write_text(f"{proc.pid}\n")
    controlplane.check_ports(other, {"etcd": (port,)})
    # Without the pid file it is a stray of this lab, which `down` would not stop.
    (other / "pids" / "etcd.pid").unlink()
    with pytest.raises(ControlPlaneError, match=rf"of this lab, in {other}, .*`kill {proc.pid}`"):
        controlplane.check_ports(other, {"etcd": (port,)})


@pytest.fixture
def running(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> Lab:
    """A running 3-node lab with svcproxy: the operator left out, one agent per node."""
    def agents(self: Lab, ctx: LabContext, nodes: list[Any], say: Any) -> None:
        for node in nodes:
            node.start_process("agent", self.agent_argv(ctx, node))

    monkeypatch.setattr(Lab, "start_svcproxy", agents)
    lab = Lab(machine.tmp / "lab")
    lab.up(3, 0, svcproxy=True, say=machine.say)
    return lab


def _alive(lab: Lab, process: str) -> list[str]:
    """The nodes whose ``process`` (agent, kubelet) runs."""
    pids = lab.state_dir / "pids"
    return [n for n in ("node-1", "node-2", "node-3")
            if (pid := read_pid(pids / f"{n}-{process}.pid")) is not None and pid_alive(pid)]


def test_a_stopped_node_keeps_its_machine_and_comes_back_with_kubelet_then_agent(
    machine: Machine, running: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = running
    kubelet_state = lab.state_dir / "nodes" / "node-2" / "pods"
    kubelet_state.mkdir(parents=True)
    running.stop_node("node-2", say=machine.say)

    assert machine.stopped == ["node-2 agent", "node-2 kubelet"]
    assert _alive(lab, "agent") == _alive(lab, "kubelet") == ["node-1", "node-3"]
    assert machine.destroyed == []
    assert kubelet_state.is_dir()  # its Pods stay for the next kubelet to adopt

    waited: list[list[str]] = []

    def ready(self: Lab, nodes: list[Any], say: Any) -> None:
        waited.append([n.name for n in nodes])
        assert _alive(self, "agent") == ["node-1", "node-3"], "the agent started before Ready"

    monkeypatch.setattr(Lab, "wait_nodes_ready", ready)
    lab.start_node("node-2", say=machine.say)
    assert waited == [["node-2"]]
    assert machine.created[-1] == 2
    assert _alive(lab, "agent") == _alive(lab, "kubelet") == ["node-1", "node-2", "node-3"]


def test_a_wiped_node_is_a_new_machine_and_its_agent_waits_to_be_started(
    machine: Machine, running: Lab
) -> None:
    lab = running
    kubelet_state = lab.state_dir / "nodes" / "node-3" / "pods"
    kubelet_state.mkdir(parents=True)
    lab.stop_node("node-3", wipe=True, say=machine.say)

    assert machine.destroyed == [3]
    assert not kubelet_state.parent.exists()
    assert _alive(lab, "kubelet") == ["node-1", "node-2"]

    lab.start_node("node-3", agent=False, say=machine.say)
    assert _alive(lab, "kubelet") == ["node-1", "node-2", "node-3"]
    assert _alive(lab, "agent") == ["node-1", "node-2"]
    lab.start_agent("node-3", say=machine.say)
    assert _alive(lab, "agent") == ["node-1", "node-2", "node-3"]


def test_a_node_the_lab_does_not_have_is_named_with_those_it_has(
    machine: Machine, running: Lab
) -> None:
    with pytest.raises(LabError, match=r"has no node 'node-9'; it has \['node-1', 'node-2', 'node-3'\]"):
        running.stop_node("node-9", say=machine.say)
    running.down(say=machine.say)
    with pytest.raises(LabError, match=r"no running lab .*: run `svcproxy lab up` first"):
        running.start_node("node-1", say=machine.say)
