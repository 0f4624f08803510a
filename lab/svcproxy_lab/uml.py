"""User-mode-linux guests with a real IPVS kernel, and the lab node built on them.

:class:`UmlGuest` boots Debian's ``linux.uml`` (unpacked by ``toolchain/uml.sh``)
with the host's file system as a read-only root, runs ``guest/init.sh`` as PID 1
and talks to the command server it starts (``guest/server.py``) through a spool
folder shared over hostfs. It stands alone: the dataplane tests, benchmarks and
:class:`UmlNode` (the lab's ``uml`` node kind, made by ``node.make_node``) use it.
Any host process can attach to a running guest by name and state folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from svcproxy_lab import network
from svcproxy_lab.node import (
    BRIDGE_ADDRESS,
    LabContext,
    node_address,
    node_name,
    node_pod_cidr,
    pid_alive,
)

GUEST_DIR = Path(__file__).resolve().parent / "guest"
INIT = GUEST_DIR / "init.sh"
SERVER = GUEST_DIR / "server.py"
UML_SH = Path(__file__).resolve().parent / "toolchain" / "uml.sh"
# Short on purpose: UML puts its mconsole socket here, and socket paths are limited.
UML_RUN_DIR = Path("/run/svcproxy-uml")
CONSOLE_TAIL_LINES = 30


class UmlError(RuntimeError):
    """A guest could not be booted, reached or stopped; the message says why."""


class UmlBootError(UmlError):
    pass


def kernel_dir() -> Path:
    """The unpacked user-mode-linux package: ``$SVCPROXY_UML_DIR`` or ``uml.sh``'s cache."""
    env = os.environ.get("SVCPROXY_UML_DIR")
    if env:
        return Path(env)
    proc = subprocess.run(["bash", str(UML_SH)], capture_output=True, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise UmlError(
            f"cannot unpack the user-mode-linux kernel ({UML_SH} exited {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}; run hack/setup.sh as root"
        )
    return Path(lines[-1])


def kernel_paths(root: Path) -> tuple[Path, Path]:
    """(``linux.uml``, the modules folder that holds ``<kernel version>/``) under ``root``."""
    kernel = root / "usr" / "bin" / "linux.uml"
    modules = root / "usr" / "lib" / "uml" / "modules"
    if not kernel.is_file() or not modules.is_dir():
        raise UmlError(f"{root} holds no usr/bin/linux.uml: run {UML_SH} (or hack/setup.sh)")
    return kernel, modules


# The guest mounts fresh tmpfs on these, hiding whatever the host keeps there.
_TMPFS_IN_GUEST = (Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/dev/shm"))


def kernel_schedulers(modules: Path) -> frozenset[str]:
    """The IPVS schedulers of the kernel whose modules folder is ``modules``: loadable
    (``ip_vs_<name>.ko``, a packaged kernel) or built in (``modules.builtin``, the
    kernel uml.sh builds). The FTP helper and SIP persistence engine are not schedulers."""
    names = {p.name[len("ip_vs_"):-len(".ko")] for p in modules.rglob("ip_vs_*.ko")}
    for builtin in modules.glob("*/modules.builtin"):
        names |= set(re.findall(r"/ip_vs_(\w+)\.ko$", builtin.read_text(), re.M))
    return frozenset(names - {"ftp", "pe_sip"})


def scheduler_probe(schedulers: Sequence[str]) -> str:
    """A guest shell script proving each scheduler: load it, make a TCP virtual server
    10.99.0.<i>:80 with it (the kernel refuses a scheduler it lacks), print
    ``ipvsadm -Ln`` and clear the table. :func:`probed_schedulers` reads the output."""
    lines = ["set -e", "modprobe ip_vs"]
    for i, name in enumerate(schedulers):
        lines += [f"modprobe ip_vs_{name}", f"ipvsadm -A -t 10.99.0.{i + 1}:80 -s {name}"]
    return "\n".join([*lines, "ipvsadm -Ln", "ipvsadm -C", ""])


def probed_schedulers(table: str) -> frozenset[str]:
    """The schedulers of the probe's virtual servers in ``ipvsadm -Ln`` output."""
    return frozenset(re.findall(r"^TCP\s+10\.99\.0\.\d+:80 (\w+)", table, re.M))


def _covered_code_paths() -> list[Path]:
    """The checkout and the virtualenv, where the guest's tmpfs mounts would hide them.

    A checkout under /tmp (CI clones one anywhere) holds the guest's init, its command
    server, the agent and the kubelet; the guest mounts these back from the host.
    """
    wanted = {Path(__file__).resolve().parents[2], Path(sys.prefix).resolve()}
    return sorted(p for p in wanted if any(p.is_relative_to(t) for t in _TMPFS_IN_GUEST))


def _hostfs_path(path: Path) -> str:
    # hostfs takes the host path as its only mount option: commas and blanks would split it.
    text = str(path.resolve())
    if any(c in text for c in ", \t\n"):
        raise UmlError(f"path {text!r} holds a comma or blank, which hostfs cannot mount")
    return text


def umid_pids(umid: str) -> list[int]:
    """Host processes of the guest ``umid`` (UML's helpers carry the same command line)."""
    needle = f"umid={umid}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise UmlError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name, check=False).returncode == 0


class UmlGuest:
    """One user-mode-linux guest; its files live in ``state_dir/name``.

    ``tap``: host tap device for the guest's eth0 (created, and enslaved to
    ``bridge`` when given; removed by :meth:`destroy` if this object created it).
    ``address``: eth0's address with prefix ("172.29.0.11/24"). ``extra_routes``:
    (cidr, gateway) pairs. ``mounts``: more host folders the guest may write,
    mounted at the same path. The guest never gets a default route.
    """

    def __init__(
        self,
        name: str,
        state_dir: Path | str,
        *,
        mem: str = "256M",
        tap: str | None = None,
        bridge: str | None = None,
        address: str | None = None,
        extra_routes: Sequence[tuple[str, str]] = (),
        ip_forward: bool = False,
        sysctls: Mapping[str, str] | None = None,
        mounts: Sequence[Path | str] = (),
    ) -> None:
        self.name = name
        self.dir = Path(state_dir).resolve() / name
        self.mem = mem
        self.tap = tap
        self.bridge = bridge
        self.address = address
        self.extra_routes = tuple(extra_routes)
        self.sysctls = dict(sysctls or {})
        if ip_forward:
            self.sysctls["net.ipv4.ip_forward"] = "1"
        self.mounts = [Path(m) for m in mounts]
        self.umid_digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:8]
        self.umid = f"svcp-{name}-{self.umid_digest}"
        self.spool = self.dir / "spool"
        self.console_log = self.dir / "console.log"
        self.pid_file = self.dir / "uml.pid"
        self._proc: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count()

    # -- boot -----------------------------------------------------------------------
    def _write_config(self, modules: Path) -> None:
        mounts = [*_covered_code_paths(), *self.mounts]
        env = {
            "SVCP_MODULES": _hostfs_path(modules),
            "SVCP_PYTHON": sys.executable,
            "SVCP_SERVER": str(SERVER),
            "SVCP_HOSTNAME": self.name,
            "SVCP_MOUNTS": " ".join(_hostfs_path(m) for m in mounts),
        }
        (self.dir / "guest.env").write_text(
            "".join(f"{k}='{v}'\n" for k, v in env.items())
        )
        lines = []
        if self.tap is not None:
            # UML names its vector device vec0; the lab and tests expect eth0.
            lines.append("ip link set vec0 name eth0")
            lines.append("ip link set eth0 up")
            if self.address:
                lines.append(f"ip addr add {self.address} dev eth0")
            for cidr, via in self.extra_routes:
                lines.append(f"ip route replace {cidr} via {via} dev eth0")
        for key, value in self.sysctls.items():
            lines.append(f"sysctl -q -w {key}={value}")
        (self.dir / "network.sh").write_text("\n".join(lines) + "\n")

    def _ensure_tap(self) -> None:
        if self.tap is None or self.bridge is None:
            return
        if not link_exists(self.tap):
            _ip("tuntap", "add", "dev", self.tap, "mode", "tap")
        _ip("link", "set", self.tap, "master", self.bridge, "up")

    def command_line(self, kernel: Path) -> list[str]:
        argv = [
            str(kernel), f"mem={self.mem}", f"umid={self.umid}", f"uml_dir={UML_RUN_DIR}",
            "rootfstype=hostfs", "rootflags=/", "ro", f"init={INIT}",
            "con=null", "con0=null,fd:1", "ssl=null",
            f"SVCP_DIR={_hostfs_path(self.dir)}",
        ]
        if self.tap is not None:
            # A fixed, locally administered MAC: the bridge's and peers' ARP and
            # FDB entries stay right across a reboot of the guest.
            mac = ":".join(["02", "73", *(self.umid_digest[i:i + 2] for i in (0, 2, 4, 6))])
            argv.append(f"vec0:transport=tap,ifname={self.tap},mac={mac}")
        return argv

    def boot(self, timeout: float = 60) -> None:
        """Start the guest and wait until its command server answers."""
        if self.is_running():
            return
        self.destroy(remove_tap=False)  # leftovers of a crashed earlier boot
        kernel, modules = kernel_paths(kernel_dir())
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("new", "out", "cancel"):
            d = self.spool / sub
            d.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                f.unlink(missing_ok=True)
        (self.spool / "ready").unlink(missing_ok=True)
        (self.dir / "logs").mkdir(exist_ok=True)
        UML_RUN_DIR.mkdir(parents=True, exist_ok=True)
        # The guest mounts the UML modules on /lib/modules of the read-only host
        # root, so the mount point must exist on the host (it does not on hosts
        # without a kernel package, e.g. containers); an empty folder is harmless.
        Path("/lib/modules").mkdir(parents=True, exist_ok=True)
        self._write_config(modules)
        self._ensure_tap()
        with self.console_log.open("wb") as console:
            self._proc = subprocess.Popen(
                self.command_line(kernel), stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, start_new_session=True, cwd=self.dir,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        deadline = time.monotonic() + timeout
        while not (self.spool / "ready").exists():
            if self._proc.poll() is not None:
                raise UmlBootError(
                    f"guest {self.name} stopped while booting (exit {self._proc.returncode}); "
                    f"last console lines ({self.console_log}):\n{self.console_tail()}"
                )
            if time.monotonic() > deadline:
                tail = self.console_tail()
                self.destroy()
                raise UmlBootError(
                    f"guest {self.name} did not answer within {timeout:.0f} s; "
                    f"last console lines ({self.console_log}):\n{tail}"
                )
            time.sleep(0.01)

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def _main_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def is_running(self) -> bool:
        pid = self._main_pid()
        if pid is None or not pid_alive(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return f"umid={self.umid}".encode() in cmdline.split(b"\0")

    # -- commands ---------------------------------------------------------------------
    def _request(self, req: Mapping[str, object], input: bytes | None = None) -> str:
        rid = f"{os.getpid()}-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        new = self.spool / "new"
        if input is not None:
            (new / f"{rid}.in").write_bytes(input)
        tmp = new / f"{rid}.tmp"
        tmp.write_text(json.dumps(dict(req)))
        tmp.rename(new / f"{rid}.json")
        return rid

    def _wait(self, rid: str, argv: Sequence[str], timeout: float
              ) -> subprocess.CompletedProcess[bytes]:
        out = self.spool / "out"
        rc_file = out / f"{rid}.rc"
        deadline = time.monotonic() + timeout
        delay = 0.0005
        next_check = time.monotonic() + 1.0
        cancelled = False
        while not rc_file.exists():
            now = time.monotonic()
            if now > deadline and not cancelled:
                (self.spool / "cancel" / rid).touch()
                cancelled = True
                deadline = now + 5
            elif now > deadline:
                break
            if now > next_check:
                next_check = now + 1.0
                if not self.is_running():
                    raise UmlError(
                        f"guest {self.name} is not running (command {list(argv)!r}); "
                        f"last console lines:\n{self.console_tail()}"
                    )
            time.sleep(delay)
            delay = min(delay * 2, 0.003)  # a stat() per poll: cheap on the host
        stdout = _read_and_remove(out / f"{rid}.out")
        stderr = _read_and_remove(out / f"{rid}.err")
        (self.spool / "new" / f"{rid}.in").unlink(missing_ok=True)
        if cancelled:
            rc_file.unlink(missing_ok=True)
            raise subprocess.TimeoutExpired(list(argv), timeout, stdout, stderr)
        code = int(rc_file.read_text())
        rc_file.unlink()
        return subprocess.CompletedProcess(list(argv), code, stdout, stderr)

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None,
        env: Mapping[str, str] | None = None, check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` in the guest; its exit status, stdout and stderr come back."""
        rid = self._request({"kind": "run", "argv": list(argv), "env": dict(env or {})}, input)
        proc = self._wait(rid, argv, timeout)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, list(argv), proc.stdout,
                                                proc.stderr)
        return proc

    def start_process(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> int:
        """Start a long-lived process; output to ``log`` (default ``logs/<name>.log``)."""
        req: dict[str, object] = {"kind": "start", "name": name, "argv": list(argv),
                                  "env": dict(env or {})}
        if log is not None:
            req["log"] = str(log)
        proc = self._wait(self._request(req), argv, 30)
        if proc.returncode != 0:
            raise UmlError(f"guest {self.name}: cannot start {name}: {proc.stderr.decode()}")
        return int(proc.stdout)

    def stop_process(self, name: str, sig: int = signal.SIGTERM, grace: float = 10) -> None:
        req = {"kind": "stop", "name": name, "signal": int(sig), "grace": grace}
        self._wait(self._request(req), ["stop", name], grace + 30)

    def process_log(self, name: str) -> Path:
        return self.dir / "logs" / f"{name}.log"

    def process_alive(self, name: str) -> bool:
        """True while a process started under ``name`` runs in this (running) guest."""
        return (self.dir / "logs" / f"{name}.pid").exists() and self.is_running()

    def process_exit_status(self, name: str) -> int | None:
        """Exit status of a long-lived process, or None while it runs (or never ran)."""
        try:
            return int((self.dir / "logs" / f"{name}.exit").read_text())
        except (OSError, ValueError):
            return None

    # -- stop -------------------------------------------------------------------------
    def shutdown(self, timeout: float = 30) -> None:
        """Power the guest off cleanly, then make sure nothing of it is left."""
        if self.is_running():
            self._request({"kind": "poweroff"})
            pid = self._main_pid()
            deadline = time.monotonic() + timeout
            while pid is not None and pid_alive(pid) and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.02)
        self.destroy()

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.poll()

    def destroy(self, remove_tap: bool = True) -> None:
        """Kill every host process of the guest (by umid), remove its tap; idempotent."""
        for _ in range(50):
            pids = umid_pids(self.umid)
            main = self._main_pid()
            if main is not None and pid_alive(main) and main not in pids:
                pids.append(main)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._reap()
            time.sleep(0.02)
        else:
            raise UmlError(f"guest {self.name}: processes {pids} survive SIGKILL")
        self._reap()
        self.pid_file.unlink(missing_ok=True)
        # The guest's process table went with it; so do its pid files.
        for pid_file in (self.dir / "logs").glob("*.pid"):
            pid_file.unlink(missing_ok=True)
        _remove_tree(UML_RUN_DIR / self.umid)
        if remove_tap and self.tap is not None and self.bridge is not None and link_exists(
            self.tap
        ):
            _ip("link", "del", self.tap, check=False)


def _read_and_remove(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return b""
    path.unlink(missing_ok=True)
    return data


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            _remove_tree(child)
        else:
            child.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def booted_guest(
    name: str, state_dir: Path | str, *, boot_timeout: float = 60, **kwargs: object
) -> Iterator[UmlGuest]:
    """A booted :class:`UmlGuest` for the ``with`` block; always shut down after."""
    guest = UmlGuest(name, state_dir, **kwargs)  # type: ignore[arg-type]
    try:
        guest.boot(boot_timeout)
        yield guest
    finally:
        guest.shutdown()


# --- the lab node ------------------------------------------------------------------

CLIENT_SCRIPT = """
ns={ns}; gw={gw}; addr={addr}
[ -e /run/netns/$ns ] || ip netns add $ns
if ! ip -n $ns link show eth0 >/dev/null 2>&1; then
  ip link del client0 2>/dev/null || true
  ip link add client0 type veth peer name eth0 netns $ns
fi
ip addr replace $gw/32 dev client0
ip link set client0 up
ip -n $ns link set lo up
for a in {sources}; do
  ip route replace $a/32 dev client0 scope link src $gw
  ip -n $ns addr replace $a/32 dev eth0
done
ip -n $ns link set eth0 up
ip -n $ns route replace $gw dev eth0 scope link
for cidr in {cidrs}; do ip -n $ns route replace $cidr via $gw dev eth0 src $addr; done
"""


CONNTRACK_MAX = 131072
CONNTRACK_SCRIPT = f"""
modprobe nf_conntrack
echo {CONNTRACK_MAX // 4} > /sys/module/nf_conntrack/parameters/hashsize
sysctl -q -w net.netfilter.nf_conntrack_max={CONNTRACK_MAX}
"""


class UmlNode:
    """Lab node ``node-i`` as a user-mode-linux guest with IPVS (``node.LabNode``).

    eth0 is the tap ``svcp-n<i>`` on the lab bridge with 172.29.0.(10+i)/24 (the
    name the lab's sweep already removes); the guest reaches the API server at
    172.29.0.1:6443 over the bridge (no slirp) and the other nodes' Pod CIDRs via
    their bridge addresses; no default route. Its files: ``<state>/uml/node-i/``.
    """

    def __init__(self, index: int, ctx: LabContext) -> None:
        self.index = index
        self.name = node_name(index)
        self.address = node_address(index)
        self.pod_cidr = node_pod_cidr(index)
        self.has_ipvs = True
        self.tap = f"svcp-n{index}"
        self._ctx = ctx
        self.guest = self._make_guest(ctx)

    def _make_guest(self, ctx: LabContext) -> UmlGuest:
        routes = [(network.SERVICE_CIDR, BRIDGE_ADDRESS)]
        routes += [(node_pod_cidr(j), node_address(j))
                   for j in range(1, ctx.node_count + 1) if j != self.index]
        return UmlGuest(
            self.name, ctx.state_dir / "uml",
            mem=os.environ.get("SVCPROXY_UML_MEM", "256M"),
            tap=self.tap, bridge=network.BRIDGE, address=f"{self.address}/24",
            extra_routes=routes, ip_forward=True,
            # Asymmetric paths (client -> service here -> pod elsewhere) are normal.
            sysctls={"net.ipv4.conf.all.rp_filter": "0",
                     "net.ipv4.conf.default.rp_filter": "0"},
            # The whole lab folder: the kubelet reads pki/, writes logs/ and
            # nodes/<name>/, and it may lie under /tmp, which is tmpfs inside.
            mounts=[ctx.state_dir],
        )

    def create(self, ctx: LabContext) -> None:
        self._ctx = ctx
        self.guest = self._make_guest(ctx)
        for d in (ctx.log_dir, ctx.node_state_dir(self.name)):
            d.mkdir(parents=True, exist_ok=True)
        if self.guest.is_running():
            return
        self.guest.boot(timeout=float(os.environ.get("SVCPROXY_UML_BOOT_TIMEOUT", "120")))
        # Loaded up front so that an agent probing for IPVS finds it at once.
        proc = self.guest.run(["modprobe", "ip_vs"])
        if proc.returncode != 0:
            raise UmlError(f"{self.name}: modprobe ip_vs failed: {proc.stderr.decode().strip()}")
        # The kernel sizes the conntrack table by RAM: 2048 entries in a 256 MB guest.
        # Steady test traffic (a new connection every ~50 ms from each of 3 clients, each
        # leaving a TIME_WAIT entry for 120 s) fills that in about 70 s, and then the
        # guest drops new connections in and out ("nf_conntrack: table full"). A real
        # node gets kube-proxy's sizing (--conntrack-min 131072, hashsize max/4): so here.
        proc = self.guest.run(["sh", "-ec", CONNTRACK_SCRIPT])
        if proc.returncode != 0:
            raise UmlError(f"{self.name}: sizing the conntrack table failed: "
                           f"{proc.stderr.decode().strip()}")

    def run(
        self, argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return self.guest.run(argv, timeout=timeout, input=input)

    def start_process(self, name: str, argv: Sequence[str]) -> None:
        self.stop_process(name)
        self.guest.start_process(name, argv, log=self._ctx.log_dir / f"{self.name}-{name}.log")

    def process_alive(self, name: str) -> bool:
        return self.guest.process_alive(name)

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        if self.guest.is_running():
            self.guest.stop_process(name, sig)

    def client_netns(self) -> str:
        """Create (if needed) the client namespace behind this node, inside the guest."""
        ns = network.client_netns(self.index)
        script = CLIENT_SCRIPT.format(
            ns=ns, gw=f"10.244.{self.index}.1", addr=network.client_address(self.index),
            sources=" ".join(network.client_addresses(self.index)),
            cidrs=" ".join((network.SERVICE_CIDR, network.CLUSTER_POD_CIDR, network.LAB_SUBNET)),
        )
        proc = self.guest.run(["sh", "-ec", script])
        if proc.returncode != 0:
            raise UmlError(f"{self.name}: client namespace {ns}: {proc.stderr.decode().strip()}")
        return ns

    def run_client(
        self, argv: Sequence[str], *, timeout: float = 60, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``argv`` in the client namespace behind this node."""
        ns = self.client_netns()
        return self.guest.run(["nsenter", f"--net=/run/netns/{ns}", "--", *argv],
                              timeout=timeout, input=input)

    def destroy(self) -> None:
        # Pod and client namespaces live inside the guest and go with it.
        if self.guest.is_running():
            with contextlib.suppress(UmlError, subprocess.TimeoutExpired):
                self.guest.shutdown(timeout=20)
        self.guest.destroy()
        if link_exists(self.tap):
            _ip("link", "del", self.tap, check=False)
