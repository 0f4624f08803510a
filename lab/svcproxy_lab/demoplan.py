"""What both demos run, as plain values: the five Services, their policies and manifests.

Pure (no cluster, no subprocess): the lab demo (``demo.py``) and the kind demo
(``demokind.py``) deploy the same Deployments and Services from :data:`DEPLOYMENTS`
and :data:`SERVICES`, each with its own container (the lab's echo, kind's agnhost),
apply the same policies (:func:`policy_manifest`), read the same status row
(:func:`programmed_row`), and say what each grid should show from the mode a node
really ran (:func:`expect_for`, :func:`in_effect`, :func:`mode_in_effect`): an ``ipvs``
policy on a node without IPVS runs as iptables there, and its grid is judged as iptables's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PORT = 80  # every Service's port; the Pods listen on TARGET_PORT
TARGET_PORT = 8080
# Schedulers whose choice is a hash of the client's address: one client, one Pod.
HASH_SCHEDULERS = frozenset({"sh", "dh", "mh"})


@dataclass(frozen=True)
class DemoService:
    """One Service of the demo and the policy that proxies it."""

    name: str
    app: str  # the Pods it selects: app=<app>
    title: str
    spec: dict[str, Any]  # the policy's spec, without the Service it names

    @property
    def mode(self) -> str:
        return str(self.spec["mode"])

    @property
    def expect(self) -> str:
        """What the grid should show where the policy's own mode runs (demoview.verdict)."""
        return expect_for(self.mode, self.spec)


CANARY_WEIGHTS = [
    {"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 1},
    {"podSelector": {"matchLabels": {"track": "stable"}}, "weight": 4},
]
SERVICES: tuple[DemoService, ...] = (
    DemoService("echo-rr", "echo", "ipvs rr", {"mode": "ipvs", "ipvs": {"scheduler": "rr"}}),
    DemoService(
        "echo-sticky", "echo", "ipvs sh + ClientIP",
        {"mode": "ipvs", "ipvs": {"scheduler": "sh"},
         "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600}},
    ),
    DemoService("web-canary", "web", "ipvs wrr canary 1:4",
                {"mode": "ipvs", "ipvs": {"scheduler": "wrr"}, "weights": CANARY_WEIGHTS}),
    DemoService("echo-iptables", "echo", "iptables", {"mode": "iptables"}),
    DemoService("echo-userspace", "echo", "userspace rr",
                {"mode": "userspace", "ipvs": {"scheduler": "rr"}}),
)
# (Deployment, Pod labels, replicas): three echo Pods, and web's two stable Pods and one canary.
DEPLOYMENTS: tuple[tuple[str, dict[str, str], int], ...] = (
    ("echo", {"app": "echo"}, 3),
    ("web-stable", {"app": "web", "track": "stable"}, 2),
    ("web-canary", {"app": "web", "track": "canary"}, 1),
)


def expect_for(mode: str, spec: Mapping[str, Any]) -> str:
    """What a policy's grid shows when a node runs it in ``mode``: pinned, weighted, even, random.

    ClientIP affinity pins a client in every mode. iptables picks each new connection at
    random, with the policy's weights as probabilities; IPVS and userspace rr take turns
    (wrr by weight), and their hash schedulers pin by address. The stateful schedulers
    (lc, wlc, sed, ...) promise no pattern: judged as "random", which only reports shares.
    """
    if (spec.get("sessionAffinity") or {}).get("type") == "ClientIP":
        return "pinned"
    weighted = bool(spec.get("weights"))
    if mode == "iptables":
        return "weighted" if weighted else "random"
    scheduler = (spec.get("ipvs") or {}).get("scheduler", "rr")
    if scheduler in HASH_SCHEDULERS:
        return "pinned"
    if scheduler in ("rr", "wrr"):
        return "weighted" if weighted else "even"
    return "random"


def effective_modes(proxynodes: list[dict[str, Any]]) -> dict[str, dict[str, tuple[str, str]]]:
    """node -> requested mode -> (the mode it runs in, why), from each ProxyNode's status.

    A requested mode a node does not list runs as itself there.
    """
    out: dict[str, dict[str, tuple[str, str]]] = {}
    for pn in proxynodes:
        modes = out.setdefault(pn["metadata"]["name"], {})
        for m in (pn.get("status") or {}).get("modes") or []:
            modes[m["requested"]] = (m["effective"], m.get("reason", ""))
    return out


def fallback_notes(modes: Mapping[str, Mapping[str, tuple[str, str]]]) -> list[str]:
    """One line per mode some nodes run as another, naming the nodes and their reason."""
    nodes: dict[tuple[str, str, str], list[str]] = {}
    for node, by_mode in sorted(modes.items()):
        for requested, (effective, reason) in sorted(by_mode.items()):
            if effective != requested:
                nodes.setdefault((requested, effective, reason), []).append(node)
    return [f"{requested} runs as {effective} on {', '.join(names)}"
            + (f" (their ProxyNode says: {reason})" if reason else " (their ProxyNode says so)")
            for (requested, effective, reason), names in sorted(nodes.items())]


def in_effect(s: DemoService, modes: Mapping[str, Mapping[str, tuple[str, str]]]) -> tuple[str, str]:
    """The title and expectation of ``s``'s grid given what every node runs (effective_modes).

    Where every node runs the policy in another mode, the grid is that mode's and the title
    says so; where only some do, the title names them and the expectation stays the policy's
    (its clients on the other nodes still show it).
    """
    ran = {node: m.get(s.mode, (s.mode, ""))[0] for node, m in modes.items()}
    other = sorted(node for node, mode in ran.items() if mode != s.mode)
    if not other:
        return s.title, s.expect
    used = sorted({ran[n] for n in other})
    if len(other) == len(ran) and len(used) == 1:
        return f"{s.title} -> {used[0]}", expect_for(used[0], s.spec)
    return f"{s.title} ({', '.join(used)} on {', '.join(other)})", s.expect


def mode_in_effect(s: DemoService, modes: Mapping[str, Mapping[str, tuple[str, str]]]) -> str:
    """The table's MODE of ``s``: its mode, and what runs it on how many nodes where that differs.

    Counted from the ProxyNodes, so it stays short where the policy's status names every node.
    """
    ran = Counter(m.get(s.mode, (s.mode, ""))[0] for m in modes.values())
    other = ", ".join(f"{mode} on {n}/{len(modes)} nodes" for mode, n in sorted(ran.items())
                      if mode != s.mode)
    return f"{s.mode} ({other})" if other else s.mode


def deployment(name: str, labels: dict[str, str], replicas: int, container: dict[str, Any],
               namespace: str) -> dict[str, Any]:
    """One Deployment of the demo: ``container`` answers on TARGET_PORT with its Pod's name."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels},
                         "spec": {"containers": [container]}},
        },
    }


def service_manifest(s: DemoService, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": namespace, "labels": {"app": s.app}},
        "spec": {"selector": {"app": s.app},
                 "ports": [{"name": "tcp", "port": PORT, "targetPort": TARGET_PORT,
                            "protocol": "TCP"}]},
    }


def workload(container: dict[str, Any], namespace: str) -> list[dict[str, Any]]:
    """The namespace, every Deployment and one Service per DemoService."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    docs += [deployment(name, labels, n, container, namespace) for name, labels, n in DEPLOYMENTS]
    docs += [service_manifest(s, namespace) for s in SERVICES]
    return docs


def policy_manifest(s: DemoService, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": s.name, "namespace": namespace},
            "spec": {"services": [s.name], **s.spec}}


def programmed_row(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The table row of a policy that is Programmed on every node for this generation."""
    gen = obj["metadata"]["generation"]
    status = obj.get("status") or {}
    cond = {c["type"]: c for c in status.get("conditions", [])}.get("Programmed", {})
    services = status.get("services") or []
    if (status.get("observedGeneration") != gen or cond.get("status") != "True"
            or cond.get("observedGeneration", gen) != gen or not services):
        return None
    row = services[0]
    if row.get("state") != "Programmed" or row.get("nodesProgrammed") != row.get("nodesTotal"):
        return None
    spec = obj["spec"]
    affinity = spec.get("sessionAffinity") or {}
    return {
        "mode": row.get("mode") or spec.get("mode"),
        "scheduler": "-" if spec.get("mode") == "iptables" else (spec.get("ipvs") or {}).get(
            "scheduler", "rr"),
        "affinity": (f"ClientIP {affinity.get('timeoutSeconds')}s"
                     if affinity.get("type") == "ClientIP" else "None"),
        "programmed": f"{row.get('nodesProgrammed')}/{row.get('nodesTotal')}",
        "nodes_programmed": row.get("nodesProgrammed"), "nodes_total": row.get("nodesTotal"),
        "cluster_ip": row.get("clusterIP"),
    }
