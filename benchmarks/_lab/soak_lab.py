"""The soak's hands on the lab: processes, faults, a supervisor, samples, kernel dumps, churn writes.

Used by ``benchmarks/soak.py`` only. :class:`SoakLab` wraps a running
``harness.BenchLab`` (its nodes, pid files and API) and does one thing per method:
kill an agent or the operator, restart the API server, compact and defragment etcd
(through etcd's JSON gateway on 127.0.0.1:2379: the lab builds no etcdctl; it is the
same ``Compact`` and ``Defragment`` calls), read a process's RSS (host ``/proc``, or the
guest's for a UML node), dump a node's svcproxy kernel objects, run ``agent --cleanup``,
start and stop the traffic clients. :class:`Supervisor` restarts whatever died, as a
kubelet or systemd would: a killed process after the fault's delay, any other death at
once, recorded as an unexpected exit. :func:`apply_op` writes one churn step of
``soak_plan.next_op``; :func:`list_world` reads the churn objects back for the next one.
"""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import soak_plan as plan
from benchmarks._lab.harness import BenchLab, parse_sample, sample, say
from svcproxy_lab import controlplane, network
from svcproxy_lab.cluster import LabError
from svcproxy_lab.kubeapi import ApiError, KubeApi
from svcproxy_lab.node import LabNode, pid_alive, read_pid, terminate
from svcproxy_lab.pki import Pki

NS = plan.NAMESPACE
SVC_PATH = f"/api/v1/namespaces/{NS}/services"
SLICE_PATH = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
DEPLOY_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
POD_PATH = f"/api/v1/namespaces/{NS}/pods"
POLICY_PATH = f"/apis/svcproxy.io/v1alpha1/namespaces/{NS}/serviceproxypolicies"
PVS_ALL = "/apis/svcproxy.io/v1alpha1/proxyvirtualservers"
PN_PATH = "/apis/svcproxy.io/v1alpha1/proxynodes"
BACKING_LABEL = "soak.svcproxy.io/backing"
STEADY_LABEL = "soak.svcproxy.io/steady"
ETCD = "http://127.0.0.1:2379"
CLIENT = Path(__file__).resolve().parent / "soak_client.py"
DUMPS = {
    "iptables-nft": ["iptables-nft-save"], "iptables-legacy": ["iptables-legacy-save"],
    "ip6tables-nft": ["ip6tables-nft-save"], "ip6tables-legacy": ["ip6tables-legacy-save"],
    "ipvs": ["ipvsadm", "-Sn"], "svcproxy0": ["ip", "-o", "addr", "show", "dev", "svcproxy0"],
    "listen": ["ss", "-Hlntu"],
}


class SoakLab:
    """The running soak lab: ``bench`` is up with svcproxy started."""

    def __init__(self, bench: BenchLab) -> None:
        self.bench = bench
        state = bench.lab.load()
        if state is None:
            raise LabError("the lab is not up")
        self.ctx = bench.lab.context(state)
        self.nodes: dict[str, LabNode] = {n.name: n for n in bench.lab.nodes(state)}
        self.api = bench._api()
        self.folder = self.ctx.state_dir / "soak"
        self.folder.mkdir(parents=True, exist_ok=True)

    # --- processes ---------------------------------------------------------------

    def operator_pid(self) -> int | None:
        return read_pid(self.ctx.pid_dir / "operator.pid")

    def operator_alive(self) -> bool:
        pid = self.operator_pid()
        return pid is not None and pid_alive(pid)

    def agent_alive(self, node: str) -> bool:
        check = getattr(self.nodes[node], "process_alive", None)
        return bool(check("agent")) if callable(check) else False

    def start_missing(self, nodes: list[str]) -> None:
        """The lab's own start of svcproxy: the operator if it is not running, and the
        agents of ``nodes`` that are not (CRDs applied again, a no-op)."""
        self.bench.lab.start_svcproxy(self.ctx, [self.nodes[n] for n in nodes], say)

    def kill_agent(self, node: str) -> None:
        self.nodes[node].stop_process("agent", signal.SIGKILL)

    def kill_operator(self) -> None:
        terminate(self.ctx.pid_dir / "operator.pid", signal.SIGKILL)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (SIGTERM, as a rolling restart does) and start it again;
        returns once it answers /readyz."""
        terminate(controlplane.pid_file(self.ctx, "kube-apiserver"))
        controlplane.start(self.ctx, Pki(self.ctx.pki_dir), lambda _msg: None)

    def control_plane_dead(self) -> list[str]:
        return [c for c in controlplane.COMPONENTS if not controlplane.running(self.ctx, c)]

    def start_control_plane(self) -> None:
        controlplane.start(self.ctx, Pki(self.ctx.pki_dir), lambda _msg: None)

    def compact_etcd(self) -> dict[str, Any]:
        """Compact etcd's history up to its current revision and defragment it: every
        watch or list from an older resourceVersion then gets 410 Gone."""
        def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            req = urllib.request.Request(f"{ETCD}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                out: dict[str, Any] = json.loads(resp.read().decode() or "{}")
                return out

        head = call("/v3/kv/range", {"key": base64.b64encode(b"/").decode(), "count_only": True})
        revision = int(head["header"]["revision"])
        t0 = time.monotonic()
        call("/v3/kv/compaction", {"revision": revision, "physical": True})
        t1 = time.monotonic()
        call("/v3/maintenance/defragment", {})
        return {"revision": revision, "compact_s": round(t1 - t0, 3),
                "defragment_s": round(time.monotonic() - t1, 3)}

    # --- samples -------------------------------------------------------------------

    def operator_rss(self) -> tuple[int, float] | None:
        pid = self.operator_pid()
        got = sample(pid)
        return (pid, got["rss_mb"]) if pid is not None and got else None

    def agent_rss(self, name: str) -> tuple[int, float] | None:
        """(pid, RSS MB) of ``name``'s agent: host /proc for a netns node; a UML guest's
        process lives in the guest's kernel, so its /proc is read there."""
        node = self.nodes[name]
        guest = getattr(node, "guest", None)
        if guest is None:
            pid = read_pid(self.ctx.pid_dir / f"{name}-agent.pid")
            got = sample(pid)
            return (pid, got["rss_mb"]) if pid is not None and got else None
        pid = read_pid(Path(guest.dir) / "logs" / "agent.pid")
        if pid is None:
            return None
        proc = node.run(["sh", "-c", f"cat /proc/{pid}/status && echo @@ && cat /proc/{pid}/stat"],
                        timeout=20)
        if proc.returncode != 0:
            return None
        status, _, stat = proc.stdout.decode().partition("@@")
        return pid, parse_sample(status, stat.strip())["rss_mb"]

    def ready_endpoints(self, services: list[str]) -> dict[str, int | None]:
        """Ready endpoints of each steady Service now (None for all when the API is down)."""
        try:
            items = self.api.get(SLICE_PATH)["items"]
        except (OSError, ApiError):
            return dict.fromkeys(services)
        out: dict[str, int | None] = dict.fromkeys(services, 0)
        for s in items:
            svc = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if svc in out:
                out[svc] = (out[svc] or 0) + sum(
                    1 for e in s.get("endpoints") or []
                    if (e.get("conditions") or {}).get("ready") is not False)
        return out

    # --- programs and reports ---------------------------------------------------------

    def programs(self) -> dict[str, str]:
        items = self.api.get(PVS_ALL)["items"]
        return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["spec"]["contentHash"]
                for p in items}

    def reports(self) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for name in self.nodes:
            obj = self.api.get_or_none(f"{PN_PATH}/{name}")
            out[name] = None if obj is None else dict(obj.get("status") or {})
        return out

    def services(self) -> dict[str, dict[str, str]]:
        """The soak namespace's Services: name -> labels."""
        return {s["metadata"]["name"]: dict(s["metadata"].get("labels") or {})
                for s in _live(self.api.get(SVC_PATH)["items"])}

    def pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.get(POD_PATH)["items"]
        return items

    def policies(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.get(POLICY_PATH)["items"]
        return items

    # --- kernel ------------------------------------------------------------------------

    def dump(self, name: str) -> dict[str, str]:
        """The node's dumps for ``soak_report.kernel_objects`` (a tool that fails here,
        e.g. nft in a guest without nf_tables or ipvsadm without IPVS, gives nothing)."""
        out = {}
        for key, argv in DUMPS.items():
            proc = self.nodes[name].run(argv, timeout=60)
            out[key] = proc.stdout.decode(errors="replace") if proc.returncode == 0 else ""
        return out

    def cleanup_agent(self, name: str) -> str:
        """``svcproxy agent --cleanup`` on the node (its agent stopped first); its errors."""
        node = self.nodes[name]
        node.stop_process("agent")
        proc = node.run([self.ctx.python, "-m", "svcproxy.cli", "agent", "--cleanup",
                         "--node-name", name], timeout=180)
        return "" if proc.returncode == 0 else proc.stderr.decode(errors="replace")[-1000:]

    # --- traffic -------------------------------------------------------------------------

    def requests_file(self, node: str) -> Path:
        return self.folder / f"{node}-requests.jsonl"

    def start_clients(self, targets: list[dict[str, Any]], rate: float, timeout: float,
                      max_seconds: float) -> None:
        stop = self.folder / "stop"
        stop.unlink(missing_ok=True)
        for name, node in self.nodes.items():
            self.requests_file(name).unlink(missing_ok=True)
            make = getattr(node, "client_netns", None)  # a guest makes its own, inside
            ns = make() if callable(make) else network.ensure_client_netns(node.index)
            args = {"node": name, "targets": targets, "rate": rate, "timeout": timeout,
                    "out": str(self.requests_file(name)), "stop": str(stop),
                    "max_seconds": max_seconds}
            node.start_process("soak-client", ["nsenter", f"--net=/run/netns/{ns}", "--",
                                               self.ctx.python, str(CLIENT), json.dumps(args)])

    def stop_clients(self, timeout: float) -> dict[str, bool]:
        """Ask every client to stop, wait for its last line; whether each finished."""
        (self.folder / "stop").touch()
        done = dict.fromkeys(self.nodes, False)
        deadline = time.monotonic() + timeout
        while not all(done.values()) and time.monotonic() < deadline:
            for name in self.nodes:
                done[name] = done[name] or '"done": true' in _tail(self.requests_file(name))
            time.sleep(0.5)
        for node in self.nodes.values():
            node.stop_process("soak-client")
        return done

    def requests(self) -> list[dict[str, Any]]:
        out = []
        for name in self.nodes:
            path = self.requests_file(name)
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a killed client
                if "svc" in row:
                    out.append({"node": name, **row})
        return out


def _tail(path: Path, size: int = 400) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


class Supervisor:
    """Restarts what died, every second, in its own thread. ``expect(name, delay)``
    before a fault kills ``name`` (``operator``, ``agent/<node>``, ``control-plane``):
    it comes back after ``delay`` s; anything else found dead is an unexpected exit,
    restarted at once. ``events`` records every restart."""

    def __init__(self, soak: SoakLab) -> None:
        self.soak = soak
        self.lock = threading.Lock()
        self.held: dict[str, float] = {}  # name -> wall time before which it stays down
        self.expected: set[str] = set()
        self.events: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def expect(self, name: str, delay: float) -> None:
        with self.lock:
            self.held[name] = time.time() + delay
            self.expected.add(name)

    def release(self, name: str) -> None:
        with self.lock:
            self.held.pop(name, None)
            self.expected.discard(name)

    def restarted_after(self, name: str, t: float) -> float | None:
        with self.lock:
            return next((e["t"] for e in self.events if e["process"] == name and e["t"] >= t), None)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                self.tick()
            except Exception as exc:  # the API down, a start that failed: try again next tick
                say(f"supervisor: {type(exc).__name__}: {str(exc)[:300]}")

    def _due(self, name: str, now: float) -> bool:
        with self.lock:
            return self.held.get(name, 0.0) <= now

    def _note(self, name: str) -> None:
        """Record ``name``'s restart, once it is done (a start that failed is tried again
        next tick, still expected)."""
        with self.lock:
            cause = "fault" if name in self.expected else "unexpected exit"
            self.expected.discard(name)
            self.held.pop(name, None)
            self.events.append({"t": round(time.time(), 3), "process": name, "cause": cause})
        if cause != "fault":
            say(f"supervisor: {name} died on its own; restarted it")

    def tick(self) -> None:
        now = time.time()
        if self.soak.control_plane_dead() and self._due("control-plane", now):
            self.soak.start_control_plane()
            self._note("control-plane")
        dead = [] if self.soak.operator_alive() else ["operator"]
        dead += [f"agent/{n}" for n in self.soak.nodes if not self.soak.agent_alive(n)]
        due = [d for d in dead if self._due(d, now)]
        if not due or ("operator" in dead and "operator" not in due):
            return  # the lab's start would bring a held operator back early: wait for it
        self.soak.start_missing([d.split("/", 1)[1] for d in due if d.startswith("agent/")])
        for name in due:
            self._note(name)


# --- churn ----------------------------------------------------------------------------


def _live(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in items if not i["metadata"].get("deletionTimestamp")]


def list_world(api: KubeApi, next_index: int) -> plan.World:
    """The churn objects and the steady Services' modes as the API server has them now."""
    churn = f"{plan.CHURN_LABEL}=true"
    slices = {s["metadata"]["labels"]["kubernetes.io/service-name"]: len(s.get("endpoints") or [])
              for s in api.get(SLICE_PATH, labelSelector=churn)["items"]}
    replicas = {d["metadata"]["name"]: int(d["spec"].get("replicas", 1))
                for d in api.get(DEPLOY_PATH, labelSelector=churn)["items"]}
    services = []
    for s in _live(api.get(SVC_PATH, labelSelector=churn)["items"]):
        labels, name = s["metadata"]["labels"], s["metadata"]["name"]
        backing = labels.get(BACKING_LABEL, "slice")
        size = slices.get(name, 0) if backing == "slice" else replicas.get(name, 0)
        services.append(plan.ChurnService(name, backing, labels.get(plan.GROUP_LABEL, "g0"), size))
    policies, steady = {}, {}
    for p in _live(api.get(POLICY_PATH)["items"]):
        labels = p["metadata"].get("labels") or {}
        if labels.get(STEADY_LABEL) == "true":
            steady[p["metadata"]["name"]] = p["spec"]["mode"]
        elif labels.get(plan.CHURN_LABEL) == "true":
            policies[p["metadata"]["name"]] = labels.get(plan.GROUP_LABEL, "g0")
    pods = tuple(sorted(p["metadata"]["name"]
                        for p in _live(api.get(POD_PATH, labelSelector=churn)["items"])))
    return plan.World(tuple(services), policies, steady, pods, next_index)


def create_steady(api: KubeApi, name: str, replicas: int, mode: str) -> None:
    """A steady Service: its Deployment, the Service, and a policy naming it."""
    labels = {STEADY_LABEL: "true"}
    api.create(DEPLOY_PATH, plan.deployment_body(name, replicas, labels))
    api.create(SVC_PATH, plan.service_body(name, labels, {"app": name}))
    body = plan.policy_body(name, plan.steady_policy_spec(name, mode))
    body["metadata"]["labels"] = labels
    _create_policy(api, body)


def _create_policy(api: KubeApi, body: dict[str, Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            api.create(POLICY_PATH, body)
            return
        except ApiError as exc:  # 404 while a just-applied CRD is not served yet
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _patch_policy(api: KubeApi, name: str, spec: dict[str, Any]) -> None:
    old = api.get(f"{POLICY_PATH}/{name}")["spec"]
    api.merge_patch(f"{POLICY_PATH}/{name}", plan.spec_patch(spec, old))


def apply_op(api: KubeApi, op: plan.Op) -> None:
    """Write one churn step (raises what the API server answered)."""
    p, name = op.params, op.target
    churn = {plan.CHURN_LABEL: "true"}
    if op.kind == "add_service":
        labels = {**churn, plan.GROUP_LABEL: p["group"], BACKING_LABEL: p["backing"]}
        if p["backing"] == "pods":
            api.create(DEPLOY_PATH, plan.deployment_body(name, p["replicas"], churn))
            api.create(SVC_PATH, plan.service_body(name, labels, {"app": name}))
        else:
            created = api.create(SVC_PATH, plan.service_body(name, labels, None))
            api.create(SLICE_PATH, plan.slice_body(name, created["metadata"]["uid"], p["endpoints"]))
    elif op.kind == "delete_service":
        api.delete(f"{SVC_PATH}/{name}")
        if p["backing"] == "pods":
            api.delete(f"{DEPLOY_PATH}/{name}", {"propagationPolicy": "Background"})
    elif op.kind == "set_endpoints":
        body = plan.slice_body(name, "", p["endpoints"])
        api.merge_patch(f"{SLICE_PATH}/{name}-soak", {"ports": body["ports"], "endpoints": body["endpoints"]})
    elif op.kind == "scale":
        api.merge_patch(f"{DEPLOY_PATH}/{name}", {"spec": {"replicas": p["replicas"]}})
    elif op.kind == "delete_pod":
        api.delete(f"{POD_PATH}/{name}")
    elif op.kind == "add_policy":
        body = plan.policy_body(name, plan.churn_policy_spec(p["group"], p["spec"]))
        body["metadata"]["labels"] = {**churn, plan.GROUP_LABEL: p["group"]}
        _create_policy(api, body)
    elif op.kind == "change_policy":
        _patch_policy(api, name, plan.churn_policy_spec(p["group"], p["spec"]))
    elif op.kind == "delete_policy":
        api.delete(f"{POLICY_PATH}/{name}")
    elif op.kind == "switch_steady":
        _patch_policy(api, name, plan.steady_policy_spec(name, p["mode"]))
    else:
        raise ValueError(f"unknown churn step {op.kind!r}")
