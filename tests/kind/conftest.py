"""Fixtures of the kind suite: the chart's own Pods on real kubelets, traffic from Pods.

The session fixture ``kind`` runs ``hack/kind.sh up`` (images built here, the 3-node
cluster created or reused, the chart installed with ``--wait``) and hands tests a small
kubectl wrapper. Nothing here starts an operator or agent process: every svcproxy
component under test is a container from hack/images.sh. The machine's state before the
cluster existed (Docker running and the images built) is recorded, so the teardown test
can check that ``kind.sh down`` restores it.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kindlib import REPO, Kind, kind_running, machine_state


def _toolchain_path() -> str:
    out = subprocess.run(["bash", str(REPO / "lab/svcproxy_lab/toolchain/build.sh")],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def kind() -> Iterator[Kind]:
    os.environ["PATH"] = f"{_toolchain_path()}:{os.environ['PATH']}"
    subprocess.run(["bash", str(REPO / "hack/docker.sh")], check=True)
    before = None
    if not kind_running():
        # The images first (kind.sh up builds them too; warm that takes seconds): on a
        # fresh machine the first `docker build` puts a container on docker0, which then
        # gets its IPv6 link-local routes. They are Docker's, there as long as dockerd
        # runs, not something of kind.sh's that down should remove.
        subprocess.run(["bash", str(REPO / "hack/images.sh")], check=True,
                       stdout=subprocess.DEVNULL)
        before = machine_state()
    proc = subprocess.run(["bash", str(REPO / "hack/kind.sh"), "up"], stdout=subprocess.PIPE,
                          text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"hack/kind.sh up failed (exit {proc.returncode}); its log is above")
    yield Kind(Path(proc.stdout.strip().splitlines()[-1]), before)


@pytest.fixture
def namespace(kind: Kind) -> Iterator[str]:
    """A namespace of the test's own, deleted (without waiting) afterwards."""
    name = f"kt-{uuid.uuid4().hex[:6]}"
    kind.kubectl("create", "namespace", name)
    yield name
    kind.kubectl("delete", "namespace", name, "--wait=false", check=False)
