"""The soak's traffic client: new TCP connections at a fixed rate, every request recorded.

Run by ``soak.py`` inside the client network namespace behind one node (on the host
for a netns node, inside the guest for a UML node; never in the root namespace) as
``python soak_client.py '<json>'`` with ``node``, ``targets`` (``[{"svc", "ip",
"port"}]``), ``rate`` (new connections per second over all targets, in turn), ``timeout``,
``out`` (a JSON-lines file in the lab folder, which guests see at the same path) and
``stop`` (a file whose appearance ends the run; ``max_seconds`` ends it anyway). Open
loop: request *i* starts at *i / rate* whether or not earlier ones have answered (a pool
of threads), so an outage costs its requests instead of delaying the rest. Each request
is one line: start time, Service, ok, milliseconds, lateness, and for a failure the
error; the last line is ``{"done": ...}``. Standard library only: the guest runs it with the host's Python.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

WORKERS = 32  # enough for rate x timeout requests in flight during an outage


def ask(ip: str, port: int, timeout: float, stage: list[str]) -> str:
    """One request on a new connection: the echo server's answer line (the Pod's name).
    ``stage`` says how far it got: connect (no connection) or answer (no answer)."""
    stage[0] = "connect"
    with socket.create_connection((ip, port), timeout=timeout) as sock:
        stage[0] = "answer"
        sock.settimeout(timeout)
        sock.sendall(b"hello\n")  # anything but HTTP gets the echo line, then EOF
        data = b""
        while True:
            chunk = sock.recv(65535)
            if not chunk:
                break
            data += chunk
    answer = data.decode(errors="replace").strip()
    if not answer:
        raise OSError("empty answer (the connection closed before the echo line)")
    return answer


class Recorder:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the whole run
        self.lock = threading.Lock()
        self.sent = self.failed = 0

    def write(self, row: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(row, separators=(",", ":")) + "\n")
            self.sent += 1
            self.failed += 0 if row["ok"] else 1


def one(rec: Recorder, target: dict[str, Any], timeout: float, due: float) -> None:
    start = time.time()
    row: dict[str, Any] = {"t": round(start, 4), "svc": target["svc"], "ok": True,
                           "late_ms": round((start - due) * 1000, 1)}
    stage = ["connect"]
    try:
        ask(target["ip"], int(target["port"]), timeout, stage)
    except OSError as err:
        row.update(ok=False, err=f"{stage[0]}: {type(err).__name__}: {err}")
    row["ms"] = round((time.time() - start) * 1000, 2)
    rec.write(row)


def main(args: dict[str, Any]) -> int:
    rec = Recorder(args["out"])
    targets = args["targets"]
    gap = 1.0 / float(args["rate"])
    begin = time.time()
    end = begin + float(args["max_seconds"])
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        i = 0
        while not os.path.exists(args["stop"]) and time.time() < end:
            due = begin + i * gap
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, rec, targets[i % len(targets)], float(args["timeout"]), due)
            i += 1
    with rec.lock:
        rec.file.write(json.dumps({"done": True, "node": args["node"], "sent": rec.sent,
                                   "failed": rec.failed, "end": round(time.time(), 4)}) + "\n")
        rec.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
