"""The operator's reconciler and handlers against an in-memory writer (single handlers only),
and the plan/status renderers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_compile_helpers import endpoint, endpoint_slice, policy_obj, service

from svcproxy.api import HANDOVER_LABEL, ProxyVirtualServerSpec
from svcproxy.compile.planner import NamespaceView
from svcproxy.controller import handlers, plan, statuscmd
from svcproxy.controller.cache import Cache
from svcproxy.controller.lister import apply_lists
from svcproxy.controller.reconciler import Reconciler

JSON = dict[str, Any]


class FakeWriter:
    """Keeps what would be written, like the API server would store it."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.programs: dict[str, JSON] = {}
        self.labels: dict[str, bool] = {}
        self.events: list[tuple[str, str, str]] = []
        self.statuses: dict[str, JSON] = {}
        self.fail_next = 0
        self.refuse_events = False
        self.rv = 100

    def _stamp(self, obj: JSON) -> JSON:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        return obj

    async def write_program(self, namespace: str, service: JSON, spec: ProxyVirtualServerSpec) -> JSON:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("API server unavailable")
        name = service["metadata"]["name"]
        self.programs[name] = {"metadata": {"name": name, "namespace": namespace}, "spec": spec.wire()}
        return self._stamp(dict(self.programs[name]))

    async def delete_program(self, namespace: str, name: str) -> None:
        self.programs.pop(name, None)

    async def set_handover_label(self, namespace: str, name: str, on: bool) -> JSON | None:
        self.labels[name] = on
        svc = dict(self.cache.get("service", namespace, name) or {})
        meta = dict(svc["metadata"])
        labels = {k: v for k, v in (meta.get("labels") or {}).items() if k != HANDOVER_LABEL}
        if on:
            labels[HANDOVER_LABEL] = "svcproxy"
        meta["labels"] = labels
        return self._stamp({**svc, "metadata": meta})

    async def patch_policy_status(self, namespace: str, name: str, status: JSON) -> JSON | None:
        self.statuses[name] = status
        pol = dict(self.cache.get("policy", namespace, name) or {})
        return self._stamp({**pol, "metadata": dict(pol["metadata"]), "status": status})

    async def post_event(self, policy: JSON, type_: str, reason: str, message: str) -> None:
        if self.refuse_events:
            raise RuntimeError("(403) namespace is being terminated")
        self.events.append((policy["metadata"]["name"], type_, reason))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup() -> tuple[Cache, FakeWriter, Reconciler, Clock]:
    cache = Cache()
    writer = FakeWriter(cache)
    clock = Clock()
    rec = Reconciler(cache, writer, handover_delay=3.0, clock=clock)
    rec.ready.set()
    for obj in (service("web"), endpoint_slice([endpoint("10.244.1.2")])):
        cache.put("slice" if obj["kind"] == "EndpointSlice" else "service", obj)
    return cache, writer, rec, clock


async def test_reconcile_writes_once_then_only_on_change() -> None:
    cache, writer, rec, _ = _setup()
    cache.put("policy", policy_obj("p"))
    await rec.reconcile("ns")
    assert writer.programs["web"]["spec"]["virtualServers"][0]["realServers"][0]["address"] == "10.244.1.2"
    first_rv = cache.get("program", "ns", "web")["metadata"]["resourceVersion"]  # type: ignore[index]
    await rec.reconcile("ns")
    assert cache.get("program", "ns", "web")["metadata"]["resourceVersion"] == first_rv  # type: ignore[index]
    cache.put("slice", endpoint_slice([endpoint("10.244.1.2"), endpoint("10.244.1.3")]))
    await rec.reconcile("ns")
    assert len(writer.programs["web"]["spec"]["virtualServers"][0]["realServers"]) == 2
    assert ("p", "Normal", "Accepted") in writer.events


async def test_failed_write_is_retried_not_fatal() -> None:
    cache, writer, rec, _ = _setup()
    cache.put("policy", policy_obj("p"))
    writer.fail_next = 1
    assert await rec.reconcile("ns") is None
    assert rec.failures == {"ns": 1}
    assert await rec.reconcile("ns") is not None
    assert "web" in writer.programs and rec.failures == {}


async def test_finalizer_waits_for_handover_then_releases() -> None:
    cache, writer, rec, clock = _setup()
    cache.put("policy", policy_obj("p"))
    await rec.reconcile("ns")
    cache.put("service", service("web", labels={HANDOVER_LABEL: "svcproxy"}))
    deleting = policy_obj("p", deleting=True)
    import kopf

    with pytest.raises(kopf.TemporaryError, match="handing web back to kube-proxy"):
        await handlers.withdraw(cache, rec, deleting, wait=0)
    assert writer.labels == {"web": False} and "web" in writer.programs  # label first, program kept
    clock.now += 1
    with pytest.raises(kopf.TemporaryError):
        await handlers.withdraw(cache, rec, deleting, wait=0)
    clock.now += 2.5
    await handlers.withdraw(cache, rec, deleting, wait=0)  # delay over: program deleted, finalizer may go
    assert "web" not in writer.programs


async def test_finalizer_waits_in_itself_when_the_handback_is_on_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hand-back on schedule ends inside one handler call: no TemporaryError, which kopf
    # would log at error level.
    cache, writer, rec, clock = _setup()
    cache.put("policy", policy_obj("p"))
    await rec.reconcile("ns")
    cache.put("service", service("web", labels={HANDOVER_LABEL: "svcproxy"}))
    monkeypatch.setattr(handlers, "HANDBACK_POLL_SECONDS", 0.01)

    async def grace_passes() -> None:
        await asyncio.sleep(0.05)
        clock.now += 3.5

    passing = asyncio.create_task(grace_passes())
    await handlers.withdraw(cache, rec, policy_obj("p", deleting=True), wait=5)
    await passing
    assert writer.labels == {"web": False} and "web" not in writer.programs


async def test_observe_coalesces_events_into_one_pass() -> None:
    cache, writer, rec, _ = _setup()
    handlers.observe(cache, rec, "policy", {"type": "ADDED", "object": policy_obj("p")})
    for i in range(10):
        handlers.observe(
            cache,
            rec,
            "slice",
            {
                "type": "MODIFIED",
                "object": endpoint_slice([endpoint(f"10.244.1.{j + 2}") for j in range(i + 1)]),
            },
        )
    for _ in range(100):
        await asyncio.sleep(0.01)
        if writer.programs:
            break
    await asyncio.sleep(0.2)
    assert len(writer.programs["web"]["spec"]["virtualServers"][0]["realServers"]) == 10
    assert writer.rv == 101 + 1  # one program write + one status write: the burst coalesced
    handlers.observe(
        cache,
        rec,
        "pod",
        {"type": "ADDED", "object": {"metadata": {"name": "x", "namespace": "ns", "labels": {"a": "b"}}}},
    )
    assert cache.pod_labels["ns"]["x"] == {"a": "b"}
    handlers.observe(cache, rec, "slice", {"type": "DELETED", "object": endpoint_slice([])})
    assert cache.get("slice", "ns", "web-abc") is None


def test_cache_keeps_newer_resource_version() -> None:
    cache = Cache()
    new = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "20"}, "spec": {"v": 2}}
    old = {"metadata": {"name": "a", "namespace": "ns", "resourceVersion": "10"}, "spec": {"v": 1}}
    assert cache.put("service", new)
    assert not cache.put("service", old)
    assert cache.get("service", "ns", "a") == new


def _view(policies: list[JSON]) -> NamespaceView:
    return NamespaceView(
        namespace="ns",
        policies=policies,
        services={"web": service("web")},
        slices={
            "web": [
                endpoint_slice(
                    [
                        endpoint("10.244.1.2", pod="w"),
                        endpoint("10.244.1.3", ready=False, serving=True, terminating=True),
                    ]
                )
            ]
        },
        pod_labels={},
        programs={},
        nodes=[],
        now=0.0,
        now_iso="",
    )


def test_plan_prints_ipvsadm_like_table() -> None:
    spec = {
        "services": ["web", "missing"],
        "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port"]},
        "sessionAffinity": {"type": "ClientIP", "timeoutSeconds": 600},
    }
    text = plan.render("ns", "p", _view([policy_obj("p", spec)]))
    assert "Prot LocalAddress:Port Scheduler Flags" in text
    assert "TCP  10.96.0.10:80 sh (sh-port) persistent 600" in text
    lines = text.splitlines()
    assert any(line.split() == ["->", "10.244.1.2:8080", "Masq", "1", "ready"] for line in lines)
    assert any(line.split() == ["->", "10.244.1.3:8080", "Masq", "0", "draining"] for line in lines)


def test_plan_shows_conflicts_and_refusals() -> None:
    winner = policy_obj("old", created="2020-01-01T00:00:00Z")
    text = plan.render("ns", "p", _view([policy_obj("p"), winner]))
    assert "# ns/web: Conflicted: Service web: policy old wins" in text
    assert plan.render("ns", "p", _view([policy_obj("p", {"services": ["nope"]})])).startswith(
        "# not accepted: Services not found: nope"
    )


def test_plan_of_a_cluster_policy_shows_its_programs_and_what_overrides_it() -> None:
    from dataclasses import replace

    from svcproxy.compile.cluster import CLUSTER_PREFIX, for_namespace, parse_cluster

    raw = {
        "apiVersion": "svcproxy.io/v1alpha1",
        "kind": "ClusterServiceProxyPolicy",
        "metadata": {"name": "default", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"mode": "iptables"},
    }
    stand_ins = for_namespace([parse_cluster(raw)], {})
    view = replace(_view([]), cluster_policies=stand_ins)
    text = plan.render("ns", CLUSTER_PREFIX + "default", view)
    assert f"policy {CLUSTER_PREFIX}default  mode iptables" in text
    assert "TCP  10.96.0.10:80 random (iptables)" in text
    # A namespaced policy for the same Service wins: the cluster policy programs nothing.
    overridden = plan.render("ns", CLUSTER_PREFIX + "default", replace(view, policies=[policy_obj("p")]))
    assert "Prot LocalAddress" not in overridden
    assert "# ns/web: Overridden:" in overridden


def test_status_tables() -> None:
    pol = policy_obj(
        "p",
        status={
            "programmed": "2/3",
            "conditions": [{"type": "Programmed", "status": "False"}],
            "services": [
                {"name": "web", "state": "Pending", "nodesProgrammed": 2, "nodesTotal": 3, "mode": "ipvs"}
            ],
        },
    )
    node = {
        "metadata": {"name": "node-1"},
        "status": {"capabilities": {"ipvs": True}, "modesSummary": "ipvs", "applied": {"ns/web": "abc"}},
    }
    text = statuscmd.render([pol], [], [node])
    assert "2/3" in text and "Pending" in text
    assert any(line.split()[:4] == ["node-1", "True", "ipvs", "1"] for line in text.splitlines())


def test_status_shows_cluster_policies_with_their_counts_and_problem_rows() -> None:
    cluster = {
        "metadata": {"name": "default"},
        "spec": {"mode": "iptables"},
        "status": {
            "conditions": [{"type": "Accepted", "status": "True"}],
            "summary": {
                "namespaces": 4, "selected": 12, "programmed": 10, "pending": 1, "conflicted": 1,
            },
            "problems": [
                {"namespace": "shop", "name": "cart", "state": "Conflicted", "message": "older one"},
            ],
        },
    }
    text = statuscmd.render([], [], [], [cluster])
    lines = text.splitlines()
    row = next(line.split() for line in lines if line.startswith("default"))
    assert row == ["default", "iptables", "-", "True", "-", "4", "12", "10", "1", "0", "1", "0"]
    assert any(line.split()[:4] == ["shop", "cart", "ClusterServiceProxyPolicy/default", "Conflicted"]
               for line in lines)
    services = statuscmd.render([], [], [], [cluster], namespace="other").split("SERVICES")[1]
    assert "cart" not in services.split("PROGRAMS")[0]  # -n other: shop's rows are not asked for
    assert "CLUSTER POLICIES" not in statuscmd.render([], [], [])


async def test_nothing_is_planned_before_the_first_full_list() -> None:
    cache = Cache()
    writer = FakeWriter(cache)
    rec = Reconciler(cache, writer)
    # Programs arrive before their Services: acting now would delete them.
    cache.put("program", {"metadata": {"name": "web", "namespace": "ns"}, "spec": {"policy": {"name": "p"}}})
    assert await rec.reconcile("ns") is None
    lists = {
        "policy": {"metadata": {"resourceVersion": "50"}, "items": [policy_obj("p")]},
        "service": {"metadata": {"resourceVersion": "50"}, "items": [service("web")]},
        "slice": {"metadata": {"resourceVersion": "50"}, "items": []},
        "program": {"metadata": {"resourceVersion": "50"}, "items": []},
        "node": {"metadata": {"resourceVersion": "50"}, "items": []},
        "pod": {"metadata": {"resourceVersion": "50"}, "items": []},
    }

    async def fake_load(into: Cache) -> None:
        apply_lists(into, lists)

    task = asyncio.get_running_loop().create_task(rec.resync_forever(fake_load, 3600))
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if "web" in writer.programs:
                break
        assert rec.ready.is_set()
        assert "web" in writer.programs  # the unlisted program was dropped, then written afresh
    finally:
        task.cancel()


def test_resync_drops_only_objects_not_newer_than_the_list() -> None:
    cache = Cache()
    cache.put("service", {"metadata": {"name": "gone", "namespace": "ns", "resourceVersion": "10"}})
    cache.put("service", {"metadata": {"name": "fresh", "namespace": "ns", "resourceVersion": "90"}})
    cache.set_pod_labels("ns", "old-pod", {"a": "b"})
    apply_lists(
        cache,
        {
            "service": {
                "metadata": {"resourceVersion": "50"},
                "items": [{"metadata": {"name": "kept", "namespace": "ns", "resourceVersion": "40"}}],
            },
            "pod": {
                "metadata": {"resourceVersion": "50"},
                "items": [{"metadata": {"name": "p", "namespace": "ns", "labels": {"x": "y"}}}],
            },
        },
    )
    assert sorted(cache.objects["service"]["ns"]) == ["fresh", "kept"]
    assert cache.pod_labels["ns"] == {"p": {"x": "y"}}


def test_operator_command_line_defaults() -> None:
    import argparse

    from svcproxy.controller import main

    parser = argparse.ArgumentParser()
    main.configure(parser)
    args = parser.parse_args(["--kubeconfig", "/k"])
    assert (args.peering, args.standalone, args.metrics_port, args.liveness_port, args.handover_delay) == (
        "svcproxy",
        False,
        9100,
        8080,
        3.0,
    )
    assert args.namespace is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--namespace", "a", "--all-namespaces"])
    assert main.run(parser.parse_args(["--kubeconfig", "/does/not/exist"])) == 2


async def test_refused_events_do_not_fail_the_pass() -> None:
    cache, writer, rec, _ = _setup()
    writer.refuse_events = True
    cache.put("policy", policy_obj("p"))
    assert await rec.reconcile("ns") is not None
    assert "web" in writer.programs and "p" in writer.statuses and rec.failures == {}


async def test_kopf_gives_every_object_the_operators_one_memo() -> None:
    """kopf keeps a memo per watched object; the operator's memo is shared, not copied."""
    from kopf._core.reactor import inventory

    from svcproxy.controller import main

    memo = main.OperatorMemo(cache=Cache())
    memories = inventory.ResourceMemories()
    first = await memories.recall({"metadata": {"uid": "a"}}, memobase=memo)
    second = await memories.recall({"metadata": {"uid": "b"}}, memobase=memo)
    assert first is not second and first.memo is memo and second.memo is memo
