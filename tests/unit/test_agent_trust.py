"""The agent refuses untrusted programs (svcproxy.agent.trust): the check itself, the
address book the watches fill, and the agent that withdraws a refused Service, programs
the rest and reports why. In-memory proxiers, fake time."""

from __future__ import annotations

from typing import get_args

import pytest
from test_agent_fake import FakeKernel, FakeProxier
from test_agent_sync import Clock, key, pvs, settle

from svcproxy.agent.agent import Agent
from svcproxy.agent.report import build_status
from svcproxy.agent.tracker import ChangeTracker
from svcproxy.agent.trust import (
    FOREIGN_REAL_SERVER,
    FOREIGN_VIP,
    REFUSAL_REASONS,
    UNKNOWN_SERVICE,
    AddressBook,
    NetworkSet,
    network,
    node_networks,
    refusal_of,
    service_addresses,
)
from svcproxy.api.node import RefusalReason

NODE = {"metadata": {"name": "node-1"},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "172.29.0.11"},
                                 {"type": "Hostname", "address": "node-1"}]}}
SPACE = NetworkSet(node_networks(NODE))
SVC = frozenset({"10.96.0.10"})


def test_refusal_reasons_are_the_api_reasons() -> None:
    assert set(REFUSAL_REASONS) == set(get_args(RefusalReason))


def test_service_addresses_are_cluster_external_and_load_balancer_ips() -> None:
    svc = {"spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96:0:0::a"],
                    "externalIPs": ["192.0.2.7"]},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.3"}, {"hostname": "lb.example"}]}}}
    assert service_addresses(svc) == {"10.96.0.10", "fd00:96::a", "192.0.2.7", "198.51.100.3"}
    assert service_addresses({"spec": {"clusterIP": "None"}}) == frozenset()
    assert service_addresses({"spec": {"clusterIP": "10.96.0.11"}}) == {"10.96.0.11"}


def test_node_space_holds_pod_cidrs_and_node_addresses_only() -> None:
    assert "10.244.1.77" in SPACE and "fd00:10:244:1::9" in SPACE
    assert "172.29.0.11" in SPACE  # a hostNetwork Pod's endpoint
    assert "10.244.2.5" not in SPACE and "172.29.0.12" not in SPACE
    assert "8.8.8.8" not in SPACE and "node-1" not in SPACE and "fd00:10:244:2::9" not in SPACE


def test_network_set_merges_adjacent_and_overlapping_ranges() -> None:
    nets = NetworkSet([network("10.0.0.0/25"), network("10.0.0.128/25"), network("10.0.0.0/24"),
                       network("10.0.2.5/32")])
    assert all(a in nets for a in ("10.0.0.0", "10.0.0.200", "10.0.0.255", "10.0.2.5"))
    assert all(a not in nets for a in ("10.0.1.0", "10.0.2.4", "10.0.2.6", "9.255.255.255"))


def test_a_program_within_its_service_and_the_pod_space_is_trusted() -> None:
    good = pvs("web", reals=[{"address": "10.244.1.5", "port": 80}, {"address": "172.29.0.11", "port": 80}])
    assert refusal_of(good, SVC, SPACE) is None


def test_a_foreign_vip_is_refused_and_named() -> None:
    refusal = refusal_of(pvs("web", vip="10.96.0.99", reals=[{"address": "10.244.1.5", "port": 80}]),
                         SVC, SPACE)
    assert refusal is not None and refusal.reason == FOREIGN_VIP
    assert "10.96.0.99" in refusal.message and "10.96.0.10" in refusal.message


def test_a_real_server_outside_the_pod_space_is_refused_and_named() -> None:
    program = pvs("web", reals=[{"address": "10.244.1.5", "port": 80},
                                {"address": "203.0.113.9", "port": 80}])
    refusal = refusal_of(program, SVC, SPACE)
    assert refusal is not None and refusal.reason == FOREIGN_REAL_SERVER
    assert "203.0.113.9" in refusal.message and "--extra-pod-cidr" in refusal.message
    assert refusal_of(program, SVC, NetworkSet([*node_networks(NODE), network("203.0.113.0/24")])) is None


def test_a_program_of_an_unknown_service_is_refused() -> None:
    refusal = refusal_of(pvs("web"), None, SPACE)
    assert refusal is not None and refusal.reason == UNKNOWN_SERVICE


def test_a_departed_node_stays_trusted_for_the_grace_then_not() -> None:
    book = AddressBook(departed_grace=300)
    book.set_node("node-1", node_networks(NODE))
    book.set_service("default/web", SVC)
    program = pvs("web", reals=[{"address": "10.244.1.5", "port": 80}])
    assert book.check(program) is None
    book.drop_node("node-1", now=1000)
    assert book.check(program) is None and not book.expire(1299)
    assert book.expire(1300)
    refusal = book.check(program)
    assert refusal is not None and refusal.reason == FOREIGN_REAL_SERVER
    assert book.set_node("node-1", node_networks(NODE)) and book.check(program) is None


def test_bad_extra_cidr_says_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        network("everywhere")


def guarded(kernel: FakeKernel, clock: Clock) -> Agent:
    proxiers = {m: FakeProxier(m, kernel) for m in ("iptables", "userspace")}
    agent = Agent(dict(proxiers), node_name="node-1", clock=clock, wall=clock,
                  tracker=ChangeTracker(min_interval=0.05, full_interval=60, now=clock()),
                  guard=AddressBook())
    node2 = {"metadata": {"name": "node-2"}, "spec": {"podCIDRs": ["10.244.2.0/24"]}}
    agent.nodes_listed([("node-1", node_networks(NODE)), ("node-2", node_networks(node2))])
    agent.services_listed([("default/good", frozenset({"10.96.0.20"})), ("default/web", SVC)])
    return agent


async def test_refused_program_is_withdrawn_reported_and_cleared_when_fixed() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent = guarded(kernel, clock)
    agent.replace_all([pvs("web"), pvs("good", vip="10.96.0.20")])
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10"), key("10.96.0.20")}

    # A rewrite pointing the VIP at an address outside every Pod range: the whole
    # program is withdrawn, the other Service stays.
    agent.upsert(pvs("web", reals=[{"address": "203.0.113.9", "port": 80}], h="bad"))
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.20")}
    assert agent.applied == {"default/good": "h1"}
    status = build_status(agent.snapshot(watch_live=True))
    (err,) = status["errors"]
    assert err["service"] == "default/web" and err["reason"] == FOREIGN_REAL_SERVER
    assert "203.0.113.9" in err["message"]

    agent.upsert(pvs("web", vip="10.96.0.99", h="bad2"))
    await settle(agent, clock)
    assert agent.errors["default/web"].reason == FOREIGN_VIP
    assert set(kernel.table("iptables")) == {key("10.96.0.20")}

    agent.upsert(pvs("web", h="fixed"))
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10"), key("10.96.0.20")}
    assert agent.applied["default/web"] == "fixed" and not agent.errors and not agent.refused


async def test_unknown_service_waits_unreported_then_programs_when_the_service_comes() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent = guarded(kernel, clock)
    agent.replace_all([pvs("late", vip="10.96.0.30")])
    await settle(agent, clock)
    assert kernel.table("iptables") == {} and agent.errors["default/late"].reason == UNKNOWN_SERVICE
    assert build_status(agent.snapshot(watch_live=True))["errors"] == []  # within the grace
    clock.t += agent.unknown_grace
    (err,) = build_status(agent.snapshot(watch_live=True))["errors"]
    assert err["reason"] == UNKNOWN_SERVICE
    agent.service_changed(("default/late", frozenset({"10.96.0.30"})))
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.30")} and not agent.errors


async def test_a_new_node_lets_a_refused_program_in() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent = guarded(kernel, clock)
    agent.replace_all([pvs("web", reals=[{"address": "10.244.3.5", "port": 80}])])
    await settle(agent, clock)
    assert kernel.table("iptables") == {} and "default/web" in agent.refused
    node3 = {"metadata": {"name": "node-3"}, "spec": {"podCIDRs": ["10.244.3.0/24"]}}
    agent.node_changed(("node-3", node_networks(node3)))
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10")} and not agent.refused


async def test_a_node_losing_a_range_refuses_programs_that_used_it() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent = guarded(kernel, clock)
    agent.replace_all([pvs("web", reals=[{"address": "10.244.2.5", "port": 80}])])
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10")}
    moved = {"metadata": {"name": "node-2"}, "spec": {"podCIDRs": ["10.244.7.0/24"]}}
    agent.node_changed(("node-2", node_networks(moved)))
    # Well before the next full sync (60 s): the narrowing itself re-checks the program.
    assert agent.tracker.due_at() < clock.t + 1
    clock.t += 1
    await agent.run_due()
    assert kernel.table("iptables") == {} and agent.errors["default/web"].reason == FOREIGN_REAL_SERVER


async def test_service_addresses_changing_away_refuse_the_program() -> None:
    kernel, clock = FakeKernel(), Clock()
    agent = guarded(kernel, clock)
    agent.replace_all([pvs("web")])
    await settle(agent, clock)
    assert set(kernel.table("iptables")) == {key("10.96.0.10")}
    agent.service_deleted("default/web")
    await settle(agent, clock)
    assert kernel.table("iptables") == {} and agent.errors["default/web"].reason == UNKNOWN_SERVICE
