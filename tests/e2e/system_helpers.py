"""The whole-system lab for ``test_system*.py`` and ``test_drill*.py``, and its helpers.

Called by those modules' fixtures. ``system_lab()`` brings up the machine's one
lab as 3 nodes (node-1 a netns node without IPVS, node-2 and node-3 UML guests
with a real IPVS kernel) with the operator and the agents the lab starts
itself, in its own state folder, and takes it down afterwards. ``SystemLab``
drives it: kubectl, ServiceProxyPolicies applied and waited on for *this*
generation, ProxyNode reports, and real client traffic from the client
namespaces behind the nodes, sent in batches (one client process per node per
batch) or as steady background traffic that counts every request.

Traffic never starts in the root namespace: every client runs inside
``svcp-node-i-client`` (on the host for netns nodes, inside the guest for UML
nodes), which has no default route.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from waiting import wait_until as wait_for

from svcproxy_lab import network
from svcproxy_lab.cluster import Lab as LabCluster
from svcproxy_lab.node import LabNode, read_pid, spawn, terminate

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("SVCPROXY_E2E_SYSTEM_STATE_DIR", "/tmp/svcproxy-e2e-system"))
# Source ports for batches, below the kernel's ephemeral range (32768-60999) so that no
# other client socket takes them. Each request gets one no earlier request used: IPVS
# keeps a closed connection's entry 2 min (TIME_WAIT; UDP 5 min), and a new connection
# on that 5-tuple reuses the entry instead of being scheduled. Entries made under
# persistence are never rescheduled, so a reused 5-tuple from a ClientIP case would
# reach that case's Pod in the next case (seen as 1 stray answer of 12 under sh/mh).
BATCH_PORTS = range(10000, 32768)
PY = sys.executable
NODES = ("node-1", "node-2", "node-3")
ECHO = "svcproxy.io/echo"

# One client process: sends requests one after another (a new connection or datagram
# each, so schedulers decide each one) until it sent `count`, or, with `count` 0, until
# the stop file appears (steady traffic for drills; capped by `max_seconds`). Prints one
# JSON line: sent, failed, the answering Pod of every request (or "!" for a failure),
# and the first errors.
CLIENT = r"""
import json, os, socket, struct, sys, time
a = json.loads(sys.argv[1])
sent = failed = 0
answers, errors = [], []
where = ["connect", None]
end = time.monotonic() + a["max_seconds"]
def bind(s):
    if a.get("first_port"):  # a fixed source port per request (see SystemLab.batch)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", a["first_port"] + sent - 1))
def ask():
    if a["proto"] == "udp":
        where[:] = ["udp", None]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(a["timeout"])
            bind(s)
            s.sendto(b"hello\n", (a["ip"], a["port"]))
            return s.recvfrom(65535)[0].decode()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(a["timeout"])
        where[:] = ["connect", None]
        bind(s)
        try:
            s.connect((a["ip"], a["port"]))
        finally:
            where[1] = s.getsockname()[1]  # the local port, to find the failure in a capture
        where[0] = "answer"
        if a.get("reset"):  # close with RST: IPVS keeps the entry 10 s (CLOSE), not 2 min
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"hello\n")
        data = b""
        while True:
            chunk = s.recv(65535)
            if not chunk:
                return data.decode()
            data += chunk
while True:
    if a["count"] and sent >= a["count"]:
        break
    if not a["count"] and (os.path.exists(a["stop"]) or time.monotonic() > end):
        break
    sent += 1
    try:
        words = ask().split()
        if not words:
            raise OSError("empty answer")
        answers.append(words[0])
    except OSError as err:
        failed += 1
        answers.append("!")
        if len(errors) < 50:
            now = time.time()
            stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f"{now % 1:.2f}"[1:]
            errors.append(f"{stamp} {where[0]} (local port {where[1]}) request #{sent}: "
                          f"{type(err).__name__}: {err}")
    if a["interval"]:
        time.sleep(a["interval"])
print(json.dumps({"sent": sent, "failed": failed, "answers": answers, "errors": errors}))
"""




@dataclass
class Batch:
    """What one client process saw."""

    node: str
    sent: int
    failed: int
    answers: list[str]
    errors: list[str] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(a for a in self.answers if a != "!")

    def around_failures(self) -> list[str]:
        """For each failed request, the answers just before it: with rr the Pod that
        should have answered is the one missing from the rotation."""
        return [" ".join(self.answers[max(0, i - 4):i]) + " -> !"
                for i, a in enumerate(self.answers) if a == "!"][:10]


def _cli(*args: str, timeout: float = 900, state_dir: Path = STATE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "svcproxy.cli", "lab", *args, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=timeout, check=False)


class SystemLab:
    """The running 3-node lab with svcproxy, seen by the tests."""

    def __init__(self, state_dir: Path = STATE) -> None:
        self.cluster = LabCluster(state_dir)
        state = self.cluster.load()
        assert state is not None, f"no lab state in {state_dir}"
        self.ctx = self.cluster.context(state)
        self.kubectl_bin = str(Path(state["bin_dir"]) / "kubectl")
        self.nodes: dict[str, LabNode] = {n.name: n for n in self.cluster.nodes(state)}
        self.stop_file = state_dir / "traffic.stop"
        self.port_file = state_dir / "batch-port"  # shared by the test modules on one lab

    def fresh_ports(self, count: int) -> int:
        """The first of ``count`` source ports no earlier batch on this lab used (cycling
        through BATCH_PORTS: 22k requests apart, far beyond IPVS's timeouts)."""
        try:
            first = int(self.port_file.read_text())
        except (OSError, ValueError):
            first = BATCH_PORTS.start
        if first not in BATCH_PORTS or first + count > BATCH_PORTS.stop:
            first = BATCH_PORTS.start
        self.port_file.write_text(str(first + count))
        return first

    # --- API --------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> str:
        proc = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.cluster.admin_kubeconfig),
                               *args], input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def get(self, *args: str) -> Any:
        out = self.kubectl("get", *args, "-o", "json", "--ignore-not-found", check=False)
        return json.loads(out) if out.strip() else None

    def apply(self, items: list[dict[str, Any]], namespace: str) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "items": items}
        self.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    def proxynode(self, node: str) -> dict[str, Any]:
        obj = self.get("proxynode", node)
        return dict((obj or {}).get("status") or {})

    def ready_pods(self, namespace: str, selector: str) -> dict[str, str]:
        """Ready Pods that are not terminating: name -> Pod IP."""
        # kubectl prints nothing for an empty list with --ignore-not-found (no Pods yet).
        items = (self.get("pods", "-n", namespace, "-l", selector) or {}).get("items") or []
        return {p["metadata"]["name"]: p["status"]["podIP"] for p in items
                if not p["metadata"].get("deletionTimestamp")
                and any(c["type"] == "Ready" and c["status"] == "True"
                        for c in p.get("status", {}).get("conditions") or [])}

    def wait_ready_pods(self, namespace: str, selector: str, n: int) -> dict[str, str]:
        def check() -> dict[str, str] | None:
            pods = self.ready_pods(namespace, selector)
            items = (self.get("pods", "-n", namespace, "-l", selector) or {}).get("items") or []
            return pods if len(pods) == n and len(items) == n else None
        return wait_for(f"exactly {n} Ready Pods {selector} in {namespace}", check, 120)

    def cluster_ip(self, namespace: str, service: str) -> str:
        return str(self.get("service", service, "-n", namespace)["spec"]["clusterIP"])

    # --- policies ---------------------------------------------------------------

    def apply_policy(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        """Apply (replace) the whole spec: ``kubectl apply`` drops fields left out."""
        self.apply([{"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
                     "metadata": {"name": name}, "spec": spec}], namespace)

    def policy_conditions(self, namespace: str, name: str) -> tuple[int, dict[str, Any]]:
        obj = self.get("spp", name, "-n", namespace)
        conds = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions", [])}
        return int((obj or {}).get("metadata", {}).get("generation", -1)), conds

    def wait_programmed(self, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
        """Programmed=True for the policy's current generation; returns its conditions."""
        def check() -> dict[str, Any] | None:
            obj = self.get("spp", name, "-n", namespace)
            if not obj:
                return None
            gen = obj["metadata"]["generation"]
            status = obj.get("status") or {}
            conds = {c["type"]: c for c in status.get("conditions", [])}
            prog = conds.get("Programmed")
            if (status.get("observedGeneration") == gen and prog and prog["status"] == "True"
                    and prog.get("observedGeneration") == gen):
                return conds
            return None
        return wait_for(f"policy {namespace}/{name} Programmed for its generation", check, timeout)

    def wait_applied(self, namespace: str, service: str, reals: set[str] | None = None,
                     timeout: float = 60, nodes: tuple[str, ...] = NODES) -> dict[str, Any]:
        """The Service's program (optionally with exactly ``reals`` ready real servers)
        reported at its contentHash by the agent of every node in ``nodes``; returns the
        program."""
        def check() -> dict[str, Any] | None:
            pvs = self.get("pvs", service, "-n", namespace)
            if not pvs:
                return None
            ready = {rs["address"] for vs in pvs["spec"]["virtualServers"]
                     for rs in vs["realServers"] if not rs.get("terminating")}
            if reals is not None and ready != reals:
                return None
            want = pvs["spec"]["contentHash"]
            for node in nodes:
                if self.proxynode(node).get("applied", {}).get(f"{namespace}/{service}") != want:
                    return None
            return dict(pvs)
        return wait_for(f"{namespace}/{service} applied on {', '.join(nodes)}"
                        + (f" with real servers {sorted(reals)}" if reals is not None else ""),
                        check, timeout)

    # --- traffic ----------------------------------------------------------------

    def client_argv(self, node: str, argv: list[str]) -> tuple[Callable[..., Any], list[str]]:
        lab_node = self.nodes[node]
        run_client = getattr(lab_node, "run_client", None)
        if callable(run_client):
            return run_client, argv
        ns = network.ensure_client_netns(lab_node.index)
        return _host_run, network.in_netns(ns, argv)

    def _client(self, node: str, args: dict[str, Any], timeout: float) -> Batch:
        run, argv = self.client_argv(node, [PY, "-c", CLIENT, json.dumps(args)])
        proc = run(argv, timeout=timeout)
        if proc.returncode != 0:
            raise AssertionError(f"client on {node} exited {proc.returncode}: "
                                 f"{proc.stderr.decode(errors='replace')[-2000:]}")
        out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        return Batch(node, out["sent"], out["failed"], out["answers"], out["errors"])

    def batch(self, ip: str, port: int, count: int, *, proto: str = "tcp",
              nodes: tuple[str, ...] = NODES, timeout: float = 2, interval: float = 0,
              reset: bool = False) -> dict[str, Batch]:
        """``count`` sequential requests from every node's client namespace, in parallel,
        ``interval`` seconds apart, each from a fresh source port; ``reset``: close each
        TCP connection with a RST."""
        args = {"ip": ip, "port": port, "proto": proto, "count": count, "stop": "",
                "max_seconds": 0, "interval": interval, "timeout": timeout, "reset": reset,
                "first_port": self.fresh_ports(count)}
        results: dict[str, Batch] = {}
        errors: list[BaseException] = []

        def one(node: str) -> None:
            try:
                results[node] = self._client(node, args,
                                             timeout=count * (timeout + interval + 1) + 60)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    @contextmanager
    def steady_traffic(self, ip: str, port: int, *, proto: str = "tcp",
                       nodes: tuple[str, ...] = NODES, interval: float = 0.05,
                       max_seconds: float = 300) -> Iterator[dict[str, Batch]]:
        """Steady traffic from every node while the block runs; the dict is filled after it."""
        self.stop_file.unlink(missing_ok=True)
        args = {"ip": ip, "port": port, "proto": proto, "count": 0, "stop": str(self.stop_file),
                "max_seconds": max_seconds, "interval": interval, "timeout": 3}
        results: dict[str, Batch] = {}
        errors: list[BaseException] = []

        def one(node: str) -> None:
            try:
                results[node] = self._client(node, args, timeout=max_seconds + 120)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        # Let every client get going before the drill starts (UML Python takes ~1 s).
        time.sleep(3)
        try:
            yield results
        finally:
            self.stop_file.touch()
            for t in threads:
                t.join()
            self.stop_file.unlink(missing_ok=True)
        if errors:
            raise errors[0]

    # --- processes ----------------------------------------------------------------

    def agent_argv(self, node: str) -> list[str]:
        return [PY, "-m", "svcproxy.cli", "agent", "--kubeconfig",
                str(self.ctx.kubeconfig("admin-node")), "--node-name", node]

    @property
    def operator_pid_file(self) -> Path:
        return self.ctx.pid_dir / "operator.pid"

    def operator_pid(self) -> int | None:
        return read_pid(self.operator_pid_file)

    def start_operator(self, name: str = "operator", *extra: str) -> None:
        kubeconfig = str(self.cluster.admin_kubeconfig)
        spawn([PY, "-m", "svcproxy.cli", "operator", "--kubeconfig", kubeconfig, *extra],
              self.ctx.log_dir / f"{name}.log", self.ctx.pid_dir / f"{name}.pid",
              env=dict(os.environ, KUBECONFIG=kubeconfig))

    def kill_operator(self, name: str = "operator") -> None:
        terminate(self.ctx.pid_dir / f"{name}.pid", signal.SIGKILL)

    def ipvs_table(self, node: str) -> str:
        proc = self.nodes[node].run(["ipvsadm", "-Sn"])
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    def nat_rules(self, node: str) -> str:
        """The node's nat table (both x_tables and nft flavours: UML guests use legacy)."""
        out = []
        for tool in ("iptables-save", "iptables-legacy-save"):
            proc = self.nodes[node].run([tool, "-t", "nat"])
            out.append(proc.stdout.decode() if proc.returncode == 0 else "")
        return "\n".join(out)


def _host_run(argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=timeout, check=False)


def rule_lines(text: str) -> list[str]:
    """The rules of an iptables-save dump (``-A`` lines), sorted, for before/after checks."""
    return sorted(ln for ln in text.splitlines() if ln.startswith("-A"))


@contextmanager
def system_lab(state_dir: Path = STATE, nodes: tuple[str, ...] = NODES,
               up_args: tuple[str, ...] = ("--ipvs-nodes", "2")) -> Iterator[SystemLab]:
    """``svcproxy lab up --nodes N`` (by default 3 nodes, 2 of them IPVS guests) in
    ``state_dir`` (operator and agents included), ready for traffic; down afterwards
    (``SVCPROXY_E2E_KEEP_LAB=1`` keeps it)."""
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    # Another engineer's lab may hold the machine's one slot: wait for it if asked to.
    patience = time.monotonic() + float(os.environ.get("SVCPROXY_E2E_WAIT_FOR_LAB", "0"))
    refused = False  # another lab holds the machine's slot: nothing here to take down
    try:
        while True:
            proc = _cli("up", "--nodes", str(len(nodes)), *up_args, state_dir=state_dir)
            if "another lab" not in proc.stderr.lower() or time.monotonic() > patience:
                break
            time.sleep(5)
        refused = proc.returncode != 0 and "another lab" in proc.stderr.lower()
        if refused:
            pytest.skip(f"another lab runs on this machine: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, f"lab up failed:\n{proc.stderr[-4000:]}"
        lab = SystemLab(state_dir)

        def agents_ready() -> bool:
            for node in nodes:
                conds = lab.proxynode(node).get("conditions") or []
                if not any(c["type"] == "Ready" and c["status"] == "True" for c in conds):
                    return False
            return True

        wait_for("a Ready ProxyNode from every agent", agents_ready, 120)
        yield lab
    finally:
        # After a failed up too: one killed by the timeout cannot undo what it started.
        if not refused and not os.environ.get("SVCPROXY_E2E_KEEP_LAB"):
            _cli("down", timeout=300, state_dir=state_dir)


def echo_deployment(name: str, replicas: int) -> dict[str, Any]:
    """The echo Deployment: TCP and UDP on 80 and 8080, an HTTP readiness probe every
    second, 3 s of serving after SIGTERM."""
    ports = [{"containerPort": p, "protocol": proto} for p in (80, 8080) for proto in ("TCP", "UDP")]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 15,
                    "containers": [{
                        "name": "echo", "image": ECHO, "ports": ports,
                        # Like a well-behaved server (or a preStop sleep): keep serving a
                        # while after SIGTERM, as long as proxies may take to drop the
                        # endpoint on a loaded machine (an operator that just restarted).
                        "env": [{"name": "SVCPROXY_ECHO_DRAIN_SECONDS", "value": "8"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": 80},
                                           "periodSeconds": 1, "failureThreshold": 1},
                    }],
                },
            },
        },
    }


def echo_service(name: str, app: str, ports: list[tuple[str, str, int]],
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A ClusterIP Service; ports are (name, protocol, port) with targetPort = port."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"selector": {"app": app},
                     "ports": [{"name": n, "protocol": p, "port": port, "targetPort": port}
                               for n, p, port in ports]}}
