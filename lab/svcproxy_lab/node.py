"""The lab's node interface, and the network-namespace node that implements it.

A lab node is where a lab kubelet and an agent run. ``cluster.py`` creates
nodes through :func:`make_node`, starts processes in them and destroys them.
Two kinds exist: ``netns`` (:class:`NetnsNode`, a network namespace on the
host kernel, which has no IPVS) and ``uml`` (``svcproxy_lab.uml.UmlNode``, a
user-mode-linux guest with a real IPVS kernel, written against this protocol).
Everything else in the lab sees nodes only through :class:`LabNode`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from svcproxy_lab import network

# The fixed lab address plan (see docs/lab.md).
BRIDGE_ADDRESS = "172.29.0.1"
API_PORT = 6443


def node_name(index: int) -> str:
    return f"node-{index}"


def node_address(index: int) -> str:
    return f"172.29.0.{10 + index}"


def node_pod_cidr(index: int) -> str:
    return f"10.244.{index}.0/24"


@dataclass(frozen=True)
class LabContext:
    """What a node needs to know about the lab it belongs to."""

    state_dir: Path
    bin_dir: Path
    python: str  # the venv's interpreter (sys.executable); runs `-m svcproxy.cli`
    api_url: str  # the API server as seen from nodes: https://172.29.0.1:6443
    node_count: int  # all nodes of the lab, so each can route to the others' Pod CIDRs

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    def kubeconfig(self, user: str) -> Path:
        """Kubeconfig of ``user``: admin, kube-proxy, controller-manager, scheduler, node-N."""
        return self.pki_dir / f"{user}.kubeconfig"

    def node_state_dir(self, name: str) -> Path:
        return self.state_dir / "nodes" / name


@runtime_checkable
class LabNode(Protocol):
    """One lab node. All methods are idempotent; ``destroy`` leaves nothing behind."""

    name: str  # "node-1"
    index: int  # 1-based
    address: str  # "172.29.0.11", on the lab bridge
    pod_cidr: str  # "10.244.1.0/24"
    has_ipvs: bool

    def create(self, ctx: LabContext) -> None:
        """Plumb the node (and boot it, for guests). Idempotent."""

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run one command in the node's root network namespace; never raises on exit code."""

    def start_process(self, name: str, argv: Sequence[str]) -> None:
        """Start a long-lived process (kubelet, agent) in the node, replacing one of that name.

        Its output goes to ``<state>/logs/<node>-<name>.log``.
        """

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop the process started under ``name``; fine if it is not running."""

    def destroy(self) -> None:
        """Stop every process and remove everything the node made. Idempotent."""


# --- process bookkeeping shared by node kinds and the control plane ---------


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (a dead child not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name, which may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def spawn(
    argv: Sequence[str], log_file: Path, pid_file: Path, env: dict[str, str] | None = None
) -> int:
    """Start ``argv`` detached (own session), output appended to ``log_file``; record its pid."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"--- {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the `svcproxy lab up` that started it
            env=env,
        )
    pid_file.write_text(f"{proc.pid}\n")
    return proc.pid


def terminate(pid_file: Path, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Signal the process group recorded in ``pid_file``, escalate to SIGKILL, forget the pid."""
    pid = read_pid(pid_file)
    if pid is not None and pid_alive(pid):
        _signal_group(pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if pid_alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while pid_alive(pid) and time.monotonic() < deadline + 5:
                _reap(pid)
                time.sleep(0.05)
    if pid is not None:
        _reap(pid)
    pid_file.unlink(missing_ok=True)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the process leads its own session, so its group too
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # Only our own children can be reaped; init reaps the others.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --- the network-namespace node ----------------------------------------------


class NetnsNode:
    """A node that is a network namespace ``svcp-node-N`` on the host kernel (no IPVS)."""

    def __init__(self, index: int, ctx: LabContext) -> None:
        self.index = index
        self.name = node_name(index)
        self.address = node_address(index)
        self.pod_cidr = node_pod_cidr(index)
        self.has_ipvs = False
        self.netns = f"svcp-node-{index}"
        self._ctx = ctx

    def create(self, ctx: LabContext) -> None:
        self._ctx = ctx
        network.create_node_netns(self.netns, self.index, ctx.node_count)

    def _enter(self) -> list[str]:
        # nsenter switches only the network namespace. `ip netns exec` would also give
        # the process a private mount namespace, where the kubelet's `ip netns add`
        # would create pod namespaces nobody else can see.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self._enter(), *argv], input=input, capture_output=True, timeout=timeout, check=False
        )

    def _pid_file(self, name: str) -> Path:
        return self._ctx.pid_dir / f"{self.name}-{name}.pid"

    def start_process(self, name: str, argv: Sequence[str]) -> None:
        self.stop_process(name)
        spawn(
            [*self._enter(), *argv],
            self._ctx.log_dir / f"{self.name}-{name}.log",
            self._pid_file(name),
        )

    def process_alive(self, name: str) -> bool:
        pid = read_pid(self._pid_file(name))
        return pid is not None and pid_alive(pid)

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        terminate(self._pid_file(name), sig)

    def destroy(self) -> None:
        for pid_file in sorted(self._ctx.pid_dir.glob(f"{self.name}-*.pid")):
            terminate(pid_file)
        network.destroy_node_netns(self.netns, self.index)


def make_node(kind: str, index: int, ctx: LabContext) -> LabNode:
    """Build node ``index`` of ``kind`` ("netns" or "uml").

    A ``uml`` node comes from ``svcproxy_lab.uml.UmlNode(index, ctx)``, which has the
    same constructor shape as :class:`NetnsNode`.
    """
    if kind == "netns":
        return NetnsNode(index, ctx)
    if kind == "uml":
        try:
            uml = importlib.import_module("svcproxy_lab.uml")
        except ImportError as exc:
            raise RuntimeError(
                "user-mode-linux nodes need svcproxy_lab.uml, which is not available; "
                "run without --ipvs-nodes"
            ) from exc
        node: LabNode = uml.UmlNode(index, ctx)
        return node
    raise ValueError(f"unknown node kind {kind!r}: use 'netns' or 'uml'")


def uml_available() -> bool:
    try:
        importlib.import_module("svcproxy_lab.uml")
    except ImportError:
        return False
    return True
