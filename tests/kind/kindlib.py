"""What the kind suite's tests share: the cluster handle and the machine's state.

``Kind`` wraps kubectl against the cluster ``hack/kind.sh up`` made; ``machine_state``
lists what ``kind.sh`` may change on this machine, so the teardown test can compare.
(A module of its own: tests/e2e has a ``conftest`` module its tests import by name.)
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"


def machine_state() -> dict[str, list[str]]:
    """What kind.sh may change on this machine: links, netns, routes, rules, containers."""

    def lines(*cmd: str) -> list[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        return sorted(line for line in out.splitlines() if line.strip())

    return {
        "links": [line.split(":")[1].split("@")[0].strip() for line in lines("ip", "-o", "link")],
        "netns": lines("ip", "netns", "list"),
        "routes": lines("ip", "route", "show", "table", "all"),
        "nft": [line for line in lines("nft", "list", "ruleset") if "handle" not in line],
        "containers": lines("docker", "ps", "-a", "--format", "{{.Names}}"),
        "volumes": lines("docker", "volume", "ls", "-q"),
        "networks": lines("docker", "network", "ls", "--format", "{{.Name}}"),
    }


def kind_running() -> bool:
    out = subprocess.run(["docker", "ps", "--format", "{{.Names}}"], capture_output=True,
                         text=True, check=False).stdout
    return "svcproxy-control-plane" in out.split()


@dataclass
class Kind:
    """The cluster as tests see it: kubectl, applying manifests, commands in a client Pod."""

    kubeconfig: Path
    before: dict[str, list[str]] | None  # machine state before this session made the cluster

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> str:
        proc = subprocess.run(["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, docs: list[dict[str, Any]], namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-",
                     input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))

    def exec(self, namespace: str, pod: str, *cmd: str, timeout: float = 120) -> str:
        return self.kubectl("exec", "-n", namespace, pod, "--", *cmd, timeout=timeout)

    @staticmethod
    def wait(what: str, check: Callable[[], T | None], timeout: float = 120) -> T:
        deadline = time.monotonic() + timeout
        last: T | None = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except AssertionError as err:  # kubectl failing while things settle
                last = None
                error = str(err)
            else:
                error = ""
            if last:
                return last
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} ({last!r} {error})")


