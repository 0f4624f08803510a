"""Prometheus metrics of the agent, in a registry of its own.

One :class:`Metrics` per agent (tests build their own, so registries never
collide). The agent records: network programming latency (a
ProxyVirtualServer change seen by the watch -> the kernel updated),
sync duration by kind (full/partial), kernel operations by mode and kind,
virtual servers / real servers / rules owned by mode, sync errors by mode
and action, watch restarts. Served as text by :mod:`svcproxy.agent.http`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Network programming latency: kube-proxy's buckets go from ms to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
SYNC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.programming_latency = Histogram(
            "svcproxy_network_programming_duration_seconds",
            "ProxyVirtualServer change seen by the agent -> kernel updated",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sync_duration = Histogram(
            "svcproxy_sync_duration_seconds",
            "Duration of one sync of the data plane",
            ["kind"],
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.operations = Counter(
            "svcproxy_kernel_operations_total",
            "Kernel operations applied, by mode and kind",
            ["mode", "kind"],
            registry=r,
        )
        self.errors = Counter(
            "svcproxy_sync_errors_total",
            "Errors of syncs, by mode and action",
            ["mode", "action"],
            registry=r,
        )
        self.virtual_servers = Gauge(
            "svcproxy_virtual_servers_owned", "Virtual servers owned, by mode", ["mode"], registry=r
        )
        self.real_servers = Gauge(
            "svcproxy_real_servers_owned", "Real servers owned, by mode", ["mode"], registry=r
        )
        self.rules = Gauge("svcproxy_rules_owned", "Netfilter rules owned, by mode", ["mode"], registry=r)
        self.services = Gauge("svcproxy_services_applied", "ProxyVirtualServers applied", registry=r)
        self.watch_restarts = Counter(
            "svcproxy_watch_restarts_total", "Watch restarts, by reason", ["reason"], registry=r
        )
        self.report_writes = Counter(
            "svcproxy_proxynode_writes_total", "ProxyNode status writes, by result", ["result"], registry=r
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
