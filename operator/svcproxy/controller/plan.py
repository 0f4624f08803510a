"""``svcproxy plan -f policy.yaml``: what a policy would program, without writing anything.

Reads the policy file, validates it with the same rules the API server
applies, reads the policy's namespace from the cluster (Services,
EndpointSlices, Pod labels when the policy has weights, the other policies
there) and runs the operator's own planner on it with the file's policy in
place of any stored one of that name. Prints one table per Service in the
style of ``ipvsadm -Ln``, plus the Services the policy would not proxy and
why (conflicts included). A ClusterServiceProxyPolicy file is planned the same
way in every namespace it selects, beside the stored policies of both kinds.
Called by ``svcproxy.cli``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from svcproxy.api.clusterpolicy import ClusterServiceProxyPolicy
from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.api.program import ProxyVirtualServerSpec, usable_endpoints
from svcproxy.base import IPFamily
from svcproxy.compile.cluster import (
    CLUSTER_PREFIX,
    cluster_name,
    for_namespace,
    is_cluster,
    parse_cluster,
    selects_namespace,
)
from svcproxy.compile.planner import NamespaceView, plan_namespace

JSON = dict[str, Any]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-f", "--filename", required=True, help="policy YAML file ('-' for stdin)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("-n", "--namespace", help="namespace when the file names none (default: default)")


def format_program(namespace: str, spec: ProxyVirtualServerSpec) -> str:
    """One program as an ``ipvsadm -Ln``-style table."""
    lines = [
        f"# {namespace}/{spec.service.name}  policy {spec.policy.name}  mode {spec.mode}  "
        f"content {spec.content_hash}  endpoints {spec.summary.endpoints}",
        "Prot LocalAddress:Port Scheduler Flags",
        "  -> RemoteAddress:Port           Forward Weight  State",
    ]
    for vs in spec.virtual_servers:
        host = IPFamily.bracketed(vs.address)
        sched = vs.scheduler or "random (iptables)"
        flags = f" ({','.join(vs.scheduler_flags)})" if vs.scheduler_flags else ""
        persist = f" persistent {vs.persistence_timeout_seconds}" if vs.persistence_timeout_seconds else ""
        lines.append(f"{vs.protocol:<4} {host}:{vs.port} {sched}{flags}{persist}")
        if not vs.real_servers:
            lines.append("  (no endpoints: connections are refused)")
        # As a node serves the cluster scope: terminating endpoints drain, unless none is ready.
        usable, _ = usable_endpoints(vs.real_servers, [False] * len(vs.real_servers))
        for rs in vs.real_servers:
            rhost = IPFamily.bracketed(rs.address)
            used = (rs.address, rs.port) in usable
            state = ("ready" if rs.ready else ("serving-terminating" if used else "draining")
                     if rs.terminating else "not-ready")
            weight = rs.weight if used else 0
            lines.append(f"  -> {f'{rhost}:{rs.port}':<28} {'Masq':<7} {weight:<7} {state}")
    return "\n".join(lines)


def render(namespace: str, policy_name: str, view: NamespaceView) -> str:
    """The text `plan` prints for ``policy_name`` in ``view`` (pure)."""
    plan = plan_namespace(view)
    out: list[str] = []
    for _, spec in sorted(plan.compiled.items()):
        if spec.policy.name == policy_name:
            out.append(format_program(namespace, spec))
    status = plan.statuses.get(policy_name) or next(
        (
            (p.get("status") or {})
            for p in view.policies
            if (p.get("metadata") or {}).get("name") == policy_name
        ),
        {},
    )
    for row in status.get("services", []):
        if row.get("state") in ("NotProxied", "Conflicted"):
            out.append(f"# {namespace}/{row['name']}: {row['state']}: {row.get('message', '')}")
    part = plan.cluster.get(cluster_name(policy_name)) if is_cluster(policy_name) else None
    for service, state, message in part.problems if part is not None else ():
        out.append(f"# {namespace}/{service}: {state}: {message}")
    accepted = next((c for c in status.get("conditions", []) if c.get("type") == "Accepted"), None)
    if accepted and accepted.get("status") != "True":
        out.append(f"# not accepted: {accepted.get('message')}")
    if not out:
        out.append("# nothing to program")
    return "\n\n".join(out) + "\n"


KINDS = ("ServiceProxyPolicy", "ClusterServiceProxyPolicy")


def _load(path: str) -> JSON:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    policies = [d for d in docs if d.get("kind") in KINDS]
    if len(policies) != 1:
        raise ValueError(
            f"{path} holds {len(policies)} ServiceProxyPolicy or ClusterServiceProxyPolicy documents:"
            " give exactly one"
        )
    return policies[0]


def _items(resp: Any, api: Any) -> list[JSON]:
    data = resp if isinstance(resp, dict) else api.sanitize_for_serialization(resp)
    items: list[JSON] = data.get("items") or []
    return items


def _in_place(raw_policy: JSON, stored: list[JSON]) -> list[JSON]:
    """``stored`` with the file's policy in place of the one of its name (whose age it keeps:
    age decides conflicts)."""
    name = raw_policy["metadata"]["name"]
    mine = next((p for p in stored if p["metadata"]["name"] == name), None)
    if mine is not None:
        raw_policy = {**raw_policy, "metadata": {**mine["metadata"], **raw_policy["metadata"]}}
    return [raw_policy, *(p for p in stored if p["metadata"]["name"] != name)]


def read_namespace(
    namespace: str,
    raw_policy: JSON | None,
    kubeconfig: str | None,
    cluster_policies: list[JSON] | None = None,
    api: Any = None,
) -> NamespaceView:
    """What the planner needs from the cluster, with the file's policy (if namespaced) in place
    and ``cluster_policies`` (stand-ins) beside the namespace's own; ``api``: a client to
    reuse (one is made from ``kubeconfig`` otherwise)."""
    from svcproxy.controller import cliclient

    api = api if api is not None else cliclient.api_client(kubeconfig)
    core, discovery, custom = cliclient.core(api), cliclient.discovery(api), cliclient.custom(api)
    services = _items(core.list_namespaced_service(namespace), api)
    slices = _items(discovery.list_namespaced_endpoint_slice(namespace), api)
    stored: Any = custom.list_namespaced_custom_object(
        "svcproxy.io", "v1alpha1", namespace, "serviceproxypolicies"
    )
    items: list[JSON] = stored.get("items", [])
    policies = _in_place(raw_policy, items) if raw_policy is not None else items
    pod_labels: dict[str, Mapping[str, str]] = {}
    if any((p.get("spec") or {}).get("weights") for p in [*policies, *(cluster_policies or [])]):
        for pod in _items(core.list_namespaced_pod(namespace), api):
            pod_labels[pod["metadata"]["name"]] = pod["metadata"].get("labels") or {}
    by_service: dict[str, list[JSON]] = {}
    for s in slices:
        owner = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
        if owner:
            by_service.setdefault(owner, []).append(s)
    return NamespaceView(
        namespace=namespace,
        policies=policies,
        services={s["metadata"]["name"]: s for s in services},
        slices=by_service,
        pod_labels=pod_labels,
        programs={},
        nodes=[],
        now=0.0,
        now_iso="",
        cluster_policies=cluster_policies or [],
    )


def read_cluster(raw_policy: JSON, kubeconfig: str | None, only: str | None = None) -> list[NamespaceView]:
    """One view per namespace the file's cluster policy selects (``only``: just that one, if
    selected), with the stored cluster policies (the file's in place of the stored one)
    planned beside each namespace's own."""
    from svcproxy.controller import cliclient

    api = cliclient.api_client(kubeconfig)
    core, custom = cliclient.core(api), cliclient.custom(api)
    stored: Any = custom.list_cluster_custom_object("svcproxy.io", "v1alpha1", "clusterserviceproxypolicies")
    parsed = [parse_cluster(p) for p in _in_place(raw_policy, stored.get("items", []))]
    mine = parsed[0].policy
    if mine is None:  # validated before; the merge with the stored metadata cannot break it
        raise ValueError(parsed[0].error)
    views = []
    for ns in _items(core.list_namespace(), api):
        name, labels = ns["metadata"]["name"], ns["metadata"].get("labels") or {}
        if (only is None or name == only) and selects_namespace(mine, labels):
            views.append(read_namespace(name, None, kubeconfig, for_namespace(parsed, labels), api))
    return views


def run(args: argparse.Namespace) -> int:
    try:
        raw = _load(args.filename)
        policy: ServiceProxyPolicy | ClusterServiceProxyPolicy
        if raw.get("kind") == "ClusterServiceProxyPolicy":
            policy = ClusterServiceProxyPolicy.parse(raw)
        else:
            policy = ServiceProxyPolicy.parse(raw)
    except (OSError, ValueError, yaml.YAMLError) as err:
        # pydantic's ValidationError is a ValueError: its text names the field and the rule.
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(err)
        print(f"svcproxy plan: {args.filename}: {detail}", file=sys.stderr)
        return 1
    if isinstance(policy, ClusterServiceProxyPolicy):
        return _run_cluster(args, raw, policy.metadata.name)
    namespace = policy.metadata.namespace or args.namespace or "default"
    raw.setdefault("metadata", {})["namespace"] = namespace
    try:
        view = read_namespace(namespace, raw, args.kubeconfig)
    except Exception as err:
        print(f"svcproxy plan: cannot read namespace {namespace} from the cluster: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(render(namespace, policy.metadata.name, view))
    return 0


def _run_cluster(args: argparse.Namespace, raw: JSON, name: str) -> int:
    try:
        views = read_cluster(raw, args.kubeconfig, args.namespace)
    except Exception as err:
        print(f"svcproxy plan: cannot read the cluster: {err}", file=sys.stderr)
        return 1
    if not views:
        sys.stdout.write("# the policy selects no namespace\n")
        return 0
    sys.stdout.write("\n".join(render(v.namespace, CLUSTER_PREFIX + name, v) for v in views))
    return 0
