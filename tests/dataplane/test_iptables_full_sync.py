"""iptables mode: the periodic full sync on the host kernel restores only what drifted.

A steady-state full sync must write nothing (the nf_tables rule handles of every
chain stay the same: a rewritten chain gets new handles), a rule deleted or
altered by hand in an owned chain is repaired by the next full sync, and
foreign chains and rules keep their handles throughout.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from svcproxy.dataplane.iptables import drift, rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter, SavedTable
from svcproxy.dataplane.proxier import KernelError
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy_lab.topology import Topology, in_ns

VIP = "10.96.6.10"
VIP6 = "fd00:96::6:10"


def proxier(topo: Topology, **kw: object) -> IptablesProxier:
    return IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node), **kw)  # type: ignore[arg-type]


def services(topo: Topology) -> list[VirtualServer]:
    """Every rule form the mode writes: even and weighted spreads (probabilities like
    1/3 that the kernel rounds), affinity, a draining endpoint, no ready endpoint, UDP,
    IPv6."""
    def reals(weights: tuple[int, ...]) -> list[RealServer]:
        return [RealServer(a, 8080, w) for a, w in zip(topo.backends, weights, strict=False)]

    return [
        VirtualServer.create("TCP", VIP, 80, reals((1, 1, 1)), owner="ns/even"),
        VirtualServer.create("TCP", VIP, 81, reals((3, 2, 7)), owner="ns/weighted"),
        VirtualServer.create("TCP", VIP, 82, reals((1, 1, 1)), persistence=600, owner="ns/sticky"),
        VirtualServer.create("TCP", VIP, 83, reals((1, 0, 1)), owner="ns/draining"),
        VirtualServer.create("TCP", VIP, 84, [], owner="ns/empty"),
        VirtualServer.create("UDP", VIP, 53, reals((1, 1, 1)), owner="ns/dns"),
        VirtualServer.create("TCP", VIP6, 80, [RealServer("fd00:244::2", 8080)], persistence=60,
                             owner="ns/six"),
    ]


def handles(topo: Topology, family: str, table: str) -> list[str]:
    """Every rule of the table with its nf_tables handle (changes when a rule is rewritten)."""
    text = in_ns(topo.node, "nft", "-a", "list", "table", family, table).stdout
    # Counters move with any stray packet; the rule text and its handle do not.
    return [re.sub(r"counter packets \d+ bytes \d+", "counter", line.strip())
            for line in text.splitlines() if "# handle" in line]


def kernel_state(topo: Topology) -> list[str]:
    return [*handles(topo, "ip", "nat"), *handles(topo, "ip", "filter"), *handles(topo, "ip6", "nat")]


def owned(topo: Topology) -> list[str]:
    """Owned rules as iptables-save prints them, sorted (the SERVICES jump order is free)."""
    out = []
    for cmd in ("iptables-save", "ip6tables-save"):
        for table in ("nat", "filter"):
            text = in_ns(topo.node, cmd, "-t", table).stdout
            out += [f"{cmd} {line}" for line in text.splitlines() if line.startswith("-A SVCPROXY-")]
    return sorted(out)


def test_steady_state_full_sync_writes_nothing(topo: Topology) -> None:
    p = proxier(topo)
    table = make_table(services(topo))
    assert asyncio.run(p.sync(table)).ok
    assert p.last_full.rewrite_all  # the first sync after start rewrites everything
    before = kernel_state(topo)
    assert len(before) > 40
    result = asyncio.run(p.sync(table))
    assert result.ok, result.errors
    assert (p.last_full.restores, p.last_full.dirty_services) == (0, 0), p.last_full
    assert kernel_state(topo) == before
    # A restarted agent rewrites once (nothing trusted), then is steady again.
    restarted = proxier(topo)
    assert asyncio.run(restarted.sync(table)).ok and restarted.last_full.rewrite_all
    assert asyncio.run(restarted.sync(table)).ok
    assert restarted.last_full.restores == 0
    asyncio.run(restarted.cleanup())


def test_drift_in_owned_chains_is_repaired_by_the_next_full_sync(topo: Topology) -> None:
    p = proxier(topo)
    servers = services(topo)
    table = make_table(servers)
    assert asyncio.run(p.sync(table)).ok
    want = owned(topo)
    even, weighted = servers[:2]
    ipt = ("iptables", "-t", "nat")
    # 1. a rule deleted from a service chain (one endpoint of `even` becomes unreachable)
    in_ns(topo.node, *ipt, "-D", rules.service_chain(even.key), "2")
    # 2. a DNAT altered in an endpoint chain of `weighted`
    sep = rules.endpoint_chain(weighted.key, weighted.real_servers[0])
    in_ns(topo.node, *ipt, "-R", sep, "2", "-p", "tcp", "-j", "DNAT", "--to-destination", "10.244.9.99:9")
    # 3. the jump of `sticky` deleted from SVCPROXY-SERVICES, a duplicate of `draining`'s added
    jump = next(line for line in in_ns(topo.node, "iptables-save", "-t", "nat").stdout.splitlines()
                if line.startswith(f"-A {rules.SERVICES} ") and "ns/sticky" in line)
    in_ns(topo.node, *ipt, "-D", rules.SERVICES, *_args(jump))
    dup = next(line for line in in_ns(topo.node, "iptables-save", "-t", "nat").stdout.splitlines()
               if line.startswith(f"-A {rules.SERVICES} ") and "ns/draining" in line)
    in_ns(topo.node, *ipt, "-A", rules.SERVICES, *_args(dup))
    # 4. a stray owned chain, a stray rule in the masquerade chain, a reject rule removed
    in_ns(topo.node, *ipt, "-N", "SVCPROXY-SVC-STRAYSTRAYSTRAY")
    in_ns(topo.node, *ipt, "-A", rules.MARK_MASQ, "-j", "RETURN")
    in_ns(topo.node, "iptables", "-t", "filter", "-F", rules.NO_ENDPOINTS)
    assert owned(topo) != want
    assert len(set(topo.ask(VIP, 80, 30))) == 2  # the drift is real: be? is unreachable
    result = asyncio.run(p.sync(table))
    assert result.ok, result.errors
    assert p.last_full.restores == 1 and not p.last_full.rewrite_all
    assert p.last_full.dirty_services == 3, p.last_full  # even, weighted, sticky (jump missing)
    assert owned(topo) == want
    assert set(topo.ask(VIP, 80, 40)) == {"be0", "be1", "be2"}
    assert set(topo.ask(VIP, 81, 80)) == {"be0", "be1", "be2"}  # weights 3:2:7
    assert len(set(topo.ask(VIP, 82, 10))) == 1
    topo.route_services_nowhere()
    assert topo.connect_error(VIP, 84) == "ECONNREFUSED"
    # Steady again: the repair left nothing to do.
    assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 0
    asyncio.run(p.cleanup())


def _args(saved_rule: str) -> list[str]:
    """An iptables-save rule line as iptables arguments after the chain name."""
    return [a.replace('"', "") for a in saved_rule.split()[2:]]


def test_foreign_chains_keep_their_handles_through_full_syncs_and_repairs(topo: Topology) -> None:
    ns = topo.node
    in_ns(ns, "iptables", "-t", "nat", "-N", "FOREIGN-FS")
    in_ns(ns, "iptables", "-t", "nat", "-A", "FOREIGN-FS", "-d", "192.0.2.1/32", "-j", "RETURN")
    in_ns(ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", "192.0.2.2/32", "-j", "FOREIGN-FS")
    in_ns(ns, "iptables", "-t", "filter", "-A", "INPUT", "-s", "192.0.2.3/32", "-j", "ACCEPT")

    def foreign() -> list[str]:
        return [re.sub(r"\s+", " ", line) for line in kernel_state(topo)
                if "192.0.2." in line or "FOREIGN" in line]

    before = foreign()
    assert len(before) == 4  # the chain, its rule, the jump to it, the filter rule
    p = proxier(topo)
    table = make_table(services(topo))
    for _ in range(2):
        assert asyncio.run(p.sync(table)).ok
        assert foreign() == before
    in_ns(ns, "iptables", "-t", "nat", "-F", rules.POSTROUTING)  # drift in a base chain
    assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 1
    assert foreign() == before
    asyncio.run(p.cleanup())
    assert foreign() == before
    in_ns(ns, "iptables", "-t", "nat", "-D", "PREROUTING", "-d", "192.0.2.2/32", "-j", "FOREIGN-FS")
    in_ns(ns, "iptables", "-t", "nat", "-F", "FOREIGN-FS")
    in_ns(ns, "iptables", "-t", "nat", "-X", "FOREIGN-FS")
    in_ns(ns, "iptables", "-t", "filter", "-D", "INPUT", "-s", "192.0.2.3/32", "-j", "ACCEPT")


@pytest.mark.parametrize("partial_first", [True, False], ids=["partial-before-read", "partial-after-read"])
def test_a_partial_sync_during_the_full_syncs_read_back_is_kept(
    topo: Topology, monkeypatch: pytest.MonkeyPatch, partial_first: bool
) -> None:
    """The agent's periodic full sync (``sync_full``) lets partial syncs run while it reads
    back; what they wrote (new chains, a new endpoint chain, moved jumps) must survive the
    full sync's repair write, whichever of the two came first."""
    def x(*backends: int) -> VirtualServer:
        reals = [RealServer(topo.backends[i], 8080) for i in backends]
        return VirtualServer.create("TCP", VIP, 85, reals, owner="ns/x")

    p = proxier(topo)
    servers = services(topo)[:2]
    assert asyncio.run(p.sync(make_table([*servers, x(0, 1)]))).ok
    in_ns(topo.node, "iptables", "-t", "nat", "-D", rules.service_chain(servers[1].key), "2")  # drift
    gate = threading.Event()
    observe = p._observe

    def gated_observe(v6: bool, reader: drift.Reader) -> dict[str, SavedTable[drift.Chain]]:
        if partial_first:
            assert gate.wait(10)
        return observe(v6, reader)

    monkeypatch.setattr(p, "_observe", gated_observe)

    async def between(reading: asyncio.Future[object]) -> frozenset[str]:
        if not partial_first:
            await asyncio.wait_for(asyncio.shield(reading), 10)
        result = await p.sync(make_table([x(1, 2)]), frozenset({"ns/x"}))
        assert result.ok, result.errors
        gate.set()
        await reading
        return frozenset({"ns/x"})

    async def full() -> object:
        return await p.sync_full(make_table([*servers, x(0, 1)]), between)  # the full's older view

    result = asyncio.run(full())
    assert result.ok, result.errors  # type: ignore[attr-defined]
    assert p.last_full.dirty_services == 1  # `weighted` repaired; x left as the partial wrote it
    assert set(topo.ask(VIP, 85, 40)) == {"be1", "be2"}
    assert set(topo.ask(VIP, 81, 80)) == {"be0", "be1", "be2"}  # weights 3:2:7
    monkeypatch.undo()
    # The mirror follows the partial too: withdrawing x (a partial sync, mirror-driven)
    # leaves none of its chains, and the next full sync finds nothing to do.
    assert asyncio.run(p.sync({}, frozenset({"ns/x"}))).ok
    text = in_ns(topo.node, "iptables-save", "-t", "nat").stdout
    assert not [c for c in rules.chains_of(x(0, 1, 2)) if c in text]
    assert asyncio.run(p.sync(make_table(servers))).ok
    assert p.last_full.restores == 0, p.last_full
    asyncio.run(p.cleanup())


def test_a_read_back_cut_short_by_a_failing_iptables_save_writes_nothing(
    topo: Topology, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """iptables-save is read as a stream: when it fails after printing part of the table,
    the full sync must not act on the part (it would sweep every chain it did not see)."""
    p = proxier(topo)
    table = make_table(services(topo))
    assert asyncio.run(p.sync(table)).ok
    before = kernel_state(topo)
    real = shutil.which("iptables-save")
    assert real
    stand_in = tmp_path / "iptables-save"
    stand_in.write_text(f"#!/bin/sh\n{real} \"$@\" | head -n 30\n"
                        "echo 'iptables-save: simulated failure midway' >&2\nexit 1\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    result = asyncio.run(p.sync(table))
    errors = [e for e in result.errors if isinstance(e, KernelError)]
    assert errors and "stopped after 30 lines with exit status 1" in str(errors[0]), result.errors
    assert "simulated failure midway" in str(errors[0])
    assert {"ns/even", "ns/empty"} <= result.failed_owners
    assert kernel_state(topo) == before  # nothing swept, nothing rewritten
    monkeypatch.undo()
    assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 0, p.last_full
    asyncio.run(p.cleanup())


def test_a_missing_filter_table_is_made_again(topo: Topology) -> None:
    """A table the kernel no longer has reads back as empty (not as unparsable): the
    full sync puts back our filter chain and its jumps and leaves nat alone."""
    p = proxier(topo)
    table = make_table(services(topo))
    assert asyncio.run(p.sync(table)).ok
    want, nat = owned(topo), handles(topo, "ip", "nat")
    in_ns(topo.node, "nft", "delete", "table", "ip", "filter")
    assert asyncio.run(p.sync(table)).ok
    assert (p.last_full.dirty_services, p.last_full.restores) == (0, 1), p.last_full
    assert owned(topo) == want and handles(topo, "ip", "nat") == nat
    text = in_ns(topo.node, "iptables-save", "-t", "filter").stdout
    assert sum(f"-j {rules.NO_ENDPOINTS}" in line for line in text.splitlines()) == 3
    asyncio.run(p.cleanup())


def test_foreign_chains_named_like_ours_are_neither_read_nor_swept(topo: Topology) -> None:
    ns, ipt = topo.node, ("iptables", "-t", "nat")
    in_ns(ns, *ipt, "-N", "KUBE-SVCPROXY-SERVICES")  # our prefix, not at the start
    in_ns(ns, *ipt, "-N", "SVCPROXYSERVICES")  # our name without the dash
    in_ns(ns, *ipt, "-A", "KUBE-SVCPROXY-SERVICES", "-d", "192.0.2.5/32", "-j", "RETURN")
    in_ns(ns, *ipt, "-A", "SVCPROXYSERVICES", "-d", "192.0.2.6/32", "-j", "RETURN")
    in_ns(ns, *ipt, "-A", "PREROUTING", "-d", "192.0.2.7/32", "-j", "KUBE-SVCPROXY-SERVICES")

    def foreign() -> list[str]:
        return [line for line in kernel_state(topo) if "192.0.2." in line or "SVCPROXYSERVICES" in line
                or "KUBE-SVCPROXY" in line]

    before = foreign()
    assert len(before) == 5  # two chains, their rules, the jump
    p = proxier(topo)
    table = make_table(services(topo))
    assert asyncio.run(p.sync(table)).ok
    assert asyncio.run(p.sync(table)).ok and p.last_full.restores == 0, p.last_full
    assert foreign() == before
    asyncio.run(p.cleanup())
    assert foreign() == before
    in_ns(ns, *ipt, "-D", "PREROUTING", "-d", "192.0.2.7/32", "-j", "KUBE-SVCPROXY-SERVICES")
    for chain in ("KUBE-SVCPROXY-SERVICES", "SVCPROXYSERVICES"):
        in_ns(ns, *ipt, "-F", chain)
        in_ns(ns, *ipt, "-X", chain)
