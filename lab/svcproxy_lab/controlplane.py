"""The lab's control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Called by ``cluster.py``. Each component is a local process on the host, built
by ``toolchain/build.sh``, with its log in ``<state>/logs/<name>.log`` and its
pid in ``<state>/pids/<name>.pid``. :func:`start` starts what is not running
and waits for the API server's ``/readyz``; :func:`stop` stops them all.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from svcproxy_lab.kubeapi import KubeApi
from svcproxy_lab.network import SERVICE_CIDR
from svcproxy_lab.node import BRIDGE_ADDRESS, LabContext, pid_alive, read_pid, spawn, terminate
from svcproxy_lab.pki import Pki

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
# component -> the TCP ports it listens on, checked before it starts.
PORTS: dict[str, tuple[int, ...]] = {
    "etcd": (2379, 2380),
    "kube-apiserver": (6443,),
    "kube-controller-manager": (10257,),
    "kube-scheduler": (10259,),
}


class ControlPlaneError(RuntimeError):
    """A component could not start; the message says why and where its log is."""


def pid_file(ctx: LabContext, component: str) -> Path:
    return ctx.pid_dir / f"{component}.pid"


def running(ctx: LabContext, component: str) -> bool:
    pid = read_pid(pid_file(ctx, component))
    return pid is not None and pid_alive(pid)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def check_ports(state_dir: Path, ports: dict[str, tuple[int, ...]] = PORTS) -> None:
    """Refuse to start while some process holds a port of a component this lab does not run.

    Every component is checked before the first one starts: a lab half up beside another
    (its etcd started, its API server's port taken) would leave processes behind, and its
    clients would reach the other lab's API server ("x509: certificate signed by unknown
    authority"). The message names the holder's pid and, for a lab's, its state folder.
    """
    for component, component_ports in ports.items():
        pid = read_pid(state_dir / "pids" / f"{component}.pid")
        if pid is not None and pid_alive(pid):
            continue
        for port in component_ports:
            if not port_free(port):
                raise ControlPlaneError(
                    f"port {port} (for {component}) is taken by {port_holder(port, state_dir)}"
                )


def port_holder(port: int, state_dir: Path) -> str:
    """Who listens on ``port``, and what to do about it, for the error message."""
    pids = listeners(port)
    if not pids:
        return (f"another process: find it with `ss -ltnp 'sport = :{port}'` and stop it, or run "
                "`svcproxy lab down` with the --state-dir of the lab that owns it")
    pid = pids[0]
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    lab = lab_of(pid)
    if lab is None:
        return f"pid {pid} ({name}), which is no lab's: stop it"
    if lab == state_dir.resolve():
        return (f"pid {pid} ({name}) of this lab, in {lab}, which its pid files no longer "
                f"name: stop it with `kill {pid}`")
    return (f"pid {pid} ({name}) of another lab, in {lab}: run "
            f"`svcproxy lab down --state-dir {lab}` first")


def listeners(port: int) -> list[int]:
    """Pids of the processes holding a listening TCP socket (IPv4 or IPv6) on ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN; field 9 the inode.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found: list[int] = []
    if not inodes:
        return found
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    found.append(int(proc.name))
                    break
            except OSError:
                continue
    return sorted(found)


def lab_of(pid: int) -> Path | None:
    """The state folder of the lab that process ``pid`` belongs to, from its command line.

    Every lab process names a file in its folder (``--data-dir=<state>/etcd``,
    ``--client-ca-file=<state>/pki/ca.crt``, ``--state-dir <state>/nodes/...``); the
    folder is the first parent holding ``lab.json`` or ``pki/admin.kubeconfig`` (``down``
    removes the first and keeps the second).
    """
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for arg in args:
        value = arg.split("=", 1)[-1]
        if not value.startswith("/"):
            continue
        for parent in Path(value).parents:
            if (parent / "lab.json").is_file() or (parent / "pki" / "admin.kubeconfig").is_file():
                return parent
    return None


def _argv(ctx: LabContext, component: str, pki: Pki) -> list[str]:
    binary = str(ctx.bin_dir / component)
    if component == "etcd":
        return [
            binary, "--name=lab", f"--data-dir={ctx.state_dir / 'etcd'}",
            "--listen-client-urls=http://127.0.0.1:2379",
            "--advertise-client-urls=http://127.0.0.1:2379",
            "--listen-peer-urls=http://127.0.0.1:2380",
            "--initial-advertise-peer-urls=http://127.0.0.1:2380",
            "--initial-cluster=lab=http://127.0.0.1:2380",
            # A throwaway test store: durability buys nothing, fsync costs seconds.
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ]
    if component == "kube-apiserver":
        return [
            binary, "--etcd-servers=http://127.0.0.1:2379",
            # One listener on every address: 127.0.0.1 for the host, 172.29.0.1 for nodes.
            "--bind-address=0.0.0.0", "--secure-port=6443",
            f"--advertise-address={BRIDGE_ADDRESS}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--client-ca-file={pki.ca_cert}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true", "--profiling=false", "--v=1",
            # It listens on every address of the host: only certificate holders get in.
            "--anonymous-auth=false",
        ]
    common = [
        "--authentication-kubeconfig={kc}", "--authorization-kubeconfig={kc}",
        "--kubeconfig={kc}", "--leader-elect=false", "--bind-address=127.0.0.1",
    ]
    if component == "kube-controller-manager":
        kc = str(ctx.kubeconfig("controller-manager"))
        return [
            binary, *(a.format(kc=kc) for a in common),
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-cidr=10.244.0.0/16", "--controllers=*", "--v=1",
            # Lift the not-ready taint of a new Node within a second, not five.
            "--node-monitor-period=1s",
            # Each controller gets its own ServiceAccount token at start; the default
            # client rate limit (20 qps) spreads that over seconds.
            "--kube-api-qps=200", "--kube-api-burst=400",
        ]
    if component == "kube-scheduler":
        kc = str(ctx.kubeconfig("scheduler"))
        return [binary, *(a.format(kc=kc) for a in common), "--v=1"]
    raise ValueError(component)


def admin_api(ctx: LabContext) -> KubeApi:
    return KubeApi(ctx.kubeconfig("admin"))


def wait_for(
    what: str, check: Callable[[], bool], timeout: float, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    hint = f"; see {log}" if log else ""
    raise ControlPlaneError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


def _apiserver_ready(ctx: LabContext) -> bool:
    try:
        status, _ = admin_api(ctx).text("/readyz")
    except OSError:
        return False
    return status == 200


def _etcd_ready() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 2379), timeout=1):
            return True
    except OSError:
        return False


def _started(
    pid: int, component: str, log: Path, ready: Callable[[], bool]
) -> Callable[[], bool]:
    """A readiness check that fails fast, with the log's end, if the process died."""

    def check() -> bool:
        if not pid_alive(pid):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise ControlPlaneError(f"{component} exited at start; end of {log}:\n{tail}")
        return ready()

    return check


def start(ctx: LabContext, pki: Pki, say: Callable[[str], None]) -> None:
    """Start every component that is not running, in order; return when the API is ready."""
    check_ports(ctx.state_dir)
    for component in COMPONENTS:
        log = ctx.log_dir / f"{component}.log"
        if running(ctx, component):
            continue
        say(f"starting {component}")
        pid = spawn(_argv(ctx, component, pki), log, pid_file(ctx, component))

        if component == "etcd":
            wait_for("etcd", _started(pid, component, log, _etcd_ready), 60, log)
        elif component == "kube-apiserver":
            wait_for("kube-apiserver /readyz",
                     _started(pid, component, log, lambda: _apiserver_ready(ctx)), 120, log)
    for component in COMPONENTS:
        if not running(ctx, component):
            raise ControlPlaneError(
                f"{component} is not running; see {ctx.log_dir / (component + '.log')}"
            )


def stop(ctx: LabContext) -> None:
    """Stop the components in reverse order (etcd last, so the others exit cleanly)."""
    for component in reversed(COMPONENTS):
        terminate(pid_file(ctx, component))
