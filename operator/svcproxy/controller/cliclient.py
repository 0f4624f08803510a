"""The command line's one Kubernetes client: the synchronous ``kubernetes`` library.

``svcproxy plan`` and ``svcproxy status`` read the cluster once and exit, so a
blocking client fits them; the operator process uses kopf and
``kubernetes_asyncio`` (:mod:`svcproxy.controller.client`), the agent its own
(:mod:`svcproxy.agent.apiclient`). Imported lazily: the library is loaded
only by the subcommands that read a cluster.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client, config


def api_client(kubeconfig: str | None) -> Any:
    """A client from ``kubeconfig``, else $KUBECONFIG or ~/.kube/config, else in-cluster."""
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    else:
        try:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def core(api: Any) -> Any:
    return client.CoreV1Api(api)


def discovery(api: Any) -> Any:
    return client.DiscoveryV1Api(api)


def custom(api: Any) -> Any:
    return client.CustomObjectsApi(api)
