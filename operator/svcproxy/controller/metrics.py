"""Prometheus metrics of the operator (served by ``svcproxy operator --metrics-port``).

Counted by the reconciler: reconciles by result, compile time, writes of
ProxyVirtualServers (create/replace/delete), Service label changes and
errors. Names carry the ``svcproxy_operator_`` prefix.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

RECONCILES = Counter("svcproxy_operator_reconciles", "Namespace reconciles, by result", ["result"])
COMPILE_SECONDS = Histogram(
    "svcproxy_operator_compile_seconds",
    "Time to plan one namespace (compile every selected Service)",
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
)
PROGRAM_WRITES = Counter("svcproxy_operator_program_writes", "ProxyVirtualServer writes", ["op"])
LABEL_WRITES = Counter("svcproxy_operator_handover_label_writes", "Handover label changes", ["op"])
ERRORS = Counter("svcproxy_operator_errors", "Errors while reconciling, by stage", ["stage"])


def serve(port: int) -> None:
    """Serve /metrics on ``port`` (0: do not serve)."""
    if port:
        start_http_server(port)
