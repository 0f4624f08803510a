"""The host side of the IPVS readers: one ``ipvs_watch.py`` per UML lab node, and their clocks.

Used by ``programming_latency.py --dataplane ipvs``. :class:`IpvsWatchers` is a
``harness.KernelWatchers`` (same ``watch`` / ``when`` / ``count`` / ``wait_programmed``) whose
readers run inside the user-mode-linux guests of a lab started with ``--ipvs-nodes``: each is
started through the guest's command server (``UmlNode.start_process``), reads commands from
``<state>/bench-ipvs-watch/<node>/cmd/`` (written here: tmp file + rename) and writes JSON
lines to ``<state>/logs/<node>-ipvs-watch.log``, which a thread here tails.

The readers stamp what they see with the guest's wall clock. Before the churn (and after it)
:meth:`IpvsWatchers.calibrate` relates each guest's clock to the host's with pings through
that same channel: the host notes its time t1, drops a ping, the guest answers with its time
tg, the host notes when the answer arrives (t2); offset = tg - (t1 + t2) / 2, known to within
+-(t2 - t1) / 2, taken from the ping with the shortest round trip. The JSON reports the
offsets, the round trips and each reader's own poll interval and cost (its resolution);
``correct_clock`` subtracts the offset from the guest stamps.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._lab import harness
from benchmarks._lab.harness import BenchLab, KernelWatchers, say
from svcproxy_lab.stats import summary

IPVS_READER = Path(__file__).resolve().parent / "ipvs_watch.py"
PROCESS = "ipvs-watch"
TAIL_POLL = 0.001


class IpvsWatchers(KernelWatchers):
    """One polling IPVS reader per UML node of ``bench``'s lab."""

    def __init__(self, bench: BenchLab, interval: float = 0.005, correct_clock: bool = False) -> None:
        super().__init__(bench.node_names)
        state = bench.lab.load()
        if state is None:
            raise RuntimeError("the lab is not up: call BenchLab.up() first")
        self.lab_nodes = {n.name: n for n in bench.lab.nodes(state)}
        missing = [name for name, n in self.lab_nodes.items() if not n.has_ipvs]
        if missing:
            raise SystemExit(f"nodes {missing} have no IPVS: bring the lab up with --ipvs-nodes 3")
        self.state_dir = bench.lab.state_dir
        self.root = self.state_dir / "bench-ipvs-watch"
        self.interval = interval
        self.correct_clock = correct_clock
        self.offsets: dict[str, float] = {}
        self.replies: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.arrival: dict[str, list[float]] = {n: [] for n in self.nodes}
        self._seq = 0
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def log_path(self, node: str) -> Path:
        return self.state_dir / "logs" / f"{node}-{PROCESS}.log"

    def __enter__(self) -> IpvsWatchers:
        for name, node in self.lab_nodes.items():
            folder = self.root / name
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "cmd").mkdir(parents=True)
            self.log_path(name).unlink(missing_ok=True)
            # The venv's interpreter (the guest's root is the host's); -I -S: stdlib only.
            node.start_process(PROCESS, [sys.executable, "-I", "-S", "-u", str(IPVS_READER),
                                         "--dir", str(folder), "--interval", str(self.interval)])
            thread = threading.Thread(target=self._tail, args=(name,), daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._wait(lambda: self.ready == set(self.nodes), 60, "IPVS readers to start"):
            raise RuntimeError(f"IPVS readers did not start; see {self.log_path('node-1').parent}")
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.lab_nodes.values():
            try:
                node.stop_process(PROCESS)
            except Exception as err:  # a dead guest must not hide the benchmark's own error
                say(f"stopping the IPVS reader on {node.name}: {err}")
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    # --- the channel ------------------------------------------------------------------

    def _tail(self, node: str) -> None:
        path = self.log_path(node)
        while not path.exists() and not self._stop.is_set():
            time.sleep(0.01)
        with path.open() as f:
            partial = ""
            while not self._stop.is_set():
                chunk = f.readline()
                if not chunk:
                    time.sleep(TAIL_POLL)
                    continue
                partial += chunk
                if not partial.endswith("\n"):
                    continue
                line, partial = partial.strip(), ""
                seen_at = time.time()
                if not line.startswith("{"):  # the command server's header, or a traceback
                    if not line.startswith("---"):
                        with self.cond:
                            self.errors.append(f"{node}: {line}")
                        say(f"IPVS reader on {node}: {line}")
                    continue
                ev = json.loads(line)
                ev["host_t"] = seen_at
                self._handle(node, ev)

    def _handle(self, node: str, ev: dict[str, Any]) -> None:
        kind = ev["ev"]
        if kind in ("pong", "stats"):
            with self.cond:
                self.replies[(node, kind, ev["id"])] = ev
                self.cond.notify_all()
            return
        if kind == "state":
            # How long a guest's answer takes to reach the host (not part of the figures).
            self.arrival[node].append(ev["host_t"] - ev["t"])
            if self.correct_clock:
                ev["t"] -= self.offsets.get(node, 0.0)
        super()._handle(node, ev)

    def _send(self, cmd: dict[str, Any]) -> None:
        with self._send_lock:
            self._seq += 1
            for node in self.nodes:
                folder = self.root / node / "cmd"
                tmp = folder / f"{self._seq:09d}.tmp"
                tmp.write_text(json.dumps(cmd))
                os.rename(tmp, folder / f"{self._seq:09d}.json")

    def _ask(self, kind: str, reply: str, timeout: float = 30,
             **extra: Any) -> tuple[float, dict[str, dict[str, Any]]]:
        self._count_id += 1
        rid = self._count_id
        sent = time.time()
        self._send({"op": kind, "id": rid, **extra})
        self._wait(lambda: all((n, reply, rid) in self.replies for n in self.nodes), timeout,
                   f"{kind} answers")
        with self.cond:
            return sent, {n: self.replies.pop((n, reply, rid)) for n in self.nodes
                          if (n, reply, rid) in self.replies}

    # --- clocks and resolution ----------------------------------------------------------

    def calibrate(self, rounds: int = 30) -> dict[str, dict[str, float]]:
        """Each guest's clock offset from the host's (ms), from the shortest of ``rounds`` pings."""
        samples: dict[str, list[tuple[float, float]]] = {n: [] for n in self.nodes}
        for _ in range(rounds):
            sent, answers = self._ask("ping", "pong")
            for node, ev in answers.items():
                rtt = ev["host_t"] - sent
                samples[node].append((rtt, ev["t"] - (sent + ev["host_t"]) / 2))
            time.sleep(0.02)
        out: dict[str, dict[str, float]] = {}
        for node, pairs in samples.items():
            if not pairs:
                continue
            best_rtt, offset = min(pairs)
            rtts = sorted(r for r, _ in pairs)
            offsets = [o for _, o in pairs]
            out[node] = {"offset_ms": round(offset * 1e3, 2), "uncertainty_ms": round(best_rtt / 2 * 1e3, 2),
                         "rtt_min_ms": round(best_rtt * 1e3, 2),
                         "rtt_p50_ms": round(rtts[len(rtts) // 2] * 1e3, 2),
                         "offset_spread_ms": round((max(offsets) - min(offsets)) * 1e3, 2)}
            self.offsets[node] = offset
        return out

    def reader_stats(self, reset: bool = True) -> dict[str, Any]:
        """Each reader's poll interval and cost, its CPU share in the guest and how long its
        answers took to reach the host, since the last reset (one system's churn)."""
        _, answers = self._ask("stats", "stats", reset=reset)
        out: dict[str, Any] = {}
        for node, answer in answers.items():
            ev = {k: v for k, v in answer.items() if k not in ("ev", "id", "host_t")}
            with self.cond:
                ev["host_arrival_delay_s"] = summary(self.arrival[node])
                if reset:
                    self.arrival[node] = []
            out[node] = ev
        return out


# --- processes in the guests -----------------------------------------------------------------


def _run_in(bench: BenchLab, node: str, argv: list[str]) -> str | None:
    state = bench.lab.load()
    if state is None:
        return None
    lab_node = {n.name: n for n in bench.lab.nodes(state)}[node]
    proc = lab_node.run(argv, timeout=30)
    return proc.stdout.decode(errors="replace") if proc.returncode == 0 else None


def sample_guest(bench: BenchLab, node: str, name: str) -> dict[str, float] | None:
    """RSS and CPU seconds of process ``name`` (as started by the lab) inside ``node``'s guest."""
    pid_file = bench.lab.state_dir / "uml" / node / "logs" / f"{name}.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    text = _run_in(bench, node, ["sh", "-c", f"cat /proc/{pid}/status; echo @@@; cat /proc/{pid}/stat"])
    if text is None or "@@@" not in text:
        return None
    status, stat = text.split("@@@", 1)
    return harness.parse_sample(status, stat.strip())


def scrape_guest_histograms(bench: BenchLab, node: str, port: int, name: str) -> harness.Histograms:
    """``harness.scrape_histograms`` for a UML node: the request runs inside the guest."""
    text = _run_in(bench, node, [sys.executable, "-I", "-S", "-c", harness.fetch_metrics_code(port)])
    return harness.parse_histograms(text, name) if text else {}
