"""Fixtures of the end-to-end suite: a lab (or any cluster) and helpers to drive it.

The session fixture ``lab`` brings up ``svcproxy lab up --nodes 3 --no-svcproxy``
in a state folder under /tmp (``SVCPROXY_E2E_STATE_DIR`` overrides it) and takes
it down at the end; a lab already running there is reused and left running.
With ``SVCPROXY_E2E_KUBECONFIG`` set it starts nothing and runs against that
cluster instead; tests that need the lab's own machinery
(client namespaces, the lab's processes) skip there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from waiting import wait_until

from svcproxy_lab import controlplane, traffic
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import API_PORT

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_STATE = Path("/tmp/svcproxy-e2e-lab")




@dataclass
class Lab:
    """What tests get: the cluster, kubectl, and (on a local lab) traffic from client netns."""

    kubeconfig: Path
    kubectl_bin: str
    state_dir: Path | None  # None: an existing cluster named by SVCPROXY_E2E_KUBECONFIG
    nodes: list[str] = field(default_factory=list)
    owned: bool = False  # this session started the lab (so it may take it down)

    @property
    def traffic(self) -> ModuleType:
        """``svcproxy_lab.traffic``: request(), answered_by(), set_ready() (lab only)."""
        self.require_local()
        return traffic

    @property
    def local(self) -> bool:
        return self.state_dir is not None

    @staticmethod
    def wait_until(what: str, check: Callable[[], T | None], timeout: float = 60) -> T:
        return wait_until(what, check, timeout)

    def require_local(self) -> None:
        if not self.local:
            pytest.skip("needs the svcproxy lab itself, not an existing cluster")

    def require_owned(self) -> None:
        """Skip tests that stop or kill the lab when another session started it and uses it."""
        self.require_local()
        if not self.owned:
            pytest.skip("the lab was already running (another session may use it); "
                        "not stopping it")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=120, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: dict[str, Any] | list[dict[str, Any]], namespace: str) -> None:
        items = manifest if isinstance(manifest, list) else [manifest]
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        self.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    def request(self, node: str | int, ip: str, port: int, proto: str = "tcp",
                timeout: float = 2) -> str:
        """One request from the client namespace behind ``node`` (lab only)."""
        self.require_local()
        return traffic.request(node, ip, port, proto, timeout=timeout)

    def set_ready(self, node: str | int, pod_ip: str, port: int, ready: bool) -> None:
        self.require_local()
        traffic.set_ready(node, pod_ip, port, ready)

    def up(self, *, svcproxy: bool = False, kube_proxy: str | None = None) -> None:
        """``svcproxy lab up`` (idempotent). ``svcproxy=True`` adds CRDs, operator and agents;
        ``kube_proxy="iptables"`` etc. the real kube-proxy on every node."""
        assert self.state_dir is not None
        argv = svcproxy_cli("lab", "up", "--nodes", "3", "--state-dir", str(self.state_dir))
        if not svcproxy:
            argv.append("--no-svcproxy")
        if kube_proxy:
            argv += ["--kube-proxy", kube_proxy]
        subprocess.run(argv, check=True, stdout=subprocess.PIPE, timeout=3600)

    def down(self) -> None:
        assert self.state_dir is not None
        subprocess.run(svcproxy_cli("lab", "down", "--state-dir", str(self.state_dir)),
                       check=True, timeout=300)

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.kubectl_json(
            "get", "pods", "-n", namespace, "-l", selector)["items"]
        return items

    def endpoint_addresses(self, namespace: str, service: str,
                           ready: bool | None = True) -> set[str]:
        """Addresses in the Service's EndpointSlices (only ready ones, unless ready=None)."""
        slices = self.kubectl_json("get", "endpointslices", "-n", namespace, "-l",
                                   f"kubernetes.io/service-name={service}")["items"]
        found: set[str] = set()
        for s in slices:
            for ep in s.get("endpoints") or []:
                if ready is None or bool(ep.get("conditions", {}).get("ready")) == ready:
                    found.update(ep["addresses"])
        return found


def svcproxy_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "svcproxy.cli", *args]


def _kubectl_bin() -> str:
    try:
        out = subprocess.run(["bash", str(REPO / "lab/svcproxy_lab/toolchain/build.sh")],
                             capture_output=True, text=True, check=True, timeout=7200).stdout
        return str(Path(out.strip().splitlines()[-1]) / "kubectl")
    except (subprocess.CalledProcessError, OSError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.skip("no kubectl: neither the lab toolchain nor one on PATH")
        return found


# The session's lab once the ``lab`` fixture made it, for ``lab_slot``.
_SESSION: dict[str, Lab] = {}


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    external = os.environ.get("SVCPROXY_E2E_KUBECONFIG")
    if external:
        handle = Lab(Path(external), shutil.which("kubectl") or _kubectl_bin(), None)
        nodes = handle.kubectl_json("get", "nodes")["items"]
        handle.nodes = [n["metadata"]["name"] for n in nodes]
        yield handle
        return
    if os.geteuid() != 0:
        pytest.skip("the lab needs root (network namespaces); run the e2e suite as root")
    state = Path(os.environ.get("SVCPROXY_E2E_STATE_DIR", DEFAULT_STATE))
    handle = Lab(state / "pki" / "admin.kubeconfig", _kubectl_bin(), state)
    # A lab already running there (another session, SVCPROXY_E2E_KEEP_LAB) is reused
    # and left running: whoever started it takes it down.
    started = not LabCluster(state).alive()
    try:
        # Inside the try: a `lab up` killed by its timeout cannot undo what it started.
        handle.up()
        handle.owned = started
        handle.nodes = ["node-1", "node-2", "node-3"]
        _SESSION["lab"] = handle
        yield handle
    finally:
        _SESSION.pop("lab", None)
        if started and not os.environ.get("SVCPROXY_E2E_KEEP_LAB"):
            handle.down()


@pytest.fixture(scope="module")
def lab_slot() -> Iterator[None]:
    """For a module that runs a lab of its own (other nodes, its own state folder).

    The machine holds one lab at a time (fixed addresses), so the session's lab, if
    this session started it, steps aside (``down``) for the module and comes back
    (``up``) after it. Use it as ``def my_lab(lab_slot: None) -> ...``.
    """
    handle = _SESSION.get("lab")
    if handle is None or handle.state_dir is None or not LabCluster(handle.state_dir).alive():
        yield
        return
    if not handle.owned:
        pytest.skip(f"the lab in {handle.state_dir} belongs to another session; "
                    "this module needs the machine's one lab slot")
    handle.down()
    try:
        yield
    finally:
        handle.up()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a test of the session's lab at once, saying why, when that lab is not running.

    A module with a lab of its own that could not hand the slot back (``lab_slot``) leaves
    the session's lab down, and the tests after it (and their module fixtures, such as a
    helm release) would talk to whatever holds port 6443 with the wrong certificates
    ("x509: certificate signed by unknown authority"), far from the cause. This hook runs
    before the item's fixtures are set up.
    """
    names = getattr(item, "fixturenames", ())
    if "lab" not in names or "lab_slot" in names:
        return
    handle = _SESSION.get("lab")
    if handle is None or handle.state_dir is None or LabCluster(handle.state_dir).alive():
        return
    holder = ("free" if controlplane.port_free(API_PORT)
              else f"taken by {controlplane.port_holder(API_PORT, handle.state_dir)}")
    pytest.fail(f"the session's lab in {handle.state_dir} is not running (a module before this "
                f"one may have failed to hand the lab slot back; see its errors); "
                f"port {API_PORT} is {holder}", pytrace=False)


@pytest.fixture
def namespace(lab: Lab) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it to go)."""
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    lab.kubectl("create", "namespace", name)
    wait_until(f"the default ServiceAccount in {name}",
               lambda: lab.kubectl("get", "serviceaccount", "default", "-n", name, check=False))
    yield name
    lab.kubectl("delete", "namespace", name, "--wait=false", check=False)
