"""The lab's control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Called by ``cluster.py``. Each component is a local process on the host, built
by ``toolchain/build.sh``, with its log in ``<state>/logs/<name>.log`` and its
pid in ``<state>/pids/<name>.pid``. :func:`start` starts what is not running
and waits for the API server's ``/readyz``; :func:`stop` stops them all.
"""

from __future__ import annotations

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
    for component in COMPONENTS:
        log = ctx.log_dir / f"{component}.log"
        if running(ctx, component):
            continue
        for port in PORTS[component]:
            if not port_free(port):
                raise ControlPlaneError(
                    f"port {port} (for {component}) is taken by another process: find it with "
                    f"`ss -ltnp 'sport = :{port}'` and stop it, or run `svcproxy lab down` "
                    "with the --state-dir of the lab that owns it"
                )
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
