"""Bringing a whole lab up and down: toolchain, network, PKI, control plane, nodes, svcproxy.

Called by ``cli.py`` (``svcproxy lab up|down|status|stop-node|start-node``) and by
the e2e fixture through that command; e2e tests of nodes that leave and join call
:meth:`Lab.stop_node` and :meth:`Lab.start_node` directly. A lab is described by ``<state>/lab.json``
(node kinds and count); processes by pid files in ``<state>/pids``. Only one
lab runs per machine because the address plan and namespace names are
fixed; ``/run/svcproxy-lab.owner`` names the state folder of the running one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from svcproxy_lab import controlplane, network
from svcproxy_lab.kubeapi import ApiError, KubeApi
from svcproxy_lab.node import (
    API_PORT,
    LabContext,
    LabNode,
    make_node,
    node_name,
    pid_alive,
    read_pid,
    spawn,
    terminate,
    uml_available,
)
from svcproxy_lab.pki import NODE_API, Pki

__all__ = ["DEFAULT_STATE", "Lab", "LabError", "ensure_toolchain", "uml_available"]

REPO = Path(__file__).resolve().parents[2]  # the checkout: lab/svcproxy_lab/cluster.py
BUILD_SCRIPT = Path(__file__).resolve().parent / "toolchain" / "build.sh"
OWNER_FILE = Path("/run/svcproxy-lab.owner")
DEFAULT_STATE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svcproxy/labs/default"

Say = Callable[[str], None]
# What kube-proxy runs, in either address family (see Lab._iptables_env).
LEGACY_TOOLS = ("iptables", "iptables-save", "iptables-restore",
                "ip6tables", "ip6tables-save", "ip6tables-restore")


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says what to do instead."""


def say_stderr(msg: str) -> None:
    print(f"[lab {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, routes): run it with sudo")


def ensure_toolchain(say: Say) -> Path:
    """The bin folder of the pinned binaries; builds them first if missing (minutes, cold)."""
    # No Go check here: build.sh finds one (Debian's backported Go too, off PATH), needs
    # none when the cache is filled, and says what to do when it has none.
    cached = cached_bin_dir()
    if cached is None:
        say("building the Kubernetes toolchain from Go modules (cold: many minutes)")
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True,
                          check=False)  # its progress goes straight to our stderr
    if proc.returncode != 0:
        raise LabError(f"toolchain build failed (exit {proc.returncode}); see the messages above")
    return Path(proc.stdout.strip().splitlines()[-1])


def cached_bin_dir() -> Path | None:
    """The built toolchain's bin folder for the pinned Kubernetes, or None when not built."""
    key_line = [ln for ln in BUILD_SCRIPT.read_text().splitlines() if ln.startswith("K8S_VERSION=")]
    version = key_line[0].split("=", 1)[1] if key_line else ""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "svcproxy/toolchain"
    for d in sorted(root.glob(f"k8s-{version}_*/bin")):
        if (d / "kube-apiserver").exists() and (d / "kubectl").exists():
            return d
    return None


class Lab:
    """One lab, described by its state folder."""

    def __init__(self, state_dir: Path, agent_args: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir.resolve()
        self.state_file = self.state_dir / "lab.json"
        # Extra agent flags (benchmarks: --extra-pod-cidr for endpoints outside the Pod CIDRs).
        self.agent_args = agent_args

    # --- state ----------------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return data

    def context(self, state: dict[str, Any]) -> LabContext:
        return LabContext(
            state_dir=self.state_dir,
            bin_dir=Path(state["bin_dir"]),
            python=sys.executable,
            api_url=NODE_API,
            node_count=len(state["nodes"]),
        )

    def nodes(self, state: dict[str, Any]) -> list[LabNode]:
        ctx = self.context(state)
        return [make_node(n["kind"], n["index"], ctx) for n in state["nodes"]]

    def alive(self) -> bool:
        pid = read_pid(self.state_dir / "pids" / "kube-apiserver.pid")
        return pid is not None and pid_alive(pid)

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state_dir / "pki" / "admin.kubeconfig"

    # --- up -------------------------------------------------------------------

    def up(self, nodes: int, ipvs_nodes: int, svcproxy: bool, say: Say = say_stderr,
           kube_proxy: str | None = None) -> Path:
        """Start (or complete) the lab; return the admin kubeconfig.

        When a lab that was not running fails to come up, whatever this call started
        (control plane, nodes, namespaces, taps, routes) is taken down again before the
        error is raised, so nothing of it answers on the lab's fixed ports afterwards.
        A lab that ran before the call is left as it was: others may be using it.
        """
        require_root()
        if ipvs_nodes > nodes:
            raise LabError(f"--ipvs-nodes {ipvs_nodes} is more than --nodes {nodes}")
        if ipvs_nodes and not uml_available():
            raise LabError("--ipvs-nodes needs user-mode-linux nodes (svcproxy_lab.uml), "
                           "which this checkout does not have; use --ipvs-nodes 0")
        self._check_owner(say)
        state = self.load()
        if state is not None and not self.alive():
            say(f"stale lab state in {self.state_dir}: its processes are dead; cleaning it up")
            self.down(say)
            state = None
        kinds = ["netns"] * (nodes - ipvs_nodes) + ["uml"] * ipvs_nodes
        wanted: list[dict[str, Any]] = [{"index": i, "kind": k} for i, k in enumerate(kinds, start=1)]
        if state is not None and state["nodes"] != wanted:
            raise LabError(
                f"the lab in {self.state_dir} runs with nodes {state['nodes']}; "
                f"run `svcproxy lab down --state-dir {self.state_dir}` first to change them"
            )
        # Before anything is written or started: a port held by another lab (or anyone)
        # fails here, with nothing of this lab to take down and the other one untouched.
        controlplane.check_ports(self.state_dir)
        bin_dir = ensure_toolchain(say)
        state = {"nodes": wanted, "bin_dir": str(bin_dir), "svcproxy": svcproxy,
                 "created": state["created"] if state else time.time()}
        fresh = not self.alive()
        try:
            return self._bring_up(state, svcproxy, kube_proxy, say)
        except BaseException as exc:  # Ctrl-C too: its processes must not outlive it either
            if fresh:
                self._roll_back(exc, say)
            raise

    def _bring_up(self, state: dict[str, Any], svcproxy: bool, kube_proxy: str | None,
                  say: Say) -> Path:
        """The steps of :meth:`up` that change the machine, each idempotent."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=1))
        OWNER_FILE.write_text(f"{self.state_dir}\n")
        ctx = self.context(state)
        for d in (ctx.log_dir, ctx.pid_dir):
            d.mkdir(parents=True, exist_ok=True)
        network.ensure_bridge()
        pki = Pki(ctx.pki_dir)
        pki.ensure([node_name(n["index"]) for n in state["nodes"]])
        controlplane.start(ctx, pki, say)
        lab_nodes = self.nodes(state)
        for node in lab_nodes:
            node.create(ctx)
            if not _process_alive(node, "kubelet"):
                say(f"starting the lab kubelet on {node.name}")
                node.start_process("kubelet", self.kubelet_argv(ctx, node))
        self.wait_nodes_ready(lab_nodes, say)
        if kube_proxy:
            self.start_kube_proxy(kube_proxy, say)
        if svcproxy:
            self.start_svcproxy(ctx, lab_nodes, say)
        return self.admin_kubeconfig

    def _roll_back(self, exc: BaseException, say: Say) -> None:
        """Take down the lab whose first ``up`` failed with ``exc``; the caller re-raises it."""
        first = next(iter(str(exc).splitlines()), "")
        say(f"lab up failed ({type(exc).__name__}: {first}); taking down what it started")
        try:
            self.down(say)
        except Exception as err:  # the original error is the one to raise
            say(f"taking the failed lab down failed too ({type(err).__name__}: {err}); "
                f"run `svcproxy lab down --state-dir {self.state_dir}`")

    def start_kube_proxy(self, mode: str, say: Say = say_stderr) -> None:
        """Run the real kube-proxy in ``mode`` on every node (not restarted if running)."""
        state = self._running_state()
        ctx = self.context(state)
        for node in self.nodes(state):
            if not _process_alive(node, "kube-proxy"):
                say(f"starting kube-proxy ({mode} mode) on {node.name}")
                node.start_process("kube-proxy", self.kube_proxy_argv(ctx, node, mode))

    def stop_kube_proxy(self, say: Say = say_stderr) -> None:
        """Stop kube-proxy everywhere and remove its rules (``kube-proxy --cleanup``)."""
        state = self._running_state()
        ctx = self.context(state)
        failed = []
        for node in self.nodes(state):
            node.stop_process("kube-proxy")
            proc = node.run([*self._iptables_env(node), str(ctx.bin_dir / "kube-proxy"), "--cleanup"],
                            timeout=120)
            if proc.returncode != 0:
                # Clean the other nodes anyway: one failure must not leave them running.
                failed.append(f"kube-proxy --cleanup failed on {node.name}: "
                              f"{proc.stderr.decode(errors='replace')[-500:]}")
                continue
            say(f"stopped kube-proxy on {node.name} and removed its rules")
        if failed:
            raise LabError("\n".join(failed))

    def _running_state(self) -> dict[str, Any]:
        state = self.load()
        if state is None or not self.alive():
            raise LabError(f"no running lab in {self.state_dir}: run `svcproxy lab up` first")
        return state

    def kube_proxy_argv(self, ctx: LabContext, node: LabNode, mode: str) -> list[str]:
        """The real kube-proxy for ``node``, configured for the lab (its config file written)."""
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": mode,
            "hostnameOverride": node.name,
            "clusterCIDR": network.CLUSTER_POD_CIDR,
            "clientConnection": {"kubeconfig": str(ctx.kubeconfig("kube-proxy"))},
            # nf_conntrack_max is global: leave the host's value alone.
            "conntrack": {"maxPerCore": 0},
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
        }
        path = ctx.node_state_dir(node.name) / "kube-proxy.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=1))
        return [*self._iptables_env(node), str(ctx.bin_dir / "kube-proxy"), f"--config={path}", "--v=1"]

    def _iptables_env(self, node: LabNode) -> list[str]:
        """An ``env PATH=...`` prefix giving kube-proxy the x_tables tools inside UML guests.

        The guests' kernel (Debian's user-mode-linux) has no nf_tables NAT (no
        ``nft_chain_nat``), so the host's default iptables-nft cannot make a nat chain
        there, and kube-proxy (which runs whatever ``iptables`` is on PATH) fails every
        sync. Its container image picks legacy or nft with a wrapper; here a folder of
        ``iptables*`` links to the ``-legacy`` tools comes first on PATH instead.
        """
        if not node.has_ipvs:  # namespace nodes share the host's kernel: nft NAT works
            return []
        folder = self.state_dir / "iptables-legacy"
        folder.mkdir(parents=True, exist_ok=True)
        for tool in LEGACY_TOOLS:
            link = folder / tool
            if not link.is_symlink():
                link.symlink_to(f"/usr/sbin/{tool.replace('tables', 'tables-legacy', 1)}")
        return ["env", f"PATH={folder}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]

    def kubelet_argv(self, ctx: LabContext, node: LabNode) -> list[str]:
        return [
            ctx.python, "-m", "svcproxy.cli", "lab", "kubelet", "--node", node.name,
            "--kubeconfig", str(ctx.kubeconfig(node.name)),
            "--state-dir", str(ctx.node_state_dir(node.name)),
            "--pod-cidr", node.pod_cidr, "--address", node.address,
            "--label", f"svcproxy.io/lab-ipvs={'true' if node.has_ipvs else 'false'}",
        ]

    def _check_owner(self, say: Say) -> None:
        try:
            owner = Path(OWNER_FILE.read_text().strip())
        except OSError:
            return
        if owner == self.state_dir:
            return
        if Lab(owner).alive():
            raise LabError(
                f"another lab runs from {owner} (one lab per machine: the addresses are fixed); "
                f"run `svcproxy lab down --state-dir {owner}` first"
            )
        say(f"a dead lab from {owner} left things behind; cleaning them up")
        Lab(owner).down(say)

    def _running_owner(self) -> Path | None:
        """The state folder of another lab that runs and holds the machine's one slot, if any.

        The owner file names it; failing that (the file removed by hand), the lab whose
        API server listens on 6443 does.
        """
        try:
            owner: Path | None = Path(OWNER_FILE.read_text().strip())
        except OSError:
            owner = None
        if owner is not None and owner != self.state_dir and Lab(owner).alive():
            return owner
        for pid in controlplane.listeners(API_PORT):
            lab = controlplane.lab_of(pid)
            if lab is not None and lab != self.state_dir:
                return lab
        return None

    def wait_nodes_ready(self, nodes: list[LabNode], say: Say, timeout: float = 120) -> None:
        api = KubeApi(self.admin_kubeconfig)
        names = {n.name for n in nodes}
        say(f"waiting for {len(names)} Nodes to be Ready")
        deadline = time.monotonic() + timeout
        not_ready: set[str] = set(names)
        while time.monotonic() < deadline:
            try:
                items = api.get("/api/v1/nodes").get("items", [])
            except (OSError, ApiError):
                items = []
            ready = {n["metadata"]["name"] for n in items if _node_ready(n)}
            not_ready = names - ready
            if not not_ready:
                return
            time.sleep(0.2)
        raise LabError(
            f"Nodes {sorted(not_ready)} not Ready after {timeout:.0f} s; see the kubelet logs in "
            f"{self.state_dir / 'logs'} and kube-controller-manager.log"
        )

    def start_svcproxy(self, ctx: LabContext, nodes: list[LabNode], say: Say) -> None:
        crds = sorted((REPO / "crds").glob("*.yaml"))
        if crds:
            proc = subprocess.run([str(ctx.bin_dir / "kubectl"), "--kubeconfig",
                                   str(self.admin_kubeconfig), "apply", "-f", str(REPO / "crds")],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise LabError(
                    f"the API server refused the CRDs in {REPO / 'crds'}: {proc.stderr.strip()}\n"
                    "fix the API models and run `make crds`, or start the lab with --no-svcproxy"
                )
            say(f"applied {len(crds)} CRD files from {REPO / 'crds'}")
        else:
            say(f"no CRDs in {REPO / 'crds'} yet; skipping")
        if importlib.util.find_spec("svcproxy.controller.main") is None:
            say("svcproxy.controller.main does not exist yet; not starting the operator")
        else:
            pid = read_pid(ctx.pid_dir / "operator.pid")
            if pid is None or not pid_alive(pid):
                say("starting the svcproxy operator")
                # KUBECONFIG too: client libraries read it when imported, before any flag.
                spawn([ctx.python, "-m", "svcproxy.cli", "operator", "--kubeconfig",
                       str(self.admin_kubeconfig)], ctx.log_dir / "operator.log",
                      ctx.pid_dir / "operator.pid",
                      env=dict(os.environ, KUBECONFIG=str(self.admin_kubeconfig)))
        if importlib.util.find_spec("svcproxy.agent.main") is None:
            say("svcproxy.agent.main does not exist yet; not starting agents")
            return
        for node in nodes:
            if not _process_alive(node, "agent"):
                say(f"starting the svcproxy agent on {node.name}")
                node.start_process("agent", self.agent_argv(ctx, node))

    def agent_argv(self, ctx: LabContext, node: LabNode) -> list[str]:
        return [ctx.python, "-m", "svcproxy.cli", "agent",
                "--kubeconfig", str(ctx.kubeconfig("admin-node")), "--node-name", node.name,
                *self.agent_args]

    # --- one node leaving and joining -------------------------------------------

    def node(self, name: str) -> tuple[LabNode, LabContext, dict[str, Any]]:
        """Node ``name`` of the running lab, the lab's context and state; LabError naming
        the nodes it has."""
        state = self._running_state()
        nodes = {n.name: n for n in self.nodes(state)}
        if name not in nodes:
            raise LabError(f"the lab in {self.state_dir} has no node {name!r}; it has {sorted(nodes)}")
        return nodes[name], self.context(state), state

    def stop_node(self, name: str, *, wipe: bool = False, say: Say = say_stderr) -> None:
        """Stop node ``name``'s agent, then its kubelet. Its Node object stays (the caller
        deletes it, or it goes NotReady when its Lease runs out) and its Pods keep running
        for the next kubelet to adopt. With ``wipe`` the node is destroyed too (its Pods,
        client namespace and kernel state; a guest is shut down) and the kubelet's state
        folder removed: :meth:`start_node` then brings up a new machine of that name."""
        node, ctx, _ = self.node(name)
        for process in ("agent", "kubelet"):
            node.stop_process(process)
        say(f"stopped the agent and the kubelet on {name}")
        if wipe:
            node.destroy()
            shutil.rmtree(ctx.node_state_dir(name), ignore_errors=True)
            say(f"removed {name} and its kubelet's state")

    def start_node(self, name: str, *, agent: bool = True, say: Say = say_stderr) -> None:
        """Bring node ``name`` back: (re)create it, start its kubelet (which registers the
        Node again if it was deleted) and wait until the Node is Ready; then, when the lab
        runs svcproxy and ``agent`` is true, start its agent, as a DaemonSet would."""
        node, ctx, state = self.node(name)
        node.create(ctx)
        if not _process_alive(node, "kubelet"):
            say(f"starting the lab kubelet on {name}")
            node.start_process("kubelet", self.kubelet_argv(ctx, node))
        self.wait_nodes_ready([node], say)
        if agent and state.get("svcproxy"):
            self.start_agent(name, say=say)

    def start_agent(self, name: str, *, say: Say = say_stderr) -> None:
        """Start node ``name``'s agent (again, if one runs)."""
        node, ctx, _ = self.node(name)
        say(f"starting the svcproxy agent on {name}")
        node.start_process("agent", self.agent_argv(ctx, node))

    # --- down / status ----------------------------------------------------------

    def down(self, say: Say = say_stderr) -> None:
        """Stop everything and remove every namespace, link and route; safe to repeat.

        While another lab runs (see :meth:`_running_owner`), only this lab's own processes
        and files go: the namespaces, links and routes have fixed names and are that
        lab's now. (A fixture tearing down a lab whose ``up`` was refused lands here.)
        """
        require_root()
        state = self.load()
        pid_dir = self.state_dir / "pids"
        other = self._running_owner()
        terminate(pid_dir / "operator.pid")
        if state is not None and other is None:
            for node in self.nodes(state):
                say(f"removing {node.name}")
                node.destroy()
        # Whatever else has a pid file (a node kind that left one behind, the control plane).
        for pid_file in sorted(pid_dir.glob("node-*.pid")):
            terminate(pid_file)
        if state is not None:
            controlplane.stop(self.context(state))
        for component in controlplane.COMPONENTS:
            terminate(pid_dir / f"{component}.pid")
        if other is None:
            network.sweep()
        else:
            say(f"another lab runs from {other}: its namespaces, links and routes stay")
        for sub in ("etcd", "nodes", "pids"):
            shutil.rmtree(self.state_dir / sub, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        try:
            if Path(OWNER_FILE.read_text().strip()) == self.state_dir:
                OWNER_FILE.unlink()
        except OSError:
            pass
        say(f"lab in {self.state_dir} is down (certificates and logs kept)")

    def status(self) -> str:
        state = self.load()
        if state is None:
            return f"no lab in {self.state_dir}"
        lines = [f"lab in {self.state_dir}: nodes {state['nodes']}", "processes:"]
        for pid_file in sorted((self.state_dir / "pids").glob("*.pid")):
            pid = read_pid(pid_file)
            alive = pid is not None and pid_alive(pid)
            lines.append(f"  {pid_file.stem:<28} pid {pid}  {'running' if alive else 'DEAD'}")
        if self.alive():
            try:
                items = KubeApi(self.admin_kubeconfig).get("/api/v1/nodes").get("items", [])
            except (OSError, ApiError) as exc:
                items = []
                lines.append(f"API server not answering: {exc}")
            lines.append("nodes:")
            for n in items:
                ready = "Ready" if _node_ready(n) else "NotReady"
                lines.append(f"  {n['metadata']['name']:<10} {ready:<9} "
                             f"podCIDR {n['spec'].get('podCIDR')}")
        else:
            lines.append("the API server is not running: stale state; run `svcproxy lab down`")
        lines.append(f"KUBECONFIG={self.admin_kubeconfig}")
        return "\n".join(lines)


def _process_alive(node: LabNode, name: str) -> bool:
    check = getattr(node, "process_alive", None)
    return bool(check(name)) if callable(check) else False


def _node_ready(node: dict[str, Any]) -> bool:
    conds = node.get("status", {}).get("conditions") or []
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
    tainted = any(t.get("key") == "node.kubernetes.io/not-ready"
                  for t in node.get("spec", {}).get("taints") or [])
    return ready and not tainted
