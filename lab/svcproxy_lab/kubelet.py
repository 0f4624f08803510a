"""The lab kubelet: keeps one Node alive in the API and runs the Pods bound to it.

Started by ``cluster.py`` through ``LabNode.start_process`` as
``svcproxy lab kubelet --node NAME --kubeconfig PATH --state-dir DIR --pod-cidr CIDR``,
inside the node (its network namespace, or a UML guest), so one code path
serves every node kind. It registers the Node (Pod CIDR, addresses, capacity,
Ready condition), renews its Lease every 10 s, and for every Pod with
``spec.nodeName`` = this node: wires a network namespace (``podnet.py``),
starts the echo server (``echo.py``) for image ``svcproxy.io/echo``, runs the
readiness probe for real and writes Pod status. Deleting a Pod honours its
grace period. Pod records live in ``<state>/pods/<uid>.json``, so a restarted
kubelet adopts running Pods instead of recreating them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from svcproxy_lab import podnet
from svcproxy_lab.kubeapi import JSON, ApiError, KubeApi
from svcproxy_lab.node import pid_alive

ECHO_IMAGE = "svcproxy.io/echo"
K8S_VERSION = "v1.36.3"
LEASE_SECONDS = 40
LEASE_RENEW = 10.0
NODE_STATUS_EVERY = 60.0


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def is_echo(image: str) -> bool:
    return image == ECHO_IMAGE or image.startswith(ECHO_IMAGE + ":")


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} kubelet: {msg}", flush=True)


@dataclass
class Probe:
    """A readiness probe's spec and its running counts."""

    kind: str  # "http" | "tcp" | "exec"
    port: int
    path: str = "/"
    initial_delay: float = 0
    period: float = 10
    timeout: float = 1
    success_threshold: int = 1
    failure_threshold: int = 3
    successes: int = 0
    failures: int = 0
    next_run: float = 0
    pending: Future[bool] | None = None


@dataclass
class PodRuntime:
    """What this kubelet knows about one Pod; ``record`` is what survives a restart."""

    record: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    probe: Probe | None = None
    ready: bool = False
    last_status: str = ""
    term_deadline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _resolve_port(port: Any, container: JSON) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return int(port)


def parse_probe(pod: JSON) -> Probe | None:
    for c in pod["spec"]["containers"]:
        spec = c.get("readinessProbe")
        if not spec:
            continue
        if "httpGet" in spec:
            get = spec["httpGet"]
            probe = Probe("http", _resolve_port(get.get("port"), c), get.get("path", "/"))
        elif "tcpSocket" in spec:
            probe = Probe("tcp", _resolve_port(spec["tcpSocket"].get("port"), c))
        else:
            probe = Probe("exec", 0)
        probe.initial_delay = float(spec.get("initialDelaySeconds", 0))
        probe.period = float(spec.get("periodSeconds", 10))
        probe.timeout = float(spec.get("timeoutSeconds", 1))
        probe.success_threshold = int(spec.get("successThreshold", 1))
        probe.failure_threshold = int(spec.get("failureThreshold", 3))
        return probe
    return None


def run_probe(ip: str, probe: Probe) -> bool:
    """One probe attempt from this node against the Pod, as the real kubelet would."""
    if probe.kind == "exec":
        return False  # the lab cannot exec in an echo "container"
    try:
        if probe.kind == "tcp":
            with socket.create_connection((ip, probe.port), timeout=probe.timeout):
                return True
        conn = http.client.HTTPConnection(ip, probe.port, timeout=probe.timeout)
        try:
            conn.request("GET", probe.path, headers={"User-Agent": "kube-probe/1.36"})
            return 200 <= conn.getresponse().status < 400
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


class Kubelet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.node = args.node
        self.pod_cidr = args.pod_cidr
        self.index = int(self.pod_cidr.split(".")[2])
        self.address = args.address or f"172.29.0.{10 + self.index}"
        self.api = KubeApi(Path(args.kubeconfig), server=args.server)
        self.state = Path(args.state_dir)
        self.pods_dir = self.state / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.ipam = podnet.Ipam(self.state / "ipam.json", self.pod_cidr)
        self.labels = dict(kv.split("=", 1) for kv in args.label or [])
        self.pods: dict[str, PodRuntime] = {}
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="probe")
        self.next_lease = 0.0
        self.next_node_status = 0.0
        self.ready_since: str | None = None

    # --- node and lease -------------------------------------------------------

    def register(self) -> None:
        labels = {
            "kubernetes.io/hostname": self.node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **self.labels,
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": labels},
            "spec": {"podCIDR": self.pod_cidr, "podCIDRs": [self.pod_cidr]},
        }
        try:
            self.api.create("/api/v1/nodes", body)
            log(f"registered Node {self.node}")
        except ApiError as exc:
            if exc.status != 409:
                raise
        self.node_status()

    def node_status(self) -> None:
        stamp = now_rfc3339()
        since = self.ready_since = self.ready_since or stamp
        conditions = [
            {"type": t, "status": "False", "reason": f"KubeletHasNo{t}", "message": "lab node",
             "lastHeartbeatTime": stamp, "lastTransitionTime": since}
            for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
        ]
        conditions.append({
            "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "svcproxy lab kubelet is posting ready status",
            "lastHeartbeatTime": stamp, "lastTransitionTime": since,
        })
        resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "20Gi"}
        status = {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": self.address},
                {"type": "Hostname", "address": self.node},
            ],
            "conditions": conditions,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "kubeletVersion": K8S_VERSION, "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": "amd64",
                "containerRuntimeVersion": "svcproxy-lab://1", "osImage": "svcproxy lab node",
                "kernelVersion": os.uname().release, "machineID": self.node,
                "systemUUID": self.node, "bootID": self.node,
            },
        }
        self.api.strategic_patch(f"/api/v1/nodes/{self.node}/status", {"status": status})

    def renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": now_micro()}
        try:
            self.api.merge_patch(path, {"spec": spec})
        except ApiError as exc:
            if exc.status != 404:
                raise
            self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {"metadata": {"name": self.node, "namespace": "kube-node-lease"}, "spec": spec},
            )

    # --- pods -----------------------------------------------------------------

    def _record_path(self, uid: str) -> Path:
        return self.pods_dir / f"{uid}.json"

    def _save(self, rt: PodRuntime) -> None:
        path = self._record_path(rt.record["uid"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rt.record, indent=1))
        tmp.replace(path)

    def adopt(self) -> None:
        """Pick up the records of an earlier run: their echo servers keep running."""
        for path in self.pods_dir.glob("*.json"):
            record = json.loads(path.read_text())
            self.pods[record["uid"]] = PodRuntime(record=record)
            log(f"adopted pod {record['namespace']}/{record['name']} ({record.get('ip')})")

    def _echo_alive(self, rt: PodRuntime) -> bool:
        if rt.proc is not None:
            return rt.proc.poll() is None
        pid = rt.record.get("pid")
        return isinstance(pid, int) and pid_alive(pid)

    def _start_echo(self, pod: JSON, rt: PodRuntime) -> None:
        containers = pod["spec"]["containers"]
        ports = sorted({int(p["containerPort"]) for c in containers for p in c.get("ports") or []})
        drain = "0"
        for c in containers:
            for env in c.get("env") or []:
                if env.get("name") == "SVCPROXY_ECHO_DRAIN_SECONDS":
                    drain = str(env.get("value", "0"))
        argv = [*podnet.enter(rt.record["netns"]), sys.executable, "-m", "svcproxy_lab.echo",
                "--name", pod["metadata"]["name"], "--drain-seconds", drain,
                "--unready-file", str(self.pods_dir / f"{rt.record['uid']}.unready")]
        for port in ports or [80, 8080]:  # no containerPorts: what `kubectl expose` expects
            argv += ["--port", str(port)]
        logf = (self.pods_dir / f"{rt.record['uid']}.log").open("ab")
        rt.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        rt.record.update(pid=rt.proc.pid, ports=ports or [80, 8080], started=now_rfc3339())
        rt.extra["listening"] = False
        self._save(rt)

    def start_pod(self, pod: JSON) -> PodRuntime:
        meta = pod["metadata"]
        uid = meta["uid"]
        rt = self.pods.get(uid)
        if rt is None:
            rt = PodRuntime(record={"uid": uid, "namespace": meta["namespace"],
                                    "name": meta["name"], "restarts": 0})
            self.pods[uid] = rt
            # Adopt the Ready state the API shows, so a kubelet restart does not flap it.
        if rt.probe is None:
            rt.probe = parse_probe(pod)
            for cond in pod.get("status", {}).get("conditions") or []:
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    rt.ready = True
                    if rt.probe:
                        rt.probe.successes = rt.probe.success_threshold
        if "ip" not in rt.record or not podnet.netns_exists(rt.record.get("netns", "")):
            ip = self.ipam.allocate(uid)
            rt.record["ip"] = ip
            rt.record["netns"] = podnet.setup(self.index, self.pod_cidr, uid, ip)
            self._save(rt)
            log(f"pod {meta['namespace']}/{meta['name']}: network {ip} in {rt.record['netns']}")
        if not self._echo_alive(rt):
            if "pid" in rt.record:
                rt.record["restarts"] = rt.record.get("restarts", 0) + 1
                log(f"pod {meta['name']}: echo exited, restarting")
            self._start_echo(pod, rt)
        return rt

    def _probe_tick(self, rt: PodRuntime) -> None:
        probe = rt.probe
        ip = rt.record["ip"]
        if probe is None:
            # No probe: Ready once the echo listens (the lab's stand-in for "started").
            if not rt.extra.get("listening"):
                port = rt.record["ports"][0]
                rt.extra["listening"] = run_probe(ip, Probe("tcp", port, timeout=0.5))
            rt.ready = bool(rt.extra.get("listening")) and self._echo_alive(rt)
            return
        now = time.monotonic()
        if probe.pending is not None:
            if not probe.pending.done():
                return
            ok = probe.pending.result()
            probe.pending = None
            if ok:
                probe.successes, probe.failures = probe.successes + 1, 0
                if probe.successes >= probe.success_threshold:
                    rt.ready = True
            else:
                probe.failures, probe.successes = probe.failures + 1, 0
                if probe.failures >= probe.failure_threshold or not rt.ready:
                    rt.ready = False
        if probe.next_run == 0:
            probe.next_run = now + probe.initial_delay
        if now >= probe.next_run:
            probe.next_run = now + probe.period
            probe.pending = self.pool.submit(run_probe, ip, probe)

    def _patch_status(self, pod: JSON, status: JSON) -> None:
        key = json.dumps(status, sort_keys=True)
        rt = self.pods.get(pod["metadata"]["uid"])
        if rt is not None and rt.last_status == key:
            return
        ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        try:
            self.api.strategic_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                     {"status": status})
        except ApiError as exc:
            if exc.status in (404, 409):
                return
            raise
        if rt is not None:
            rt.last_status = key

    def running_status(self, pod: JSON, rt: PodRuntime) -> JSON:
        ready = "True" if rt.ready else "False"
        started = rt.record.get("started", now_rfc3339())
        conds = [("PodReadyToStartContainers", "True"), ("Initialized", "True"),
                 ("ContainersReady", ready), ("Ready", ready), ("PodScheduled", "True")]
        old = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
        conditions = []
        for ctype, value in conds:
            prev = old.get(ctype, {})
            since = prev.get("lastTransitionTime") if prev.get("status") == value else None
            conditions.append({"type": ctype, "status": value,
                               "lastTransitionTime": since or now_rfc3339()})
        ip = rt.record["ip"]
        return {
            "phase": "Running", "hostIP": self.address, "hostIPs": [{"ip": self.address}],
            "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started, "conditions": conditions,
            "containerStatuses": [
                {"name": c["name"], "image": c["image"], "imageID": f"{ECHO_IMAGE}@lab",
                 "containerID": f"svcproxy-lab://{rt.record['uid']}/{c['name']}",
                 "ready": rt.ready, "started": True, "restartCount": rt.record.get("restarts", 0),
                 "state": {"running": {"startedAt": started}}}
                for c in pod["spec"]["containers"]
            ],
        }

    def unsupported_status(self, pod: JSON, image: str) -> JSON:
        message = (f"the svcproxy lab runs only the image {ECHO_IMAGE}; "
                   f"{image!r} cannot run here")
        return {
            "phase": "Pending", "hostIP": self.address, "hostIPs": [{"ip": self.address}],
            "conditions": [{"type": t, "status": v} for t, v in (
                ("PodScheduled", "True"), ("Initialized", "True"),
                ("ContainersReady", "False"), ("Ready", "False"))],
            "containerStatuses": [
                {"name": c["name"], "image": c["image"], "imageID": "", "ready": False,
                 "restartCount": 0, "started": False,
                 "state": {"waiting": {"reason": "ImageNotSupported", "message": message}}}
                for c in pod["spec"]["containers"]
            ],
        }

    def terminate(self, pod: JSON) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        rt = self.pods.get(uid)
        if rt is not None and "ip" in rt.record:
            if rt.term_deadline is None:
                grace = meta.get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                rt.term_deadline = time.monotonic() + float(grace)
                log(f"pod {meta['name']}: terminating, grace {grace} s")
                self._signal_echo(rt, signal.SIGTERM)
            if self._echo_alive(rt) and time.monotonic() < rt.term_deadline:
                self._probe_tick(rt)
                self._patch_status(pod, self.running_status(pod, rt))
                return
        self.cleanup(uid)
        try:
            self.api.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                            {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0,
                             "preconditions": {"uid": uid}})
        except ApiError as exc:
            if exc.status != 409:
                raise
        log(f"pod {meta['namespace']}/{meta['name']}: deleted")

    def _signal_echo(self, rt: PodRuntime, sig: int) -> None:
        pid = rt.proc.pid if rt.proc is not None else rt.record.get("pid")
        if isinstance(pid, int) and self._echo_alive(rt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def cleanup(self, uid: str) -> None:
        rt = self.pods.pop(uid, None)
        if rt is not None:
            self._signal_echo(rt, signal.SIGKILL)
            if rt.proc is not None:
                rt.proc.wait(timeout=5)
        podnet.teardown(self.index, uid)
        self.ipam.release(uid)
        for suffix in (".json", ".log", ".unready"):
            (self.pods_dir / f"{uid}{suffix}").unlink(missing_ok=True)

    def sync(self) -> None:
        listed = self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={self.node}")
        seen = set()
        for pod in listed.get("items", []):
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            try:
                self.sync_pod(pod)
            except Exception as exc:  # one broken Pod must not stop the others
                log(f"pod {pod['metadata']['name']}: {type(exc).__name__}: {exc}")
        for uid in list(self.pods):
            if uid not in seen:  # gone from the API (force-deleted): clean up behind it
                log(f"pod {self.pods[uid].record.get('name')}: gone from the API, cleaning up")
                self.cleanup(uid)
        for uid in self.ipam.owners():
            if uid not in seen and uid not in self.pods:
                podnet.teardown(self.index, uid)
                self.ipam.release(uid)

    def sync_pod(self, pod: JSON) -> None:
        if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        if pod["metadata"].get("deletionTimestamp"):
            self.terminate(pod)
            return
        images = [c["image"] for c in pod["spec"]["containers"]]
        bad = [i for i in images if not is_echo(i)]
        if bad:
            self._patch_status(pod, self.unsupported_status(pod, bad[0]))
            return
        rt = self.start_pod(pod)
        self._probe_tick(rt)
        self._patch_status(pod, self.running_status(pod, rt))

    # --- loop -----------------------------------------------------------------

    def _watch(self) -> None:
        """Wake the loop on any change of this node's Pods; the loop lists anyway."""
        while not self.stopping.is_set():
            try:
                for _ in self.api.watch("/api/v1/pods",
                                        {"fieldSelector": f"spec.nodeName={self.node}"}):
                    self.wake.set()
            except Exception as exc:
                log(f"watch ended ({type(exc).__name__}: {exc}); restarting")
                self.stopping.wait(1)

    def run(self) -> None:
        self.adopt()
        while True:
            try:
                self.register()
                break
            except (OSError, ApiError) as exc:
                log(f"cannot register Node yet ({exc}); retrying")
                time.sleep(1)
        threading.Thread(target=self._watch, daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        while not self.stopping.is_set():
            now = time.monotonic()
            try:
                if now >= self.next_lease:
                    self.renew_lease()
                    self.next_lease = now + LEASE_RENEW
                if now >= self.next_node_status:
                    self.node_status()
                    self.next_node_status = now + NODE_STATUS_EVERY
                self.sync()
            except (OSError, ApiError, http.client.HTTPException) as exc:
                log(f"sync failed: {exc}")
            self.wake.wait(timeout=0.5)
            self.wake.clear()
        log("stopping; Pods keep running and are adopted by the next kubelet")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", required=True, help="Node name, e.g. node-1")
    parser.add_argument("--kubeconfig", required=True, help="the node's kubeconfig")
    parser.add_argument("--state-dir", required=True, help="this kubelet's own state folder")
    parser.add_argument("--pod-cidr", required=True, help="e.g. 10.244.1.0/24")
    parser.add_argument("--address", help="InternalIP (default 172.29.0.(10+i))")
    parser.add_argument("--server", help="API server URL, overriding the kubeconfig's")
    parser.add_argument("--label", action="append", help="extra Node label KEY=VALUE")


def main(args: argparse.Namespace) -> int:
    Kubelet(args).run()
    return 0
