"""``svcproxy operator``: run the kopf operator with production settings.

Parses the command line, sets up JSON logs, the Prometheus endpoint and
peering, then hands over to ``kopf.run`` with the handlers of
:mod:`svcproxy.controller.handlers`. Peering: with the kopf peering CRDs
installed (``crds/kopf-peering.yaml``) the operator joins peering NAME
(creating the peering object if needed) so that of two replicas one is
active; without them it warns and runs standalone, which is what a lab or a
single replica needs. Called by ``svcproxy.cli``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import kopf

from svcproxy.controller import client, handlers, metrics
from svcproxy.controller.cache import Cache, parse_selector
from svcproxy.controller.reconciler import Reconciler

log = logging.getLogger("svcproxy.operator")
T = TypeVar("T")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", help="watch only this namespace")
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--peering", default="svcproxy", help="kopf peering name (default: svcproxy)")
    parser.add_argument(
        "--priority", type=int, default=0, help="peering priority: the highest-priority replica is active"
    )
    parser.add_argument("--standalone", action="store_true", help="no peering: the only replica")
    parser.add_argument("--metrics-port", type=int, default=9100, help="Prometheus /metrics port (0: off)")
    parser.add_argument("--liveness-port", type=int, default=8080, help="liveness /healthz port (0: off)")
    parser.add_argument(
        "--handover-delay",
        type=float,
        default=3.0,
        help="seconds between removing a Service's handover label and deleting its program (default 3)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="kopf worker limit, 0 for none (default 0: the handlers only update a cache, and a limit "
        "makes events queue behind idle workers)",
    )
    parser.add_argument(
        "--watch-server-timeout",
        type=int,
        default=60,
        help="seconds the API server keeps a watch (default 60)",
    )
    parser.add_argument(
        "--resync-seconds", type=float, default=300, help="full re-list of every kind (default 300 s)"
    )
    parser.add_argument(
        "--agent-node-selector",
        default="",
        metavar="KEY=VALUE,...",
        help="the agents' nodeSelector: only Ready Nodes matching it must report before a Service "
        "counts as Programmed and is taken from kube-proxy (default: every Ready Node)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logs")


def _peering_available(namespace: str | None) -> bool:
    """True when the kopf peering CRD for this scope exists ($KUBECONFIG, else in-cluster)."""
    return asyncio.run(_with_api(lambda api: client.peering_available(api, namespace)))


def _ensure_peering_object(name: str, namespace: str | None) -> None:
    asyncio.run(_with_api(lambda api: client.ensure_peering_object(api, name, namespace)))


async def _with_api(call: Callable[[Any], Awaitable[T]]) -> T:
    """``call`` with a kubernetes_asyncio client that is closed afterwards (before kopf starts)."""
    api = await client.connect(None)
    try:
        return await call(api)
    finally:
        await api.close()


def run(args: argparse.Namespace) -> int:
    try:
        selector = parse_selector(args.agent_node_selector)
    except ValueError as err:
        print(f"svcproxy operator: --agent-node-selector: {err}", file=sys.stderr)
        return 2
    if args.kubeconfig:
        if not os.path.isfile(args.kubeconfig):
            print(
                f"svcproxy operator: kubeconfig {args.kubeconfig} does not exist: give an existing file",
                file=sys.stderr,
            )
            return 2
        # kopf's own login reads $KUBECONFIG; the writer and the peering check read it too.
        os.environ["KUBECONFIG"] = os.path.abspath(args.kubeconfig)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON, log_refkey="k8s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    if not args.verbose:
        # kopf logs every handled watch event at INFO ("Handler 'on_pod' succeeded"): with a
        # cluster-wide Pod watch that drowns the operator's own lines.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    standalone = args.standalone
    if not standalone:
        try:
            available = _peering_available(args.namespace)
        except Exception as err:
            log.warning("cannot check for the kopf peering CRD (%s); running standalone", err)
            available = False
        if available:
            _ensure_peering_object(args.peering, args.namespace)
        else:
            log.warning(
                "the kopf peering CRD is not installed (apply crds/kopf-peering.yaml for two replicas); "
                "running standalone: do not run a second replica"
            )
            standalone = True
    metrics.serve(args.metrics_port)
    cache = Cache(agent_node_selector=selector)
    memo = OperatorMemo(options=args, cache=cache)
    memo.reconciler = Reconciler(cache, _NoWriter(), handover_delay=args.handover_delay)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    kopf.run(
        standalone=standalone,
        peering_name=None if standalone else args.peering,
        priority=args.priority,
        clusterwide=not args.namespace,
        namespaces=[args.namespace] if args.namespace else (),
        liveness_endpoint=liveness,
        memo=memo,
    )
    return 0


class OperatorMemo(kopf.Memo):
    """The operator's memo, shared by every object's handlers.

    kopf gives each watched object a copy of the memo and keeps it as long as the object
    exists. The handlers read only operator-wide state
    from it (cache, reconciler, options, the API client), never per-object state, so one
    memo serves them all: a "copy" is the memo itself."""

    def __copy__(self) -> OperatorMemo:
        return self


class _NoWriter:
    """Placeholder until the startup handler connects the real writer."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the operator is not connected to the API server yet")


# Registering the handlers is importing them; keep the reference so linters see the use.
_HANDLERS = handlers
