"""Test traffic from a node's client namespace, for e2e tests, benchmarks and the demo.

``request(1, "10.244.2.3", 80)`` runs ``probe.py`` inside ``svcp-node-1-client``
(made on first use) and returns the answer, e.g. ``"web-5d9c-abcde 10.244.1.254:40312\\n"``;
:func:`answered_by` takes the Pod name out of it. Traffic never starts in the
root namespace (network safety rule).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from svcproxy_lab import network


class TrafficError(RuntimeError):
    """The request got no answer; the message has the client's error."""


def _index(node: str | int) -> int:
    return node if isinstance(node, int) else int(str(node).rsplit("-", 1)[-1])


def _run_probe(node: str | int, args: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run ``probe.py ARGS`` in the client namespace behind ``node``."""
    index = _index(node)
    probe = [sys.executable, "-m", "svcproxy_lab.probe", *args]
    if Path(f"/run/netns/svcp-node-{index}").exists():  # a namespace node on this kernel
        ns = network.ensure_client_netns(index)
        return subprocess.run(network.in_netns(ns, probe), capture_output=True,
                              timeout=timeout, check=False)
    # a guest node: its client namespace lives inside the guest
    return _guest_client(index)(probe, timeout=timeout)


def request(node: str | int, ip: str, port: int, proto: str = "tcp", *, timeout: float = 2,
            path: str = "/", method: str = "GET") -> str:
    """One request from the client namespace behind ``node`` (``"node-1"`` or ``1``)."""
    proc = _run_probe(node, ["--proto", proto, "--timeout", str(timeout), "--path", path,
                             "--method", method, ip, str(port)], timeout + 20)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise TrafficError(err or f"probe exited {proc.returncode}")
    return proc.stdout.decode(errors="replace")


def burst(node: str | int, ip: str, port: int, count: int, proto: str = "tcp", *,
          timeout: float = 2) -> tuple[list[str | None], list[str]]:
    """``count`` requests, one after another, each on a new connection, from one client
    process behind ``node``: the answering Pod of each (None where it failed), and the
    first errors."""
    proc = _run_probe(node, ["--proto", proto, "--timeout", str(timeout), "--count", str(count),
                             ip, str(port)], count * (timeout + 1) + 30)
    if proc.returncode != 0:
        raise TrafficError(proc.stderr.decode(errors="replace").strip()
                           or f"probe exited {proc.returncode}")
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return list(out["answers"]), list(out["errors"])


def burst_from(node: str | int, ip: str, port: int, count: int, *, sources: list[str],
               proto: str = "tcp", timeout: float = 2
               ) -> tuple[dict[str, list[str | None]], list[str]]:
    """``count`` requests from each of ``sources`` (addresses of the client namespace behind
    ``node``, see ``network.client_addresses``) in turn, from one client process: the
    answering Pod of each request per source (None where it failed), and the first errors."""
    args = ["--proto", proto, "--timeout", str(timeout), "--count", str(count)]
    for source in sources:
        args += ["--source", source]
    proc = _run_probe(node, [*args, ip, str(port)],
                      len(sources) * count * (timeout + 1) + 30)
    if proc.returncode != 0:
        raise TrafficError(proc.stderr.decode(errors="replace").strip()
                           or f"probe exited {proc.returncode}")
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return {s: list(a) for s, a in out["sources"].items()}, list(out["errors"])


RunClient = Callable[..., "subprocess.CompletedProcess[bytes]"]


def _guest_client(index: int) -> RunClient:
    """``run_client`` of node ``index`` of the running lab (named by the owner file)."""
    from svcproxy_lab.cluster import OWNER_FILE, Lab

    try:
        lab = Lab(Path(OWNER_FILE.read_text().strip()))
    except OSError:
        raise TrafficError("no lab is running: run `svcproxy lab up` first") from None
    state = lab.load()
    nodes = {n.index: n for n in lab.nodes(state)} if state else {}
    run_client = getattr(nodes.get(index), "run_client", None)
    if not callable(run_client):
        raise TrafficError(f"the running lab has no node {index} with a client namespace")
    fn: RunClient = run_client
    return fn


def answered_by(answer: str) -> str:
    """The Pod name in an echo answer (its first word; for HTTP after the status)."""
    words = answer.split()
    return words[1] if words and words[0].isdigit() else words[0]


def set_ready(node: str | int, pod_ip: str, port: int, ready: bool) -> None:
    """Make an echo Pod fail (or pass) its /healthz readiness endpoint from now on."""
    value = "true" if ready else "false"
    answer = request(node, pod_ip, port, proto="http", method="POST",
                     path=f"/admin/ready?value={value}")
    if not answer.startswith("200"):
        raise TrafficError(f"echo at {pod_ip}:{port} refused the readiness switch: {answer}")
