"""``svcproxy agent``: the node agent's command line and its asyncio main loop.

``configure`` adds the options; ``run`` starts one event loop that holds
the ProxyVirtualServer watch (:mod:`watch`), the sync loop driving
:class:`svcproxy.agent.agent.Agent` from the change tracker, the ProxyNode
report loop (:mod:`kube`), and an HTTP server with ``/healthz`` and
``/metrics``. The userspace proxier runs in this same loop, so kernel work
must not block it: proxiers run netlink and iptables-restore in executor
threads. The first sync waits for the first complete list (a full sync
with a partial table would sweep live services). ``--cleanup`` removes
everything every mode owns and exits. Called by :mod:`svcproxy.cli`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from aiohttp import web

from svcproxy.agent import logs
from svcproxy.agent.agent import Agent
from svcproxy.agent.apiclient import ApiClient, ConfigError, load_incluster, load_kubeconfig
from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.healthcheck import HealthServer
from svcproxy.agent.kube import ProxyNodeWriter
from svcproxy.agent.metrics import Metrics
from svcproxy.agent.report import ReportThrottle, build_status
from svcproxy.agent.tracker import ChangeTracker
from svcproxy.agent.trust import AddressBook, network, port_range
from svcproxy.agent.watch import ListWatch, NodeWatch, PvsWatch, ServiceWatch, _describe
from svcproxy.base import MODES, Mode
from svcproxy.dataplane.capabilities import ModeCapabilities
from svcproxy.dataplane.modes import DataplaneConfig, build_proxier
from svcproxy.dataplane.proxier import Proxier

log = logging.getLogger("svcproxy.agent")


def _load_malloc_trim() -> ctypes._NamedFuncPointer | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> None:
    """Hand the heap pages a full sync freed back to the kernel.

    A full sync's transient objects (the read-back of every rule, restore inputs) are
    freed when it ends, but glibc keeps the pages until malloc_trim returns them.
    Called after each full sync.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster config)")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                        help="this node's name (default: $NODE_NAME)")
    parser.add_argument("--full-sync-interval", type=float, default=60.0,
                        help="seconds between full reconciles that repair drift (default 60)")
    parser.add_argument("--min-sync-interval", type=float, default=0.05,
                        help="minimum seconds between the starts of two syncs; bursts coalesce"
                        " (default 0.05)")
    parser.add_argument("--sync-pause-ratio", type=float, default=1.0,
                        help="after a partial sync, wait this many times its duration before the"
                        " next one (at most --max-sync-pause), so costly syncs coalesce more;"
                        " 0: off (default 1.0)")
    parser.add_argument("--max-sync-pause", type=float, default=1.0,
                        help="upper bound in seconds of that pause (default 1.0)")
    parser.add_argument("--max-sync-batch", type=int, default=200,
                        help="at most this many changed Services per partial sync, oldest first; no"
                        " pause while that many are pending (iptables-restore's cost grows faster"
                        " than its input); 0: no limit (default 200)")
    parser.add_argument("--metrics-port", type=int, default=9101, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--health-port", type=int, default=9102, help="/healthz port (0: off)")
    parser.add_argument("--bind-address", default="0.0.0.0", help="address of the HTTP endpoints")
    parser.add_argument("--masquerade-all", action="store_true", help="masquerade all proxied traffic")
    parser.add_argument("--cluster-cidr", action="append", default=None,
                        help="Pod CIDR(s); traffic from outside them is masqueraded (default 10.244.0.0/16)")
    parser.add_argument("--extra-pod-cidr", action="append", default=None, metavar="CIDR",
                        help="where real servers may also be, besides every Node's spec.podCIDRs and"
                        " addresses: for a CNI that does not allocate Pods from the Nodes' podCIDRs"
                        " (repeatable; a program with a real server outside all of them is refused)")
    parser.add_argument("--node-port-range", default="30000-32767", metavar="FIRST-LAST",
                        help="the cluster's --service-node-port-range: a program's node port outside"
                        " it is refused (default 30000-32767)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated proxy modes this agent may run (default: all);"
                        " Services asking for another run in iptables mode, or fail if that is off")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove everything the agent owns in the kernel (every mode) and exit")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def version() -> str:
    try:
        return metadata.version("svcproxy")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def build_proxiers(
    cfg: DataplaneConfig, modes: list[str]
) -> tuple[dict[Mode, Proxier], dict[Mode, ModeCapabilities]]:
    """Every mode's proxier that can run here, and the capabilities of those that cannot."""
    usable: dict[Mode, Proxier] = {}
    unusable: dict[Mode, ModeCapabilities] = {}
    for mode in MODES:
        if mode not in modes:
            why = f"{mode} mode is turned off on this agent (--modes)"
            unusable[mode] = ModeCapabilities(mode, False, why)
            continue
        try:
            proxier = build_proxier(mode, cfg)
        except Exception as err:  # a mode's package missing or failing to import
            unusable[mode] = ModeCapabilities(mode, False, f"{mode} mode cannot start: {err}")
            log.warning("mode unavailable", extra={"mode": mode, "error": repr(err)})
            continue
        caps = proxier.capabilities()
        if caps.available:
            usable[mode] = proxier
        else:
            unusable[mode] = caps
            log.warning("mode unavailable", extra={"mode": mode, "reason": caps.reason})
    return usable, unusable


class AgentProcess:
    """The running agent: watch, sync loop, report loop and HTTP endpoints."""

    def __init__(self, args: argparse.Namespace, agent: Agent, api: ApiClient) -> None:
        self.args = args
        self.agent = agent
        self.api = api
        self.listed = asyncio.Event()
        self.watch = PvsWatch(
            api,
            on_list=self._on_list,
            on_upsert=agent.upsert,  # each wakes the sync loop when something changed
            on_delete=agent.delete,
            on_restart=lambda reason: agent.metrics.watch_restarts.labels(reason).inc(),
        )
        self.watch.node_name = args.node_name
        # What programs are checked against (svcproxy.agent.trust): Services and Nodes,
        # kept as addresses only. The first sync waits for these lists too.
        self.guards: list[ListWatch[Any]] = []
        self.guards_listed: list[asyncio.Event] = []
        if agent.guard is not None:
            self._guard_watch(ServiceWatch, agent.services_listed, agent.service_changed,
                              agent.service_deleted)
            self._guard_watch(NodeWatch, agent.nodes_listed, agent.node_changed, agent.node_deleted)
        self.writer = ProxyNodeWriter(api, args.node_name, ReportThrottle(1.0))
        self.report_wake = asyncio.Event()
        # The Services' healthCheckNodePorts (externalTrafficPolicy Local), on every address.
        self.health = HealthServer(healthy=lambda: self.healthy()[0])
        self.health_wake = asyncio.Event()

        # Every sync wakes the report, also the partial syncs a full sync runs inside
        # itself: their changes should not wait for the full sync to end to be reported.
        def synced(_outcome: object) -> None:
            self.report_wake.set()
            self.health_wake.set()

        agent.on_synced = synced

    def _guard_watch(self, kind: type[ListWatch[Any]], on_list: Callable[[Iterable[Any]], None],
                     on_upsert: Callable[[Any], None], on_delete: Callable[[str], None]) -> None:
        listed = asyncio.Event()

        def listed_all(items: Iterable[Any]) -> None:
            on_list(items)
            listed.set()

        self.guards_listed.append(listed)
        self.guards.append(kind(
            self.api, on_list=listed_all, on_upsert=on_upsert, on_delete=on_delete,
            on_restart=lambda reason: self.agent.metrics.watch_restarts.labels(reason).inc(),
        ))

    def _on_list(self, programs: Iterable[DesiredProgram]) -> None:
        self.agent.replace_all(programs)
        self.listed.set()

    @property
    def watches_live(self) -> bool:
        return self.watch.live and all(w.live for w in self.guards)

    def healthy(self) -> tuple[bool, str]:
        if not self.watch.live:
            return False, "the ProxyVirtualServer watch is not live"
        down = [w.kind for w in self.guards if not w.live]
        if down:
            return False, f"the {' and '.join(down)} watch is not live (programs cannot be checked)"
        if not self.agent.synced_once:
            return False, "the first full sync has not finished"
        if not self.agent.last_sync_ok:
            return False, "the last sync had errors (see the ProxyNode status)"
        return True, "ok"

    async def sync_loop(self) -> None:
        await self.listed.wait()
        for listed in self.guards_listed:  # a program is checked against complete lists only
            await listed.wait()
        await self.agent.run_forever(after_full=trim_heap)

    async def health_loop(self) -> None:
        """Keep the health-check listeners as the synced programs ask."""
        while True:
            await self.health_wake.wait()
            self.health_wake.clear()
            await self.health.update(self.agent.health_checks())

    async def report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.report_wake.wait(), timeout=10)
            self.report_wake.clear()
            now = time.monotonic()
            delay = self.writer.throttle.due_at() - now
            if delay > 0:
                await asyncio.sleep(delay)  # coalesce: one write per second at most
            snap = self.agent.snapshot(watch_live=self.watches_live)
            status = build_status(snap, self.writer.throttle.sent)
            try:
                if await self.writer.write(status, time.monotonic()):
                    self.agent.metrics.report_writes.labels("ok").inc()
            except Exception as err:
                self.agent.metrics.report_writes.labels("error").inc()
                log.warning("ProxyNode write failed (%s); retrying", _describe(err))
                await asyncio.sleep(2)
                self.report_wake.set()

    async def serve_http(self) -> list[web.AppRunner]:
        runners: list[web.AppRunner] = []

        async def healthz(_: web.Request) -> web.Response:
            ok, why = self.healthy()
            return web.Response(status=200 if ok else 503, text=why + "\n")

        async def livez(_: web.Request) -> web.Response:
            # Liveness: the event loop answers. Sync health is /healthz (readiness).
            return web.Response(status=200, text="ok\n")

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.agent.metrics.render(),
                                headers={"Content-Type": "text/plain; version=0.0.4"})

        routes = {self.args.health_port: [("/healthz", healthz), ("/readyz", healthz), ("/livez", livez)],
                  self.args.metrics_port: [("/metrics", metrics)]}
        if self.args.health_port == self.args.metrics_port:
            routes = {self.args.health_port: routes[self.args.health_port] + routes[self.args.metrics_port]}
        for port, handlers in routes.items():
            if not port:
                continue
            app = web.Application()
            for path, handler in handlers:
                app.router.add_get(path, handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.args.bind_address, port).start()
            runners.append(runner)
        return runners


async def _load_config(kubeconfig: str | None) -> ApiClient:
    """The API client from --kubeconfig, or in-cluster; raises ConfigError saying what is wrong."""
    return ApiClient(load_kubeconfig(Path(kubeconfig)) if kubeconfig else load_incluster())


def prepare(args: argparse.Namespace) -> tuple[dict[Mode, Proxier], dict[Mode, ModeCapabilities]] | None:
    """Build the proxiers before the event loop starts (pyroute2's synchronous sockets
    refuse to be made inside a running loop); None when --modes is wrong."""
    cfg = DataplaneConfig(
        cluster_cidrs=tuple(args.cluster_cidr or DataplaneConfig.cluster_cidrs),
        masquerade_all=args.masquerade_all,
    )
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        log.error("unknown modes in --modes", extra={"unknown": unknown, "valid": list(MODES)})
        return None
    return build_proxiers(cfg, modes)


def _agent(
    args: argparse.Namespace, usable: dict[Mode, Proxier], unusable: dict[Mode, ModeCapabilities]
) -> Agent:
    """The agent the flags describe; ValueError for a bad --extra-pod-cidr or --node-port-range."""
    extra = tuple(network(c) for c in args.extra_pod_cidr or ())
    node_ports = port_range(args.node_port_range)
    return Agent(
        usable,
        node_name=args.node_name,
        tracker=ChangeTracker(min_interval=args.min_sync_interval, pause_ratio=args.sync_pause_ratio,
                              max_pause=args.max_sync_pause, max_batch=args.max_sync_batch,
                              full_interval=args.full_sync_interval,
                              now=time.monotonic()),
        metrics=Metrics(),
        agent_version=version(),
        kernel_release=os.uname().release,
        unavailable=unusable,
        guard=AddressBook(extra=extra, node_ports=node_ports),
    )


async def _cleanup(agent: Agent) -> int:
    results = await agent.cleanup()
    for r in results:
        log.info("cleaned up", extra={"mode": r.mode, "operations": dict(r.operations),
                                      "errors": [str(e) for e in r.errors]})
    return 0 if all(r.ok for r in results) else 1


async def _serve(proc: AgentProcess, modes: list[str], unavailable: list[str]) -> int:
    """Run the watches, syncs and reports until SIGTERM/SIGINT or a task fails."""
    runners = await proc.serve_http()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loops = [proc.watch.run(), *(w.run() for w in proc.guards), proc.sync_loop(), proc.report_loop(),
             proc.health_loop(), proc.writer.watch(proc.report_wake.set)]
    tasks = [asyncio.create_task(c) for c in loops]
    log.info("agent started", extra={"modes": modes, "unavailable": unavailable})
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    rc = 0
    for task in done:
        if task is not stopper and task.exception() is not None:
            log.error("agent task failed", exc_info=task.exception())
            rc = 1
    for task in [*tasks, stopper]:
        task.cancel()
    await asyncio.gather(*tasks, stopper, return_exceptions=True)
    await proc.health.close()
    for runner in runners:
        await runner.cleanup()
    return rc


async def amain(
    args: argparse.Namespace, usable: dict[Mode, Proxier], unusable: dict[Mode, ModeCapabilities]
) -> int:
    try:
        try:
            agent = _agent(args, usable, unusable)
        except ValueError as err:
            log.error("bad flag: %s", err)
            return 2
        if args.cleanup:
            return await _cleanup(agent)
        try:
            api = await _load_config(args.kubeconfig)
        except ConfigError as err:
            log.error("cannot reach the API server: %s", err)
            return 2
        try:
            return await _serve(AgentProcess(args, agent, api), sorted(usable), sorted(unusable))
        finally:
            await api.close()
    finally:
        # Leave the kernel as it is: a restarted agent adopts it without interrupting traffic.
        for proxier in usable.values():
            await proxier.close()


def run(args: argparse.Namespace) -> int:
    logs.setup(args.node_name or "?", getattr(logging, args.log_level.upper()))
    if not args.node_name and not args.cleanup:
        log.error("no node name: pass --node-name or set NODE_NAME (the downward API's spec.nodeName)")
        return 2
    built = prepare(args)
    if built is None:
        return 2
    return asyncio.run(amain(args, *built))
