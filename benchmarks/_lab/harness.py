"""The lab side of the benchmarks: a lab, the benchmark's objects, kernel readers, process samples.

Used by ``programming_latency.py``, ``policy_apply.py`` and ``footprint.py``. ``BenchLab``
brings a 3-node lab up (network namespaces, or UML guests with ``ipvs_nodes``; without
svcproxy: kube-proxy and svcproxy are started per phase through
``svcproxy_lab.cluster.Lab``), writes N selectorless Services with their own EndpointSlices
(10 endpoints each, ``endpointslice.kubernetes.io/managed-by`` set to ``bench.svcproxy.io``
so the EndpointSlice controller leaves them alone and no Pods are needed), runs one
``kernel_watch`` reader per netns node (UML nodes: ``uml_watch``) and samples RSS / CPU
seconds of the operator, the agents and kube-proxy from /proc. The caller must hold the
machine's lab turn (``flock /run/svcproxy-lab-turn.lock``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from svcproxy_lab.cluster import Lab
from svcproxy_lab.kubeapi import ApiError, KubeApi
from svcproxy_lab.node import spawn, terminate

NAMESPACE = "bench"
MEMBER_LABEL = "bench.svcproxy.io/member"
MANAGED_BY = "bench.svcproxy.io"
ENDPOINTS = 10
PORT = 80
TARGET_PORT = 8080
VIP_BASE = ipaddress.IPv4Address("10.96.16.0")  # clear of 10.96.0.1 (kubernetes) and DNS
# Endpoints never get traffic. They lie in no Node's Pod CIDR (10.244.N.0/24) and the agents
# refuse real servers that are neither Pod nor Node addresses, so the agents are told (their
# --extra-pod-cidr) that this network holds Pods too; 512k addresses, never reused in a run.
ENDPOINT_NETWORK = ipaddress.IPv4Network("10.248.0.0/13")
ADDRESS_BASE = ENDPOINT_NETWORK.network_address + 1
ADDRESS_SPAN = ENDPOINT_NETWORK.num_addresses - 2
AGENT_ARGS = ("--extra-pod-cidr", str(ENDPOINT_NETWORK))
READER = Path(__file__).resolve().parent / "kernel_watch.py"
DEFAULT_STATE = Path("/tmp/svcproxy-bench-lab")


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vip(i: int) -> str:
    return str(VIP_BASE + i + 1)


class AddressPool:
    """Endpoint addresses never used twice in one run (so a kernel rule names one change)."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int = 1) -> list[str]:
        if self.next + n > ADDRESS_SPAN:
            raise RuntimeError(f"the benchmark used all {ADDRESS_SPAN} endpoint addresses")
        out = [str(ADDRESS_BASE + self.next + k) for k in range(n)]
        self.next += n
        return out


def service_body(name: str, cluster_ip: str, affinity: bool = False,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "clusterIP": cluster_ip,
        "ports": [{"name": "http", "port": PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}],
    }
    if affinity:
        spec["sessionAffinity"] = "ClientIP"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {MEMBER_LABEL: "true", **(labels or {})}},
            "spec": spec}


def slice_body(service: str, addresses: list[str], owner_uid: str | None = None) -> dict[str, Any]:
    """The Service's EndpointSlice; with ``owner_uid`` owned by the Service, as the
    EndpointSlice controller writes its own, so the garbage collector deletes it with the Service."""
    meta: dict[str, Any] = {"name": f"{service}-bench", "namespace": NAMESPACE,
                            "labels": {"kubernetes.io/service-name": service,
                                       "endpointslice.kubernetes.io/managed-by": MANAGED_BY}}
    if owner_uid:
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Service", "name": service,
                                    "uid": owner_uid, "controller": True,
                                    "blockOwnerDeletion": True}]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def policy_body(name: str, *, mode: str = "iptables", services: list[str] | None = None,
                affinity: bool | None = None, selector: dict[str, str] | None = None,
                priority: int = 0, scheduler: str = "rr") -> dict[str, Any]:
    spec: dict[str, Any] = {"mode": mode, "priority": priority}
    if mode == "ipvs":
        spec["ipvs"] = {"scheduler": scheduler}
    if services is not None:
        spec["services"] = services
    else:
        spec["serviceSelector"] = {"matchLabels": selector or {MEMBER_LABEL: "true"}}
    if affinity is not None:
        spec["sessionAffinity"] = {"type": "ClientIP" if affinity else "None"}
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


SVC_PATH = f"/api/v1/namespaces/{NAMESPACE}/services"
SLICE_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NAMESPACE}/endpointslices"
POLICY_PATH = f"/apis/svcproxy.io/v1alpha1/namespaces/{NAMESPACE}/serviceproxypolicies"


@dataclass
class Population:
    """The Services the benchmark wrote: name -> (VIP, endpoint addresses)."""

    services: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    pool: AddressPool = field(default_factory=AddressPool)
    next_index: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # the open-loop writers share it


class BenchLab:
    """A 3-node lab for one benchmark run (netns nodes, or UML guests with ``ipvs_nodes``);
    always call ``down()`` (a ``with`` does)."""

    def __init__(self, state_dir: Path = DEFAULT_STATE, nodes: int = 3, ipvs_nodes: int = 0) -> None:
        self.lab = Lab(state_dir, agent_args=AGENT_ARGS)
        self.node_count = nodes
        self.ipvs_nodes = ipvs_nodes  # the last ones are UML guests with IPVS
        self.api: KubeApi | None = None

    def __enter__(self) -> BenchLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> KubeApi:
        if os.geteuid() != 0:
            raise SystemExit("the lab benchmarks need root: run them with sudo")
        owner = Path("/run/svcproxy-lab.owner")
        if owner.exists() and Path(owner.read_text().strip()) != self.lab.state_dir:
            raise SystemExit(f"another lab runs ({owner.read_text().strip()}): wait for it; run "
                             "benchmarks under `flock /run/svcproxy-lab-turn.lock ...`")
        self.lab.up(nodes=self.node_count, ipvs_nodes=self.ipvs_nodes, svcproxy=False, say=say)
        self.api = KubeApi(self.lab.admin_kubeconfig, timeout=60)
        return self.api

    def down(self) -> None:
        say("tearing the lab down")
        self.lab.down(say=say)

    def start_kube_proxy(self, mode: str) -> None:
        self.lab.start_kube_proxy(mode, say=say)

    def stop_kube_proxy(self) -> None:
        self.lab.stop_kube_proxy(say=say)

    def start_svcproxy(self, operator_args: list[str] | None = None) -> None:
        """CRDs, operator and agents as `lab up` starts them; ``operator_args`` restart the
        operator with extra options (e.g. ``--workers``) to measure a setting."""
        state = self.lab.load()
        assert state is not None, "the lab is not up"
        ctx = self.lab.context(state)
        self.lab.start_svcproxy(ctx, self.lab.nodes(state), say)
        if operator_args:
            say(f"restarting the operator with {operator_args}")
            terminate(ctx.pid_dir / "operator.pid")
            spawn([ctx.python, "-m", "svcproxy.cli", "operator", "--kubeconfig",
                   str(self.lab.admin_kubeconfig), *operator_args], ctx.log_dir / "operator.log",
                  ctx.pid_dir / "operator.pid",
                  env=dict(os.environ, KUBECONFIG=str(self.lab.admin_kubeconfig)))

    def stop_svcproxy(self) -> None:
        """Stop the operator and every agent (what they leave behind, the caller checks)."""
        state = self.lab.load()
        assert state is not None, "the lab is not up"
        terminate(self.lab.context(state).pid_dir / "operator.pid")
        for node in self.lab.nodes(state):
            node.stop_process("agent")

    def versions(self) -> dict[str, str]:
        """What the binaries under test say they are (``kube-proxy --version``)."""
        state = self.lab.load()
        assert state is not None, "the lab is not up"
        tool = self.lab.context(state).bin_dir / "kube-proxy"
        proc = subprocess.run([str(tool), "--version"], capture_output=True, text=True, check=False)
        return {"kube-proxy": (proc.stdout or proc.stderr).strip()}

    @property
    def node_names(self) -> list[str]:
        return [f"node-{i}" for i in range(1, self.node_count + 1)]

    def pid(self, name: str) -> int | None:
        try:
            return int((self.lab.state_dir / "pids" / f"{name}.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # --- objects --------------------------------------------------------------

    def populate(self, n: int, population: Population,
                 labels: Callable[[int], dict[str, str]] | None = None) -> None:
        """Create the namespace and ``n`` Services with one 10-endpoint slice each."""
        api = self._api()
        if api.get_or_none(f"/api/v1/namespaces/{NAMESPACE}") is None:
            api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                              "metadata": {"name": NAMESPACE}})
        start = time.monotonic()
        for _ in range(n):
            self.add_service(population, labels=labels(population.next_index) if labels else None)
            if len(population.services) % 500 == 0:
                say(f"wrote {len(population.services)} Services and EndpointSlices")
        say(f"wrote {n} Services + EndpointSlices in {time.monotonic() - start:.1f} s")

    def add_service(self, population: Population, affinity: bool = False,
                    labels: dict[str, str] | None = None, index: int | None = None) -> tuple[str, str, float]:
        """The Service, then its slice owned by it (the EndpointSlice controller's order):
        returns (name, VIP, wall time just before the Service write)."""
        with population.lock:
            if index is None:
                index = population.next_index
            population.next_index = max(population.next_index, index + 1)
            addresses = population.pool.take(ENDPOINTS)
        name = f"svc-{index}"
        api = self._api()
        t0 = time.time()
        created = api.create(SVC_PATH, service_body(name, vip(index), affinity, labels))
        api.create(SLICE_PATH, slice_body(name, addresses, created["metadata"]["uid"]))
        with population.lock:
            population.services[name] = (vip(index), addresses)
        return name, vip(index), t0

    def remove_service(self, population: Population, name: str) -> float:
        """Delete the Service only: the garbage collector deletes its slice, as for a user."""
        t0 = time.time()
        self._api().delete(f"{SVC_PATH}/{name}")
        with population.lock:
            del population.services[name]
        return t0

    def replace_endpoint(self, population: Population, name: str) -> tuple[str, str, float]:
        """Swap the oldest endpoint of ``name`` for a fresh address: (old, new, wall time before
        the write). A later swap on the same Service takes the next oldest, so it cannot undo this one."""
        with population.lock:
            cluster_ip, addresses = population.services[name]
            old = addresses[0]
            new = population.pool.take()[0]
            updated = [*addresses[1:], new]
            population.services[name] = (cluster_ip, updated)
        body = {"endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in updated]}
        t0 = time.time()
        self._api().merge_patch(f"{SLICE_PATH}/{name}-bench", body)
        return old, new, t0

    def _api(self) -> KubeApi:
        if self.api is None:
            raise RuntimeError("call up() first")
        return self.api


# --- kernel readers ------------------------------------------------------------


@dataclass
class Seen:
    t: float
    targets: tuple[str, ...]
    affinity: bool
    present: bool = True  # IPVS: the virtual server exists (it may have no targets left)


class KernelWatchers:
    """One ``kernel_watch`` process per node; answers "when did every node get there?"."""

    def __init__(self, nodes: list[str]) -> None:
        self.nodes = nodes
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.history: dict[tuple[str, str], list[Seen]] = {}
        self.counts: dict[tuple[str, int], dict[str, int]] = {}
        self.cond = threading.Condition()
        self.ready: set[str] = set()
        self.errors: list[str] = []
        self._count_id = 0
        self.last_per_node: dict[str, float] = {}
        self.probes: list[dict[str, Any]] = []  # the readers' own lag probes, with "node"
        self.replies: dict[tuple[str, int], dict[str, Any]] = {}  # owned / swept, by (node, id)
        self.writer: dict[str, str] = {}  # how each reader writes its probes

    def __enter__(self) -> KernelWatchers:
        for node in self.nodes:
            netns = f"/run/netns/svcp-{node}"
            proc = subprocess.Popen(["nsenter", f"--net={netns}", "--", sys.executable, "-u", str(READER)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self.procs[node] = proc
            threading.Thread(target=self._read, args=(node, proc), daemon=True).start()
        self._wait(lambda: self.ready == set(self.nodes), 30, "kernel readers to start")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            proc.wait(timeout=10)

    def _read(self, node: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._handle(node, json.loads(line))

    def _handle(self, node: str, ev: dict[str, Any]) -> None:
        """One event line of a node's reader (``uml_watch`` adds its own kinds)."""
        with self.cond:
            if ev["ev"] == "ready":
                self.ready.add(node)
                self.writer[node] = ev.get("writer", "")
            elif ev["ev"] == "probe":
                self.probes.append({"node": node, **ev})
            elif ev["ev"] in ("owned", "swept"):
                self.replies[(node, ev["id"])] = ev
            elif ev["ev"] == "state":
                self.history.setdefault((node, ev["key"]), []).append(
                    Seen(ev["t"], tuple(ev["targets"]), ev["affinity"],
                         ev.get("present", bool(ev["targets"]))))
            elif ev["ev"] == "count":
                self.counts[(node, ev["id"])] = ev["hist"]
            else:
                self.errors.append(f"{node}: {ev}")
                say(f"kernel reader on {node}: {ev}")
            self.cond.notify_all()

    def _send(self, cmd: dict[str, Any]) -> None:
        for proc in self.procs.values():
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()

    def _wait(self, check: Callable[[], bool], timeout: float, what: str) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not check():
                left = deadline - time.monotonic()
                if left <= 0:
                    say(f"timed out after {timeout:.0f} s waiting for {what}")
                    return False
                self.cond.wait(left)
        return True

    def watch(self, key: str) -> None:
        """Start following ``key`` ("VIP:port") on every node (before the API write)."""
        self._send({"op": "watch", "key": key})
        self._wait(lambda: all((n, key) in self.history for n in self.nodes), 10, f"watch {key}")

    def unwatch(self, key: str) -> None:
        self._send({"op": "unwatch", "key": key})
        with self.cond:
            for n in self.nodes:
                self.history.pop((n, key), None)

    def when(self, key: str, ok: Callable[[Seen], bool], t0: float, timeout: float) -> float | None:
        """Seconds from ``t0`` until ``ok`` held on every node (the slowest node), or None."""
        def first(node: str) -> float | None:
            for seen in self.history.get((node, key), []):
                if seen.t >= t0 - 0.001 and ok(seen):
                    return seen.t
            return None

        def done() -> bool:
            return all(first(n) is not None for n in self.nodes)

        if not self._wait(done, timeout, f"{key} on every node"):
            return None
        with self.cond:
            self.last_per_node = {n: round((first(n) or 0.0) - t0, 4) for n in self.nodes}
            return max(first(n) or 0.0 for n in self.nodes) - t0

    def watch_many(self, keys: list[str], timeout: float = 30) -> None:
        """Follow every key in ``keys`` on every node (all of one open-loop run, before it starts)."""
        for k in keys:
            self._send({"op": "watch", "key": k})
        self._wait(lambda: all((n, k) in self.history for n in self.nodes for k in keys),
                   timeout, f"watch {len(keys)} keys")

    def first_seen(self, key: str, ok: Callable[[Seen], bool], t0: float) -> dict[str, float | None]:
        """Per node: the first commit time at or after ``t0`` at which ``ok`` held for ``key``."""
        out: dict[str, float | None] = {}
        with self.cond:
            for node in self.nodes:
                out[node] = next((seen.t for seen in self.history.get((node, key), [])
                                  if seen.t >= t0 - 0.001 and ok(seen)), None)
        return out

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> bool:
        """Wait (woken by every reader event) until ``check()`` holds; False after ``timeout``."""
        return self._wait(check, timeout, what)

    def probe(self, start: bool, rate: float = 5.0, seed: int = 0) -> None:
        """Start / stop the readers' lag probes (each node gets its own seed)."""
        for i, proc in enumerate(self.procs.values()):
            assert proc.stdin is not None
            cmd: dict[str, Any] = ({"op": "probe_start", "rate": rate, "seed": seed * 31 + i}
                                   if start else {"op": "probe_stop"})
            proc.stdin.write(json.dumps(cmd) + "\n")
            proc.stdin.flush()

    def ask(self, op: str, timeout: float = 60) -> dict[str, dict[str, Any]]:
        """Send ``owned`` or ``sweep`` to every reader; their answers by node."""
        self._count_id += 1
        cid = self._count_id
        self._send({"op": op, "id": cid})
        self._wait(lambda: all((n, cid) in self.replies for n in self.nodes), timeout, op)
        with self.cond:
            return {n: self.replies.get((n, cid), {}) for n in self.nodes}

    def count(self, timeout: float = 120) -> dict[str, dict[str, int]]:
        """Per node: number of service entries by number of DNAT targets."""
        self._count_id += 1
        cid = self._count_id
        self._send({"op": "count", "id": cid})
        self._wait(lambda: all((n, cid) in self.counts for n in self.nodes), timeout, "entry counts")
        with self.cond:
            return {n: self.counts.get((n, cid), {}) for n in self.nodes}

    def wait_programmed(self, n: int, timeout: float, poll: float = 1.0) -> float | None:
        """Seconds until every node has >= ``n`` service entries with 10 targets, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            counts = self.count()
            full = [c.get(str(ENDPOINTS), 0) for c in counts.values()]
            if min(full) >= n:
                return time.monotonic() - start
            say(f"programmed so far (entries with {ENDPOINTS} endpoints per node): {full} of {n}")
            time.sleep(poll)
        return None


# --- processes -----------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def sample(pid: int | None) -> dict[str, float] | None:
    """RSS, peak RSS (MB) and CPU seconds (own + reaped children, e.g. iptables-restore)."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return parse_sample(status, stat)


def parse_sample(status: str, stat: str) -> dict[str, float]:
    """RSS, peak RSS and CPU seconds from the text of ``/proc/<pid>/status`` and ``.../stat``."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    ticks = stat.rsplit(")", 1)[1].split()
    cpu = sum(int(ticks[k]) for k in (11, 12, 13, 14)) / CLK_TCK  # utime stime cutime cstime
    return {"rss_mb": round(int(fields.get("VmRSS", "0 kB").split()[0]) / 1024, 1),
            "peak_rss_mb": round(int(fields.get("VmHWM", "0 kB").split()[0]) / 1024, 1),
            "cpu_s": round(cpu, 2)}


def sample_processes(bench: BenchLab, names: list[str]) -> dict[str, dict[str, float] | None]:
    return {name: sample(bench.pid(name)) for name in names}


def cpu_delta(before: dict[str, dict[str, float] | None],
              after: dict[str, dict[str, float] | None]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, a in after.items():
        b = before.get(name)
        out[name] = round(a["cpu_s"] - b["cpu_s"], 2) if a and b else None
    return out


# --- sync duration histograms ------------------------------------------------------

# What each system says its syncs cost: node-netns loopback port and histogram name.
SYNC_HISTOGRAMS = {
    "kube-proxy": (10249, "kubeproxy_sync_proxy_rules_duration_seconds"),
    "svcproxy": (9101, "svcproxy_sync_duration_seconds"),
}
Histograms = dict[str, dict[float, float]]  # labels (without le) -> cumulative buckets; "+sum"


def scrape_histograms(node: str, port: int, name: str) -> Histograms:
    """Histogram ``name`` from ``/metrics`` on the loopback of ``node``'s netns, by labels.

    The request stays inside the node's namespace (the network safety rule); an empty
    answer when the endpoint does not answer (the system is not running)."""
    fetch = fetch_metrics_code(port)
    proc = subprocess.run(["nsenter", f"--net=/run/netns/svcp-{node}", "--", sys.executable, "-c", fetch],
                          capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        return {}
    return parse_histograms(proc.stdout, name)


def fetch_metrics_code(port: int) -> str:
    """Python that prints the node-local ``/metrics`` page on ``port`` (run inside the node)."""
    return (f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/metrics', "
            "timeout=5).read().decode())")


def parse_histograms(text: str, name: str) -> Histograms:
    """Histogram ``name`` of a Prometheus text page, by labels."""
    out: Histograms = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if s.name == f"{name}_bucket":
                out.setdefault(labels, {})[float(s.labels["le"])] = s.value
            elif s.name == f"{name}_sum":
                out.setdefault(f"+sum {labels}", {})[0.0] = s.value
    return out


def create_policy(api: KubeApi, body: dict[str, Any], timeout: float = 30) -> float:
    """POST a policy, retrying while its CRD is not served yet; the wall time before the last POST."""
    deadline = time.monotonic() + timeout
    while True:
        t0 = time.time()
        try:
            api.create(POLICY_PATH, body)
            return t0
        except ApiError as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the CRD was just applied: the API server serves it within a second


def condition(obj: dict[str, Any] | None, kind: str) -> bool:
    """True when ``obj`` has condition ``kind`` True for its current generation."""
    if obj is None:
        return False
    generation = obj.get("metadata", {}).get("generation")
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return bool(cond.get("status") == "True" and cond.get("observedGeneration") in (None, generation))
    return False


def wait_policy(api: KubeApi, name: str, t0: float, timeout: float, poll: float = 0.05) -> float | None:
    """Seconds from wall time ``t0`` until policy ``name`` is Programmed=True, or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition(api.get_or_none(f"{POLICY_PATH}/{name}"), "Programmed"):
            return time.time() - t0
        time.sleep(poll)
    return None


def wait_handover(api: KubeApi, n: int, timeout: float) -> bool:
    """Wait until ``n`` bench Services carry the svcproxy label (the operator's handover is done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = api.get(SVC_PATH, labelSelector="service.kubernetes.io/service-proxy-name=svcproxy")["items"]
        if len(items) >= n:
            return True
        say(f"handover labels: {len(items)} of {n} Services")
        time.sleep(2)
    return False


def ignore_missing(call: Callable[[], object]) -> None:
    try:
        call()
    except ApiError as exc:
        if exc.status != 404:
            raise
