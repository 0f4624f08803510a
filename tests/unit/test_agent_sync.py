"""The agent against in-memory proxiers: conversion, partial vs full syncs, fallback,
make-before-break, restart adoption, and the cost of one change. Fake time throughout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_agent_fake import FakeKernel, FakeProxier

from svcproxy.agent.agent import Agent
from svcproxy.agent.convert import DesiredProgram, to_program
from svcproxy.agent.tracker import ChangeTracker
from svcproxy.api.program import ProxyVirtualServer
from svcproxy.dataplane.proxier import (
    KernelError,
    ModeCapabilities,
    SchedulerUnavailableError,
    UnsupportedError,
)
from svcproxy.dataplane.table import RealServer, VirtualServer, VSKey


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pvs(name: str, *, mode: str = "iptables", vip: str = "10.96.0.10", port: int = 80,
        scheduler: str | None = "rr", reals: list[dict[str, Any]] | None = None,
        h: str = "h1", ns: str = "default", extra_vs: list[dict[str, Any]] | None = None) -> DesiredProgram:
    real_servers = reals if reals is not None else [{"address": "10.244.1.5", "port": 8080},
                                                    {"address": "10.244.2.5", "port": 8080}]
    vs = {"address": vip, "port": port, "protocol": "TCP", "mode": mode, "scheduler": scheduler,
          "realServers": real_servers}
    obj = {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"service": {"name": name}, "policy": {"name": "p"}, "mode": mode,
                    "scheduler": scheduler, "virtualServers": [vs, *(extra_vs or [])],
                    "contentHash": h}}
    return to_program(ProxyVirtualServer.parse(obj))


def key(vip: str = "10.96.0.10", port: int = 80) -> VSKey:
    return VSKey("TCP", vip, port)


Proxiers = dict[str, FakeProxier]


def make_agent(kernel: FakeKernel, clock: Clock, *, ipvs: ModeCapabilities | None = None,
               modes: tuple[str, ...] = ("iptables", "userspace", "ipvs")) -> tuple[Agent, Proxiers]:
    proxiers = {m: FakeProxier(m, kernel) for m in modes}
    unavailable = {}
    if ipvs is not None:
        if ipvs.available:
            proxiers["ipvs"].caps = ipvs
        else:
            proxiers.pop("ipvs")
            unavailable["ipvs"] = ipvs
    agent = Agent(dict(proxiers), node_name="node-1", clock=clock, wall=clock,
                  tracker=ChangeTracker(min_interval=0.05, full_interval=60, now=clock()),
                  unavailable=unavailable)
    return agent, proxiers


async def settle(agent: Agent, clock: Clock, steps: int = 5) -> None:
    for _ in range(steps):
        clock.t = max(clock.t, agent.tracker.due_at())
        if clock.t == float("inf"):
            return
        if await agent.run_due() is None:
            return
        if not agent.tracker.pending:
            return


def test_conversion_drains_terminating_and_drops_unserving_endpoints() -> None:
    p = pvs("web", scheduler=None, reals=[
        {"address": "10.244.2.9", "port": 8080, "weight": 3},
        {"address": "10.244.1.5", "port": 8080, "ready": False, "serving": True, "terminating": True},
        {"address": "10.244.1.6", "port": 8080, "ready": False, "serving": False},
    ])
    (vs,) = p.by_mode["iptables"]
    assert p.owner == "default/web" and p.content_hash == "h1" and not p.error
    assert vs.scheduler == "rr" and vs.owner == "default/web"
    assert vs.real_servers == (RealServer("10.244.1.5", 8080, 0), RealServer("10.244.2.9", 8080, 3))


def test_conversion_reports_a_vip_listed_twice() -> None:
    p = pvs("dup", extra_vs=[{"address": "10.96.0.10", "port": 80, "mode": "iptables"}])
    assert p.by_mode == {} and "listed twice" in p.error


async def test_first_sync_is_full_and_later_changes_are_partial() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock)
    agent.replace_all([pvs("a", vip="10.96.0.10"), pvs("b", vip="10.96.0.11", mode="userspace")])
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10")}
    assert set(kernel.table("userspace")) == {key("10.96.0.11")}
    assert agent.applied == {"default/a": "h1", "default/b": "h1"}
    assert px["iptables"].syncs == [None]

    agent.upsert(pvs("a", vip="10.96.0.10", reals=[{"address": "10.244.3.3", "port": 9000}], h="h2"))
    await settle(agent, clock)
    assert px["iptables"].syncs[-1] == frozenset({"default/a"})
    assert kernel.table("iptables")[key("10.96.0.10")].real_servers == (RealServer("10.244.3.3", 9000),)
    assert agent.applied["default/a"] == "h2"
    assert len(px["userspace"].syncs) == 1  # the other mode was not touched

    agent.delete("default/b")
    await settle(agent, clock)
    assert kernel.table("userspace") == {}
    assert "default/b" not in agent.applied


async def test_partial_sync_leaves_drift_to_the_full_sync_and_never_touches_foreign() -> None:
    kernel, clock = FakeKernel(), Clock()
    foreign = VirtualServer.create("TCP", "10.96.9.9", 53, [RealServer("10.0.0.1", 53)])
    kernel.table("iptables")[foreign.key] = foreign
    agent, _ = make_agent(kernel, clock)
    agent.replace_all([pvs("a"), pvs("c", vip="10.96.0.12")])
    await settle(agent, clock)
    del kernel.table("iptables")[key("10.96.0.12")]  # drift: someone removed our rule
    agent.upsert(pvs("a", h="h2", reals=[{"address": "10.244.1.7", "port": 8080}]))
    await settle(agent, clock)
    assert key("10.96.0.12") not in kernel.table("iptables")  # a partial sync does not re-read
    clock.t += 60
    await settle(agent, clock)
    assert key("10.96.0.12") in kernel.table("iptables")  # the full sync repaired it
    assert kernel.table("iptables")[foreign.key] == foreign


async def test_ipvs_without_ipvs_runs_in_iptables_and_says_why() -> None:
    kernel, clock = FakeKernel(), Clock()
    no_ipvs = ModeCapabilities("ipvs", False, reason="IPVS is not available in this kernel")
    agent, _ = make_agent(kernel, clock, ipvs=no_ipvs)
    agent.replace_all([pvs("web", mode="ipvs", scheduler="rr")])
    await settle(agent, clock)
    assert key() in kernel.table("iptables") and kernel.table("ipvs") == {}
    assert agent.applied == {"default/web": "h1"}
    (route,) = agent.routes["default/web"]
    assert (route.requested, route.effective) == ("ipvs", "iptables")
    assert "not available" in route.reason


async def test_scheduler_that_does_not_load_falls_back_per_service() -> None:
    kernel, clock = FakeKernel(), Clock()
    caps = ModeCapabilities("ipvs", True, schedulers=frozenset({"rr", "wrr"}))
    agent, _ = make_agent(kernel, clock, ipvs=caps)
    agent.replace_all([pvs("a", mode="ipvs", scheduler="rr"),
                       pvs("b", mode="ipvs", scheduler="mh", vip="10.96.0.11")])
    await settle(agent, clock)
    assert set(kernel.table("ipvs")) == {key("10.96.0.10")}
    assert set(kernel.table("iptables")) == {key("10.96.0.11")}
    assert "ip_vs_mh" in agent.routes["default/b"][0].reason


async def test_runtime_fallback_error_moves_the_owner_to_iptables() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock)
    px["ipvs"].fail["default/a"] = SchedulerUnavailableError("ip_vs_sh did not load", owner="default/a")
    agent.replace_all([pvs("a", mode="ipvs", scheduler="sh")])
    await settle(agent, clock, steps=5)
    assert set(kernel.table("iptables")) == {key()}
    assert agent.applied == {"default/a": "h1"}
    assert agent.routes["default/a"][0].effective == "iptables"


async def test_mode_change_programs_the_new_mode_before_withdrawing_the_old() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, _px = make_agent(kernel, clock)
    agent.replace_all([pvs("a", mode="iptables")])
    await settle(agent, clock)
    gaps: list[dict[VSKey, set[str]]] = []
    kernel.observers.append(lambda k: gaps.append(k.serving()) if key() not in k.serving() else None)
    agent.upsert(pvs("a", mode="userspace", h="h2"))
    await settle(agent, clock)
    assert gaps == []
    assert key() in kernel.table("userspace") and key() not in kernel.table("iptables")
    assert agent.applied == {"default/a": "h2"}


async def test_mode_change_whose_new_mode_fails_keeps_the_old_mode_serving() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock)
    agent.replace_all([pvs("a", mode="iptables")])
    await settle(agent, clock)
    px["userspace"].fail["default/a"] = KernelError("listen: address in use", owner="default/a")
    agent.upsert(pvs("a", mode="userspace", h="h2"))
    await settle(agent, clock, steps=1)
    assert key() in kernel.table("iptables")
    assert "default/a" not in agent.applied and "address in use" in agent.errors["default/a"].message
    del px["userspace"].fail["default/a"]
    clock.t += 1.0  # the retry interval
    await settle(agent, clock)
    assert key() in kernel.table("userspace") and key() not in kernel.table("iptables")
    assert agent.applied == {"default/a": "h2"} and agent.errors == {}


async def test_restarted_agent_adopts_the_kernel_without_operations() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, _ = make_agent(kernel, clock)
    programs = [pvs(f"s{i}", vip=f"10.96.1.{i}") for i in range(20)]
    agent.replace_all(programs)
    await settle(agent, clock)
    before = {m: dict(t) for m, t in kernel.tables.items()}
    again, _ = make_agent(kernel, clock)
    again.replace_all(programs)
    outcome = await again.run_due()
    assert outcome is not None and outcome.batch.full
    assert sum(r.total_operations for r in outcome.results) == 0
    assert kernel.tables == before


async def test_two_programs_claiming_one_vip_are_reported_not_fought_over() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, _ = make_agent(kernel, clock)
    agent.replace_all([pvs("a"), pvs("b")])
    await settle(agent, clock)
    assert kernel.table("iptables")[key()].owner == "default/a"
    assert set(agent.applied) == {"default/a"}
    assert "already programmed by default/a" in agent.errors["default/b"].message


async def test_cleanup_removes_only_what_the_agent_owns() -> None:
    kernel, clock = FakeKernel(), Clock()
    foreign = VirtualServer.create("TCP", "10.96.9.9", 53)
    kernel.table("ipvs")[foreign.key] = foreign
    agent, _ = make_agent(kernel, clock)
    agent.replace_all([pvs("a", mode="ipvs"), pvs("b", vip="10.96.0.11")])
    await settle(agent, clock)
    await agent.cleanup()
    assert kernel.table("iptables") == {} and kernel.table("ipvs") == {foreign.key: foreign}


@pytest.mark.parametrize("services", [10, 1000])
async def test_one_change_costs_the_same_with_10_or_1000_services(services: int) -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock)
    agent.replace_all([pvs(f"s{i}", vip=f"10.96.{i // 250}.{i % 250 + 1}") for i in range(services)])
    await settle(agent, clock)
    agent.upsert(pvs("s3", vip="10.96.0.4", h="h2", reals=[{"address": "10.244.1.1", "port": 80}]))
    outcome = None
    clock.t = agent.tracker.due_at()
    outcome = await agent.run_due()
    assert outcome is not None and not outcome.batch.full
    assert px["iptables"].desired_sizes == [1]
    assert sum(r.total_operations for r in outcome.results) == 3  # 1 add, 2 deletes


async def test_a_released_vip_goes_to_the_program_that_was_refused_it() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, _ = make_agent(kernel, clock)
    agent.replace_all([pvs("a"), pvs("b", h="hb")])
    await settle(agent, clock)
    agent.delete("default/a")
    await settle(agent, clock)
    assert kernel.table("iptables")[key()].owner == "default/b"
    assert agent.applied == {"default/b": "hb"} and agent.errors == {}


async def test_without_iptables_an_ipvs_service_is_reported_and_not_retried_every_second() -> None:
    clock = Clock()
    agent = Agent({}, node_name="node-1", clock=clock, wall=clock,
                  tracker=ChangeTracker(now=clock()),
                  unavailable={m: ModeCapabilities(m, False, reason=f"{m} is off") for m in
                               ("ipvs", "iptables", "userspace")})
    agent.replace_all([pvs("a", mode="ipvs")])
    await settle(agent, clock)
    assert agent.applied == {} and "iptables is off" in agent.errors["default/a"].message
    assert agent.tracker.pending == frozenset()
    assert agent.snapshot(watch_live=True).ready is False


async def test_a_bad_program_is_reported_but_the_node_stays_ready() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock)
    px["userspace"].fail["default/s"] = UnsupportedError("SCTP is not proxied in userspace",
                                                         owner="default/s")
    agent.replace_all([pvs("a"), pvs("s", mode="userspace", vip="10.96.0.11")])
    await settle(agent, clock)
    assert agent.applied == {"default/a": "h1"} and "SCTP" in agent.errors["default/s"].message
    assert agent.snapshot(watch_live=True).ready
    px["iptables"].fail["default/a"] = KernelError("iptables-restore: exit 4", owner="default/a")
    agent.upsert(pvs("a", h="h2", reals=[]))
    await settle(agent, clock, steps=1)
    assert not agent.snapshot(watch_live=True).ready


class SteppedFake(FakeProxier):
    """An in-memory proxier with the iptables proxier's ``sync_full`` shape: while it
    "reads the kernel" (``reading``, completed by the test) the agent's ``between`` runs
    partial syncs; the full write then leaves the owners ``between`` returns alone."""

    def __init__(self, mode: str, kernel: FakeKernel) -> None:
        super().__init__(mode, kernel)
        self.during_read: Any = None  # the test's hook: called with the read future
        self.touched: list[frozenset[str]] = []

    async def sync_full(self, desired: Any, between: Any) -> Any:
        reading = asyncio.get_running_loop().create_future()
        if self.during_read is not None:
            self.during_read(reading)
        else:
            reading.set_result(None)
        touched = await between(reading)
        self.touched.append(touched)
        # The write: touched owners' keys are neither desired nor owned here.
        marks = self.kernel.marks(self._mode)
        hidden = {k: o for k, o in marks.items() if o in touched}
        for k in hidden:
            del marks[k]
        try:
            return await self.sync({k: v for k, v in desired.items() if v.owner not in touched}, None)
        finally:
            marks.update(hidden)


def stepped_agent(kernel: FakeKernel, clock: Clock) -> tuple[Agent, dict[str, FakeProxier]]:
    proxiers: dict[str, FakeProxier] = {"iptables": SteppedFake("iptables", kernel),
                                        "userspace": FakeProxier("userspace", kernel)}
    agent = Agent(dict(proxiers), node_name="node-1", clock=clock, wall=clock,
                  tracker=ChangeTracker(min_interval=0.05, full_interval=60, now=clock()))
    return agent, proxiers


async def test_a_change_during_a_full_sync_is_applied_before_it_ends_and_not_reverted() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = stepped_agent(kernel, clock)
    stepped = px["iptables"]
    assert isinstance(stepped, SteppedFake)
    agent.replace_all([pvs("a"), pvs("b", vip="10.96.0.11"), pvs("c", vip="10.96.0.12")])
    await settle(agent, clock)
    assert stepped.touched == []  # the first sync after start is a plain full one
    del kernel.table("iptables")[key("10.96.0.12")]  # drift, for the full sync to repair
    new_reals = [{"address": "10.244.3.3", "port": 9000}]
    seen_in_kernel: list[tuple[RealServer, ...]] = []

    def during_read(reading: asyncio.Future[None]) -> None:
        # A change lands while the full sync reads the kernel; the read ends later.
        clock.t += 0.05
        agent.upsert(pvs("a", reals=new_reals, h="h2"))
        agent.delete("default/b")

        def end_read() -> None:
            seen_in_kernel.append(kernel.table("iptables")[key()].real_servers)
            reading.set_result(None)

        asyncio.get_running_loop().call_later(0.01, end_read)

    stepped.during_read = during_read
    synced: list[bool] = []
    agent.on_synced = lambda o: synced.append(o.batch.full)
    clock.t += 60
    outcome = await agent.run_due()
    assert outcome is not None and outcome.batch.full
    assert synced == [False, True]  # the partial inside the full one is announced too
    assert stepped.touched == [frozenset({"default/a", "default/b"})]
    # The change reached the kernel while the full sync was still reading it ...
    assert seen_in_kernel == [(RealServer("10.244.3.3", 9000),)]
    assert stepped.syncs[-2:] == [frozenset({"default/a", "default/b"}), None]
    # ... and the full sync's write neither reverted it nor brought b back; c repaired.
    table = kernel.table("iptables")
    assert table[key()].real_servers == (RealServer("10.244.3.3", 9000),)
    assert key("10.96.0.11") not in table and key("10.96.0.12") in table
    assert agent.applied == {"default/a": "h2", "default/c": "h1"}
    assert agent.tracker.pending == frozenset()
    assert agent.key_owner["iptables"] == {key(): "default/a", key("10.96.0.12"): "default/c"}


async def test_a_mode_change_during_a_full_sync_keeps_make_before_break() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = stepped_agent(kernel, clock)
    stepped = px["iptables"]
    assert isinstance(stepped, SteppedFake)
    agent.replace_all([pvs("a")])
    await settle(agent, clock)
    gaps: list[dict[VSKey, set[str]]] = []
    kernel.observers.append(lambda k: gaps.append(k.serving()) if key() not in k.serving() else None)

    def during_read(reading: asyncio.Future[None]) -> None:
        clock.t += 0.05
        agent.upsert(pvs("a", mode="userspace", h="h2"))
        asyncio.get_running_loop().call_later(0.01, reading.set_result, None)

    stepped.during_read = during_read
    clock.t += 60
    assert await agent.run_due() is not None
    assert gaps == []
    assert key() in kernel.table("userspace") and key() not in kernel.table("iptables")
    assert agent.applied == {"default/a": "h2"}
    # The next full sync (nothing pending) changes nothing.
    stepped.during_read = None
    clock.t += 60
    outcome = await agent.run_due()
    assert outcome is not None and sum(r.total_operations for r in outcome.results) == 0


async def test_a_change_landing_while_a_sync_writes_is_not_reported_applied_early() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = make_agent(kernel, clock, modes=("iptables",))
    agent.replace_all([pvs("a")])
    await settle(agent, clock)
    real_sync = px["iptables"].sync
    reported: list[str | None] = []

    async def sync_then_change(desired: Any, only: Any = None) -> Any:
        result = await real_sync(desired, only)
        if not reported:  # the change lands while this sync's kernel write is in flight
            agent.upsert(pvs("a", h="h2", reals=[{"address": "10.244.3.3", "port": 9000}]))
            reported.append(None)
        return result

    px["iptables"].sync = sync_then_change  # type: ignore[method-assign]
    clock.t += 60
    assert await agent.run_due() is not None
    assert agent.applied == {"default/a": "h1"}  # the kernel holds h1's program
    await settle(agent, clock)
    assert agent.applied == {"default/a": "h2"}
    assert kernel.table("iptables")[key()].real_servers == (RealServer("10.244.3.3", 9000),)


def two_stepped_agent(kernel: FakeKernel, clock: Clock) -> tuple[Agent, dict[str, SteppedFake]]:
    """iptables and ipvs both offer sync_full (as the real proxiers do)."""
    proxiers = {"iptables": SteppedFake("iptables", kernel), "ipvs": SteppedFake("ipvs", kernel)}
    agent = Agent(dict(proxiers), node_name="node-1", clock=clock, wall=clock,
                  tracker=ChangeTracker(min_interval=0.05, full_interval=60, now=clock()))
    return agent, proxiers


def land_during_read(px: SteppedFake, clock: Clock, change: Any) -> None:
    """Make ``change`` land while ``px`` reads the kernel in its next full sync."""

    def during_read(reading: asyncio.Future[None]) -> None:
        clock.t += 0.05
        change()
        asyncio.get_running_loop().call_later(0.01, reading.set_result, None)
        px.during_read = None

    px.during_read = during_read


async def test_an_ipvs_change_during_the_ipvs_full_sync_is_applied_and_not_reverted() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent, px = two_stepped_agent(kernel, clock)
    agent.replace_all([pvs("a", mode="ipvs"), pvs("b", mode="ipvs", vip="10.96.0.11"),
                       pvs("c", vip="10.96.0.12")])
    await settle(agent, clock)
    del kernel.table("ipvs")[key("10.96.0.11")]  # drift, for the full sync to repair
    seen: list[tuple[RealServer, ...]] = []
    new_reals = [{"address": "10.244.3.3", "port": 9000}]
    land_during_read(px["ipvs"], clock, lambda: agent.upsert(pvs("a", mode="ipvs", reals=new_reals,
                                                                 h="h2")))
    agent.on_synced = lambda o: seen.append(kernel.table("ipvs")[key()].real_servers)
    clock.t += 60
    outcome = await agent.run_due()
    assert outcome is not None and outcome.batch.full
    # The partial sync ran inside the ipvs proxier's full sync (the second proxier called) ...
    assert px["ipvs"].touched == [frozenset({"default/a"})] and px["iptables"].touched == [frozenset()]
    assert seen[0] == (RealServer("10.244.3.3", 9000),)  # ... reported before the full one ended
    # ... and the full write did not revert it; b's drift repaired.
    assert kernel.table("ipvs")[key()].real_servers == (RealServer("10.244.3.3", 9000),)
    assert key("10.96.0.11") in kernel.table("ipvs")
    assert agent.applied == {"default/a": "h2", "default/b": "h1", "default/c": "h1"}
    clock.t += 60
    outcome = await agent.run_due()
    assert outcome is not None and sum(r.total_operations for r in outcome.results) == 0


async def test_a_change_during_the_second_proxiers_read_starts_from_what_the_first_wrote() -> None:
    """a moves ipvs -> iptables in the full sync (iptables written first, ipvs still holds
    it), then back to ipvs while the ipvs proxier reads: the partial sync must withdraw
    it from iptables, which only this full sync had written."""
    kernel, clock = FakeKernel(), Clock()
    agent, px = two_stepped_agent(kernel, clock)
    agent.replace_all([pvs("a", mode="ipvs")])
    await settle(agent, clock)
    gaps: list[dict[VSKey, set[str]]] = []
    kernel.observers.append(lambda k: gaps.append(k.serving()) if key() not in k.serving() else None)
    clock.t += 30
    agent.upsert(pvs("a", mode="iptables", h="h2"))  # pending when the full sync starts
    land_during_read(px["ipvs"], clock, lambda: agent.upsert(pvs("a", mode="ipvs", h="h3")))
    clock.t += 30
    outcome = await agent.run_due()
    assert outcome is not None and outcome.batch.full
    assert px["ipvs"].touched[-1] == frozenset({"default/a"})
    assert gaps == []
    assert key() in kernel.table("ipvs") and key() not in kernel.table("iptables")
    assert agent.placement["default/a"].keys() == {"ipvs"}
    assert agent.applied == {"default/a": "h3"}
    clock.t += 60
    outcome = await agent.run_due()
    assert outcome is not None and sum(r.total_operations for r in outcome.results) == 0
