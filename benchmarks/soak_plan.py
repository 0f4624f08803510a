"""The pure plan of ``soak.py``: when faults strike, which churn step comes next, object bodies.

``fault_schedule`` draws the run's faults from the seed (times, kinds, target nodes);
``churn_times`` the Poisson arrival times of churn steps; ``next_op`` picks one churn step
from a random generator and the churn objects as the API server lists them now, so a run
is seeded but still follows what the faults let through. The body builders give the
Services, EndpointSlices, Deployments and policies the soak writes. No I/O and no clock:
tested in tests/unit/test_benchmarks_soak.py.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "soak"
ECHO_IMAGE = "svcproxy.io/echo"
PORT = 80
CHURN_LABEL = "soak.svcproxy.io/churn"  # on every churn Service, Deployment, slice
GROUP_LABEL = "soak.svcproxy.io/group"  # churn policies select churn Services by group
GROUPS = ("g0", "g1", "g2", "g3")
MANAGED_BY = "soak.svcproxy.io"  # hand-written slices: the EndpointSlice controller leaves them

FAULT_KINDS = ("agent_kill", "operator_kill", "apiserver_restart", "etcd_compact")
# Beyond one of each kind: agents die most often (one per node), the API server least.
FAULT_WEIGHTS = {"agent_kill": 4, "operator_kill": 2, "apiserver_restart": 1, "etcd_compact": 1}
MIN_FAULT_GAP = 10.0  # seconds: each fault's recovery starts before the next one

IPVS_SCHEDULERS = ("rr", "wrr", "lc", "sh", "mh")
USERSPACE_SCHEDULERS = ("rr", "lc", "sh")
ENDPOINT_PORTS = (20000, 29999)  # of hand-written endpoints: nothing listens, no traffic


@dataclass(frozen=True)
class Fault:
    """One fault ``at`` seconds after the run starts; ``target`` is a node for agent_kill."""

    at: float
    kind: str
    target: str = ""


def fault_windows(duration: float) -> tuple[float, float]:
    """(first, last) second at which faults may strike: none in the first tenth (at most
    60 s, the steady state is still forming) nor in the last tenth (at most 120 s, so the
    last fault has recovered before churn stops)."""
    return min(60.0, duration * 0.1), duration - min(120.0, duration * 0.1)


def fault_schedule(seed: int, duration: float, nodes: Sequence[str],
                   mean_gap: float = 90.0) -> list[Fault]:
    """The faults of a ``duration``-second run: about one per ``mean_gap`` seconds and at
    least one of each kind, each in its own slot of the fault window at a random offset
    within the slot's first half (so two faults are at least half a slot apart); agent kills
    go to the nodes in a shuffled cycle, so each node loses its agent before any twice."""
    if not nodes:
        raise ValueError("no nodes to kill agents on")
    first, last = fault_windows(duration)
    count = max(len(FAULT_KINDS), round((last - first) / mean_gap))
    slot = (last - first) / count
    if slot / 2 < MIN_FAULT_GAP:
        fix = "raise --minutes" if count == len(FAULT_KINDS) else "raise --fault-every"
        raise ValueError(f"{duration:.0f} s leave {slot:.1f} s per fault for {count} faults "
                         f"(at least {2 * MIN_FAULT_GAP:.0f} s each, one of each kind): {fix}")
    rng = random.Random(f"faults:{seed}")
    extra = rng.choices(list(FAULT_WEIGHTS), weights=list(FAULT_WEIGHTS.values()),
                        k=count - len(FAULT_KINDS))
    kinds = [*FAULT_KINDS, *extra]
    rng.shuffle(kinds)
    cycle: list[str] = []
    out = []
    for i, kind in enumerate(kinds):
        target = ""
        if kind == "agent_kill":
            if not cycle:
                cycle = rng.sample(list(nodes), len(nodes))
            target = cycle.pop()
        out.append(Fault(round(first + i * slot + rng.uniform(0, slot / 2), 3), kind, target))
    return out


def churn_times(seed: int, duration: float, rate: float) -> list[float]:
    """Poisson arrivals (``rate`` per second) of churn steps in [0, ``duration``)."""
    if rate <= 0:
        return []
    rng = random.Random(f"churn-times:{seed}")
    out, at = [], rng.expovariate(rate)
    while at < duration:
        out.append(round(at, 3))
        at += rng.expovariate(rate)
    return out


# --- churn -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChurnService:
    """A churn Service: ``backing`` "slice" (selectorless, a hand-written EndpointSlice of
    ``size`` endpoints) or "pods" (a Deployment of ``size`` replicas behind a selector)."""

    name: str
    backing: str
    group: str
    size: int


@dataclass(frozen=True)
class World:
    """The churn objects as listed now: churn Services, churn policies (name -> group),
    the steady Services' modes, the churn Pods' names; ``next_index`` names new objects."""

    services: tuple[ChurnService, ...]
    policies: dict[str, str]
    steady_modes: dict[str, str]
    pods: tuple[str, ...]
    next_index: int


@dataclass(frozen=True)
class Limits:
    max_services: int = 12
    max_policies: int = 6
    max_replicas: int = 2
    max_endpoints: int = 3


@dataclass(frozen=True)
class Op:
    """One churn step: ``kind`` on ``target`` with everything it writes in ``params``."""

    kind: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)


# Relative frequency of each step while it applies.
OP_WEIGHTS = {
    "add_service": 3, "delete_service": 2, "set_endpoints": 4, "scale": 3, "delete_pod": 2,
    "add_policy": 2, "change_policy": 3, "delete_policy": 1, "switch_steady": 2,
}


def _applicable(world: World, limits: Limits) -> list[str]:
    slices = [s for s in world.services if s.backing == "slice"]
    pods = [s for s in world.services if s.backing == "pods"]
    checks = {
        "add_service": len(world.services) < limits.max_services,
        "delete_service": len(world.services) > 1,
        "set_endpoints": bool(slices),
        "scale": bool(pods),
        "delete_pod": bool(world.pods),
        "add_policy": len(world.policies) < limits.max_policies,
        "change_policy": bool(world.policies),
        "delete_policy": len(world.policies) > 1,
        "switch_steady": bool(world.steady_modes),
    }
    return [kind for kind in OP_WEIGHTS if checks[kind]]


def policy_spec(rng: random.Random, modes: Sequence[str]) -> dict[str, Any]:
    """A random valid churn policy spec (mode, scheduler, affinity, priority; no selector)."""
    mode = rng.choice(list(modes))
    spec: dict[str, Any] = {"mode": mode, "priority": rng.randint(0, 5)}
    if mode != "iptables":  # iptables mode takes no scheduler (the CRD refuses one)
        choices = IPVS_SCHEDULERS if mode == "ipvs" else USERSPACE_SCHEDULERS
        spec["ipvs"] = {"scheduler": rng.choice(choices)}
    if rng.random() < 0.3:
        spec["sessionAffinity"] = {"type": "ClientIP", "timeoutSeconds": rng.randint(60, 3600)}
    return spec


def endpoints(rng: random.Random, addresses: Sequence[str], limits: Limits) -> dict[str, Any]:
    """A slice's endpoints: 1..max_endpoints distinct node addresses (addresses the agents
    trust) and one port nothing listens on (churn Services get no traffic)."""
    k = rng.randint(1, min(limits.max_endpoints, len(addresses)))
    return {"addresses": sorted(rng.sample(list(addresses), k)),
            "port": rng.randint(*ENDPOINT_PORTS)}


def next_op(rng: random.Random, world: World, modes: Sequence[str], addresses: Sequence[str],
            limits: Limits = Limits()) -> Op:
    """The next churn step for ``world``: a kind drawn by :data:`OP_WEIGHTS` among those
    that apply, its target and everything it writes, all from ``rng``."""
    kinds = _applicable(world, limits)
    kind = rng.choices(kinds, weights=[OP_WEIGHTS[k] for k in kinds])[0]
    services = sorted(world.services, key=lambda s: s.name)
    if kind == "add_service":
        backing = rng.choice(("slice", "pods"))
        params: dict[str, Any] = {"backing": backing, "group": rng.choice(GROUPS)}
        if backing == "slice":
            params["endpoints"] = endpoints(rng, addresses, limits)
        else:
            params["replicas"] = rng.randint(1, limits.max_replicas)
        return Op(kind, f"churn-{world.next_index}", params)
    if kind == "delete_service":
        svc = rng.choice(services)
        return Op(kind, svc.name, {"backing": svc.backing})
    if kind == "set_endpoints":
        svc = rng.choice([s for s in services if s.backing == "slice"])
        return Op(kind, svc.name, {"endpoints": endpoints(rng, addresses, limits)})
    if kind == "scale":
        svc = rng.choice([s for s in services if s.backing == "pods"])
        sizes = [n for n in range(limits.max_replicas + 1) if n != svc.size]
        return Op(kind, svc.name, {"replicas": rng.choice(sizes)})
    if kind == "delete_pod":
        return Op(kind, rng.choice(sorted(world.pods)))
    if kind == "add_policy":
        return Op(kind, f"churn-p{world.next_index}",
                  {"group": rng.choice(GROUPS), "spec": policy_spec(rng, modes)})
    if kind in ("change_policy", "delete_policy"):
        name = rng.choice(sorted(world.policies))
        params = {"group": world.policies[name]}
        if kind == "change_policy":
            params["spec"] = policy_spec(rng, modes)
        return Op(kind, name, params)
    name = rng.choice(sorted(world.steady_modes))
    mode = rng.choice([m for m in modes if m != world.steady_modes[name]] or list(modes))
    return Op("switch_steady", name, {"mode": mode})


# --- object bodies ------------------------------------------------------------------------


def steady_policy_spec(service: str, mode: str) -> dict[str, Any]:
    """The policy of one steady Service: only its mode changes during the run."""
    spec: dict[str, Any] = {"mode": mode, "services": [service], "priority": 0}
    if mode != "iptables":
        spec["ipvs"] = {"scheduler": "rr"}
    return spec


def churn_policy_spec(group: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "serviceSelector": {"matchLabels": {GROUP_LABEL: group}}}


def spec_patch(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning spec ``old`` into ``new``: fields ``new`` lacks become null
    (removed), e.g. ``ipvs`` when a policy switches to iptables mode."""
    return {"spec": {**{k: None for k in old if k not in new}, **new}}


def policy_body(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def service_body(name: str, labels: dict[str, str], selector: dict[str, str] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"name": "tcp", "port": PORT, "targetPort": PORT,
                                       "protocol": "TCP"}]}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}, "spec": spec}


def slice_body(service: str, owner_uid: str, eps: dict[str, Any]) -> dict[str, Any]:
    """A hand-written EndpointSlice owned by its Service (the garbage collector deletes it
    with the Service), with ``eps`` from :func:`endpoints`."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-soak", "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": service, CHURN_LABEL: "true",
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": service,
                                          "uid": owner_uid, "controller": True,
                                          "blockOwnerDeletion": True}]},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": int(eps["port"]), "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in eps["addresses"]],
    }


def deployment_body(name: str, replicas: int, labels: dict[str, str]) -> dict[str, Any]:
    """Echo Pods (the lab kubelet's built-in server) with an HTTP readiness probe lenient
    enough for a loaded 2-core machine: a steady backend must stay ready throughout."""
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, **labels}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "echo", "image": ECHO_IMAGE,
                        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": PORT},
                                           "periodSeconds": 2, "timeoutSeconds": 2,
                                           "failureThreshold": 5},
                    }],
                },
            },
        },
    }
