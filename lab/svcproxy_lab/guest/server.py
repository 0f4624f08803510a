"""Command server inside a svcproxy user-mode-linux guest (PID 1 after init.sh).

The host (svcproxy_lab.uml.UmlGuest, in any host process) talks to it through
a spool folder inside the guest's state folder, which both sides see at the
same path through hostfs:

    spool/new/<id>.json     request, written by the host (tmp file + rename)
    spool/new/<id>.in       optional stdin, written before the request
    spool/out/<id>.out|.err the command's stdout / stderr (written by the command)
    spool/out/<id>.rc       its exit status, written last (tmp file + rename)
    spool/cancel/<id>       the host gave up waiting: kill the command

Files rather than a socket or a serial line because any host process (a test,
``svcproxy lab exec``, a benchmark) can then talk to the guest without a daemon
holding a connection, and because tests that rewire the guest's network or
netfilter cannot cut the channel. The guest cannot see host-side changes
through inotify on hostfs, so it polls the folder (a few ms; listing a hostfs
folder costs ~0.1 ms).

Being PID 1 the server also reaps every orphan, which is why it spawns with
os.posix_spawn and owns all waitpid calls (one reaper thread) instead of using
subprocess. Standard library only: it starts with ``python -I -S``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

POLL_SECONDS = 0.002
IDLE_POLL_SECONDS = 0.02
STOP_GRACE_SECONDS = 10.0


class Reaper:
    """Owns waitpid(-1): hands each child's status to whoever spawned it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._have_children = threading.Condition(self._lock)
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._children = 0
        threading.Thread(target=self._loop, name="reaper", daemon=True).start()

    def spawn(
        self, argv: list[str], env: dict[str, str], fds: list[tuple[int, str, int]],
        on_exit: Callable[[int], None],
    ) -> int:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
        for target, path, flags in fds:
            actions.append((os.POSIX_SPAWN_OPEN, target, path, flags, 0o644))
        with self._lock:
            pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)
            self._callbacks[pid] = on_exit
            self._children += 1
            self._have_children.notify()
        return pid

    def _loop(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                with self._lock:
                    # Orphans reparented to PID 1 also wake us; a short wait
                    # covers them without a busy loop.
                    self._have_children.wait_for(lambda: self._children > 0, timeout=0.5)
                continue
            code = os.waitstatus_to_exitcode(status)
            with self._lock:
                callback = self._callbacks.pop(pid, None)
                if callback is not None:
                    self._children -= 1
            if callback is not None:
                try:
                    callback(code)
                except Exception as exc:  # a failed status write must not kill PID 1
                    print(f"server: exit callback of {pid} failed: {exc}", file=sys.stderr)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


class Server:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.spool = os.path.join(state_dir, "spool")
        self.new = os.path.join(self.spool, "new")
        self.out = os.path.join(self.spool, "out")
        self.cancel = os.path.join(self.spool, "cancel")
        self.logs = os.path.join(state_dir, "logs")
        for d in (self.new, self.out, self.cancel, self.logs):
            os.makedirs(d, exist_ok=True)
        self.reaper = Reaper()
        self.running: dict[str, int] = {}  # request id -> pid
        self.processes: dict[str, int] = {}  # long-lived process name -> pid
        self.lock = threading.Lock()
        self.env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "TMPDIR": "/tmp",
        }

    # -- requests -----------------------------------------------------------------
    def handle(self, rid: str, req: dict[str, object]) -> None:
        kind = req.get("kind", "run")
        if kind == "run":
            self._run(rid, req)
        elif kind == "start":
            self._start(rid, req)
        elif kind == "stop":
            threading.Thread(target=self._stop, args=(rid, req), daemon=True).start()
        elif kind == "poweroff":
            self._reply(rid, 0)
            self.poweroff()
        else:
            self._reply(rid, 127, err=f"server: unknown request kind {kind!r}\n")

    def _env(self, req: dict[str, object]) -> dict[str, str]:
        env = dict(self.env)
        extra = req.get("env")
        if isinstance(extra, dict):
            env.update({str(k): str(v) for k, v in extra.items()})
        return env

    def _argv(self, req: dict[str, object]) -> list[str]:
        argv = [str(a) for a in req.get("argv", [])]  # type: ignore[attr-defined]
        if not argv:
            raise ValueError("empty argv")
        return argv

    def _run(self, rid: str, req: dict[str, object]) -> None:
        stdin = os.path.join(self.new, rid + ".in")
        if not os.path.exists(stdin):
            stdin = "/dev/null"
        out = os.path.join(self.out, rid + ".out")
        err = os.path.join(self.out, rid + ".err")
        trunc = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

        def done(code: int) -> None:
            with self.lock:
                self.running.pop(rid, None)
            with contextlib.suppress(FileNotFoundError):
                if stdin != "/dev/null":
                    os.unlink(stdin)
            _write_atomic(os.path.join(self.out, rid + ".rc"), str(code))

        try:
            argv = self._argv(req)
            with self.lock:
                pid = self.reaper.spawn(
                    argv, self._env(req), [(0, stdin, os.O_RDONLY), (1, out, trunc), (2, err, trunc)],
                    done,
                )
                self.running[rid] = pid
        except (OSError, ValueError) as exc:
            # Like a shell: 127 when the program cannot be started.
            self._reply(rid, 127, err=f"server: cannot start {req.get('argv')!r}: {exc}\n")

    def _start(self, rid: str, req: dict[str, object]) -> None:
        name = str(req.get("name", ""))
        if not name or "/" in name:
            self._reply(rid, 2, err=f"server: bad process name {name!r}\n")
            return
        with self.lock:
            pid = self.processes.get(name)
        if pid is not None:
            self._reply(rid, 17, err=f"server: process {name!r} already runs as pid {pid}\n")
            return
        log = str(req.get("log") or os.path.join(self.logs, name + ".log"))
        status_file = os.path.join(self.logs, name + ".exit")
        pid_file = os.path.join(self.logs, name + ".pid")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_file)
        append = os.O_WRONLY | os.O_CREAT | os.O_APPEND

        def done(code: int) -> None:
            with self.lock:
                if self.processes.get(name) == pid_box[0]:
                    del self.processes[name]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pid_file)
            _write_atomic(status_file, str(code))

        pid_box = [0]
        try:
            argv = self._argv(req)
            with self.lock:
                pid_box[0] = self.reaper.spawn(
                    argv, self._env(req),
                    [(0, "/dev/null", os.O_RDONLY), (1, log, append), (2, log, append)], done,
                )
                self.processes[name] = pid_box[0]
                # Lets any host process tell that it runs (the host reads the folder).
                _write_atomic(pid_file, f"{pid_box[0]}\n")
        except (OSError, ValueError) as exc:
            self._reply(rid, 127, err=f"server: cannot start {name!r}: {exc}\n")
            return
        self._reply(rid, 0, out=f"{pid_box[0]}\n")

    def _stop(self, rid: str, req: dict[str, object]) -> None:
        name = str(req.get("name", ""))
        with self.lock:
            pid = self.processes.get(name)
        if pid is None:
            self._reply(rid, 0, out="not running\n")
            return
        grace = float(req.get("grace", STOP_GRACE_SECONDS))  # type: ignore[arg-type]
        sig = int(req.get("signal", signal.SIGTERM))  # type: ignore[call-overload]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self.lock:
                if self.processes.get(name) != pid:
                    break
            time.sleep(0.01)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        # Wait for the reaper so that the .exit file exists when we answer.
        while True:
            with self.lock:
                if self.processes.get(name) != pid:
                    break
            time.sleep(0.01)
        self._reply(rid, 0, out="stopped\n")

    def _reply(self, rid: str, code: int, out: str = "", err: str = "") -> None:
        with open(os.path.join(self.out, rid + ".out"), "w") as f:
            f.write(out)
        with open(os.path.join(self.out, rid + ".err"), "w") as f:
            f.write(err)
        _write_atomic(os.path.join(self.out, rid + ".rc"), str(code))

    def _cancel(self, rid: str) -> None:
        with self.lock:
            pid = self.running.get(rid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def poweroff(self) -> None:
        with self.lock:
            pids = list(self.processes.values())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        os.sync()
        # poweroff -f calls reboot(2) directly: nothing else to stop in the guest.
        os.execv("/bin/busybox", ["busybox", "poweroff", "-f"])

    # -- main loop ----------------------------------------------------------------
    def serve(self) -> None:
        _write_atomic(os.path.join(self.spool, "ready"), f"{os.getpid()}\n")
        print("server: ready", flush=True)
        idle_since = time.monotonic()
        while True:
            busy = False
            for entry in os.listdir(self.new):
                if not entry.endswith(".json"):
                    continue
                rid = entry[:-5]
                path = os.path.join(self.new, entry)
                try:
                    with open(path) as f:
                        req = json.load(f)
                    os.unlink(path)
                except (OSError, ValueError) as exc:
                    self._reply(rid, 126, err=f"server: unreadable request: {exc}\n")
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    continue
                busy = True
                self.handle(rid, req)
            for rid in os.listdir(self.cancel):
                self._cancel(rid)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.cancel, rid))
            now = time.monotonic()
            if busy:
                idle_since = now
            # Poll fast while commands arrive, slower after a second of quiet.
            time.sleep(POLL_SECONDS if now - idle_since < 1.0 else IDLE_POLL_SECONDS)


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: server.py STATE_DIR", file=sys.stderr)
        sys.exit(2)
    Server(sys.argv[1]).serve()


if __name__ == "__main__":
    main()
