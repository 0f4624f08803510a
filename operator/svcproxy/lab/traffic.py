"""Test traffic from a node's client namespace, for e2e tests, benchmarks and the demo.

``request(1, "10.244.2.3", 80)`` runs ``probe.py`` inside ``svcp-node-1-client``
(made on first use) and returns the answer, e.g. ``"web-5d9c-abcde 10.244.1.254:40312\\n"``;
:func:`answered_by` takes the Pod name out of it. Traffic never starts in the
root namespace (network safety rule).
"""

from __future__ import annotations

import subprocess
import sys

from svcproxy.lab import network


class TrafficError(RuntimeError):
    """The request got no answer; the message has the client's error."""


def _index(node: str | int) -> int:
    return node if isinstance(node, int) else int(str(node).rsplit("-", 1)[-1])


def request(node: str | int, ip: str, port: int, proto: str = "tcp", *, timeout: float = 2,
            path: str = "/", method: str = "GET") -> str:
    """One request from the client namespace behind ``node`` (``"node-1"`` or ``1``)."""
    ns = network.ensure_client_netns(_index(node))
    argv = [*network.in_netns(ns, [sys.executable, "-m", "svcproxy.lab.probe",
                                   "--proto", proto, "--timeout", str(timeout),
                                   "--path", path, "--method", method, ip, str(port)])]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 20, check=False)
    if proc.returncode != 0:
        raise TrafficError(proc.stderr.strip() or f"probe exited {proc.returncode}")
    return proc.stdout


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
