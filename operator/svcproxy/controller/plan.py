"""``svcproxy plan -f policy.yaml``: what a policy would program, without writing anything.

Reads the policy file, validates it with the same rules the API server
applies, reads the policy's namespace from the cluster (Services,
EndpointSlices, Pod labels when the policy has weights, the other policies
there) and runs the operator's own planner on it with the file's policy in
place of any stored one of that name. Prints one table per Service in the
style of ``ipvsadm -Ln``, plus the Services the policy would not proxy and
why (conflicts included). Called by ``svcproxy.cli``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from svcproxy.api.policy import ServiceProxyPolicy
from svcproxy.api.program import ProxyVirtualServerSpec
from svcproxy.base import IPFamily
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
        for rs in vs.real_servers:
            rhost = IPFamily.bracketed(rs.address)
            state = "ready" if rs.ready else "draining" if rs.terminating else "not-ready"
            lines.append(f"  -> {f'{rhost}:{rs.port}':<28} {'Masq':<7} {rs.weight:<7} {state}")
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
    accepted = next((c for c in status.get("conditions", []) if c.get("type") == "Accepted"), None)
    if accepted and accepted.get("status") != "True":
        out.append(f"# not accepted: {accepted.get('message')}")
    if not out:
        out.append("# nothing to program")
    return "\n\n".join(out) + "\n"


def _load(path: str) -> JSON:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]
    policies = [d for d in docs if d.get("kind") == "ServiceProxyPolicy"]
    if len(policies) != 1:
        raise ValueError(f"{path} holds {len(policies)} ServiceProxyPolicy documents: give exactly one")
    return policies[0]


def _items(resp: Any, api: Any) -> list[JSON]:
    data = resp if isinstance(resp, dict) else api.sanitize_for_serialization(resp)
    items: list[JSON] = data.get("items") or []
    return items


def read_namespace(namespace: str, raw_policy: JSON, kubeconfig: str | None) -> NamespaceView:
    """What the planner needs from the cluster, with the file's policy in place."""
    from svcproxy.controller import cliclient

    api = cliclient.api_client(kubeconfig)
    core, discovery, custom = cliclient.core(api), cliclient.discovery(api), cliclient.custom(api)
    services = _items(core.list_namespaced_service(namespace), api)
    slices = _items(discovery.list_namespaced_endpoint_slice(namespace), api)
    stored: Any = custom.list_namespaced_custom_object(
        "svcproxy.io", "v1alpha1", namespace, "serviceproxypolicies"
    )
    name = raw_policy["metadata"]["name"]
    others = [p for p in stored.get("items", []) if p["metadata"]["name"] != name]
    mine = next((p for p in stored.get("items", []) if p["metadata"]["name"] == name), None)
    if mine is not None:  # keep its age (it decides conflicts), take the file's spec
        raw_policy = {**raw_policy, "metadata": {**mine["metadata"], **raw_policy["metadata"]}}
    pod_labels: dict[str, Mapping[str, str]] = {}
    if raw_policy.get("spec", {}).get("weights"):
        for pod in _items(core.list_namespaced_pod(namespace), api):
            pod_labels[pod["metadata"]["name"]] = pod["metadata"].get("labels") or {}
    by_service: dict[str, list[JSON]] = {}
    for s in slices:
        owner = (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
        if owner:
            by_service.setdefault(owner, []).append(s)
    return NamespaceView(
        namespace=namespace,
        policies=[raw_policy, *others],
        services={s["metadata"]["name"]: s for s in services},
        slices=by_service,
        pod_labels=pod_labels,
        programs={},
        nodes=[],
        now=0.0,
        now_iso="",
    )


def run(args: argparse.Namespace) -> int:
    try:
        raw = _load(args.filename)
        policy = ServiceProxyPolicy.parse(raw)
    except (OSError, ValueError, yaml.YAMLError) as err:
        # pydantic's ValidationError is a ValueError: its text names the field and the rule.
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(err)
        print(f"svcproxy plan: {args.filename}: {detail}", file=sys.stderr)
        return 1
    namespace = policy.metadata.namespace or args.namespace or "default"
    raw.setdefault("metadata", {})["namespace"] = namespace
    try:
        view = read_namespace(namespace, raw, args.kubeconfig)
    except Exception as err:
        print(f"svcproxy plan: cannot read namespace {namespace} from the cluster: {err}", file=sys.stderr)
        return 1
    sys.stdout.write(render(namespace, policy.metadata.name, view))
    return 0
