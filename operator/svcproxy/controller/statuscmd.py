"""``svcproxy status``: policies, programs and node reports at a glance.

Reads ClusterServiceProxyPolicies (their counts and problem rows),
ServiceProxyPolicies (with their per-Service rows and conditions),
ProxyVirtualServers and ProxyNodes from the cluster and prints short
tables. Read-only. Called by ``svcproxy.cli``; :func:`render` is pure and
unit-tested.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

JSON = dict[str, Any]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="only this namespace")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace (default)")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


def _cond(obj: JSON, type_: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return str(c.get("status"))
    return "-"


def _mode_scheduler(spec: JSON) -> list[str]:
    """MODE and SCHEDULER cells of either policy kind (the API's defaults when unset)."""
    mode = spec.get("mode", "ipvs")
    return [mode, (spec.get("ipvs") or {}).get("scheduler", "-" if mode == "iptables" else "rr")]


def _policy_row(p: JSON) -> list[str]:
    meta, spec, status = p["metadata"], p.get("spec") or {}, p.get("status") or {}
    return [
        meta.get("namespace", ""),
        meta["name"],
        *_mode_scheduler(spec),
        _cond(p, "Accepted"),
        _cond(p, "Programmed"),
        _cond(p, "Conflicted"),
        _cond(p, "Degraded"),
        status.get("programmed") or "-",
    ]


def _service_rows(p: JSON) -> list[list[str]]:
    meta = p["metadata"]
    return [
        [
            meta.get("namespace", ""),
            row.get("name", ""),
            meta["name"],
            row.get("state", ""),
            row.get("mode") or "-",
            f"{row.get('nodesProgrammed', 0)}/{row.get('nodesTotal', 0)}",
            (row.get("message") or "")[:80],
        ]
        for row in (p.get("status") or {}).get("services") or []
    ]


def _cluster_row(p: JSON) -> list[str]:
    spec, status = p.get("spec") or {}, p.get("status") or {}
    summary = status.get("summary") or {}
    return [
        p["metadata"]["name"],
        *_mode_scheduler(spec),
        _cond(p, "Accepted"),
        _cond(p, "Programmed"),
        str(summary.get("namespaces", 0)),
        str(summary.get("selected", 0)),
        str(summary.get("programmed", 0)),
        str(summary.get("pending", 0)),
        str(summary.get("overridden", 0)),
        str(summary.get("conflicted", 0)),
        str(summary.get("notProxied", 0)),
    ]


def _problem_rows(p: JSON, namespace: str | None) -> list[list[str]]:
    # A cluster policy keeps rows only for Services that need a look (status.problems).
    return [
        [
            row.get("namespace", ""),
            row.get("name", ""),
            f"ClusterServiceProxyPolicy/{p['metadata']['name']}",
            row.get("state", ""),
            "-",
            "-",
            (row.get("message") or "")[:80],
        ]
        for row in (p.get("status") or {}).get("problems") or []
        if namespace is None or row.get("namespace") == namespace
    ]


def _program_row(v: JSON) -> list[str]:
    return [
        v["metadata"].get("namespace", ""),
        v["metadata"]["name"],
        v["spec"].get("policy", {}).get("name", ""),
        v["spec"].get("mode", ""),
        v["spec"].get("scheduler") or "-",
        v["spec"].get("summary", {}).get("vips", ""),
        v["spec"].get("summary", {}).get("endpoints", ""),
        v["spec"].get("contentHash", ""),
    ]


def _node_row(n: JSON) -> list[str]:
    st = n.get("status") or {}
    return [
        n["metadata"]["name"],
        str((st.get("capabilities") or {}).get("ipvs", "-")),
        st.get("modesSummary") or "-",
        str(len(st.get("applied") or {})),
        str(len(st.get("errors") or [])),
        st.get("lastSyncTime") or "-",
    ]


def render(
    policies: list[JSON],
    programs: list[JSON],
    nodes: list[JSON],
    cluster_policies: list[JSON] | None = None,
    namespace: str | None = None,
) -> str:
    """The tables (pure); the cluster policies' only when there are any, their problem rows
    only of ``namespace`` when one is given."""
    prow = [_policy_row(p) for p in policies]
    srow = [row for p in policies for row in _service_rows(p)]
    srow += [row for p in cluster_policies or [] for row in _problem_rows(p, namespace)]
    parts = [] if not cluster_policies else [
        "CLUSTER POLICIES\n"
        + _table(
            ["NAME", "MODE", "SCHEDULER", "ACCEPTED", "PROGRAMMED", "NAMESPACES", "SELECTED",
             "PROGRAMMED-SVCS", "PENDING", "OVERRIDDEN", "CONFLICTED", "NOT-PROXIED"],
            [_cluster_row(p) for p in cluster_policies],
        )
    ]
    parts += [
        "POLICIES\n"
        + _table(
            [
                "NAMESPACE",
                "NAME",
                "MODE",
                "SCHEDULER",
                "ACCEPTED",
                "PROGRAMMED",
                "CONFLICTED",
                "DEGRADED",
                "NODES",
            ],
            prow,
        ),
        "SERVICES\n" + _table(["NAMESPACE", "SERVICE", "POLICY", "STATE", "MODE", "NODES", "MESSAGE"], srow),
        "PROGRAMS\n"
        + _table(["NAMESPACE", "NAME", "POLICY", "MODE", "SCHEDULER", "VIPS", "ENDPOINTS", "CONTENT"],
                 [_program_row(v) for v in programs]),
        "NODES\n" + _table(["NAME", "IPVS", "MODES", "APPLIED", "ERRORS", "LAST-SYNC"],
                            [_node_row(n) for n in nodes]),
    ]
    return "\n\n".join(parts) + "\n"


def run(args: argparse.Namespace) -> int:
    from svcproxy.controller import cliclient

    try:
        custom = cliclient.custom(cliclient.api_client(args.kubeconfig))
        group, version = "svcproxy.io", "v1alpha1"

        def listed(plural: str) -> list[JSON]:
            out: Any
            if args.namespace:
                out = custom.list_namespaced_custom_object(group, version, args.namespace, plural)
            else:
                out = custom.list_cluster_custom_object(group, version, plural)
            items: list[JSON] = out.get("items", [])
            return items

        policies, programs = listed("serviceproxypolicies"), listed("proxyvirtualservers")
        node_list: Any = custom.list_cluster_custom_object(group, version, "proxynodes")
        nodes: list[JSON] = node_list.get("items", [])
        cluster_list: Any = custom.list_cluster_custom_object(group, version, "clusterserviceproxypolicies")
        cluster: list[JSON] = cluster_list.get("items", [])
    except Exception as err:
        print(f"svcproxy status: cannot read the cluster: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(render(policies, programs, nodes, cluster, args.namespace))
    return 0
