"""UDP conntrack cleanup on the host kernel: a long-lived flow leaves a removed backend.

A client in its netns sends UDP from one fixed source port to the ClusterIP every 50 ms;
its conntrack entry pins it to one backend. That backend is removed from the table (a
partial sync; its echo server keeps running, as a terminating Pod's may): within 1 s the
answers must come from a live backend. Without the cleanup they keep coming from the
removed one until the entry expires, which a flow refreshing it never lets happen.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from svcproxy.dataplane.conntrack import ConntrackCleaner
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.netfilter import Netfilter
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy_lab.topology import Topology

VIP = "10.96.5.53"


def udp_service(topo: Topology, names: set[str]) -> VirtualServer:
    reals = [RealServer(a, 8080) for i, a in enumerate(topo.backends) if f"be{i}" in names]
    return VirtualServer.create("UDP", VIP, 53, reals, owner="ns/dns")


def flow_after_removal(topo: Topology, cleaner: ConntrackCleaner | None) -> tuple[str, list[str]]:
    """The backend the flow was pinned to, and who answered it from 1 s after the
    partial sync that removed that backend began."""
    p = IptablesProxier(Netfilter(netns=topo.node), Netfilter(ipv6=True, netns=topo.node),
                        conntrack=cleaner)
    every = {"be0", "be1", "be2"}
    assert asyncio.run(p.sync(make_table([udp_service(topo, every)]))).ok
    flow = subprocess.Popen(
        ["ip", "netns", "exec", topo.client, sys.executable, "-m", "svcproxy_lab.udpflow", VIP, "53", "5"],
        stdout=subprocess.PIPE, text=True,
    )
    assert flow.stdout is not None
    try:
        assert flow.stdout.readline().startswith("port ")
        first = [flow.stdout.readline().split()[1] for _ in range(10)]  # 0.5 s: pinned
        assert len(set(first)) == 1 and first[0] in every, first
        pinned = first[0]
        removed_at = time.time()  # before the sync: its own time counts in the second
        result = asyncio.run(p.sync(make_table([udp_service(topo, every - {pinned})]), frozenset({"ns/dns"})))
        assert result.ok, result.errors
        answers = [line.split() for line in flow.stdout]
    finally:
        flow.kill()
        flow.wait()
        asyncio.run(p.cleanup())
    late = [name for stamp, name in answers if float(stamp) > removed_at + 1.0]
    assert len(late) >= 20, answers  # the flow kept going after the change
    return pinned, late


@pytest.mark.parametrize("netlink", [True, False], ids=["netlink", "conntrack-tool"])
def test_udp_flow_moves_off_a_removed_backend_within_a_second(topo: Topology, netlink: bool) -> None:
    cleaner = ConntrackCleaner(netns=topo.node, netlink=netlink)
    pinned, late = flow_after_removal(topo, cleaner)
    assert set(late) <= {"be0", "be1", "be2"} - {pinned}, f"still pinned to {pinned} after 1 s: {late[:10]}"
    assert cleaner.deleted >= 1
    assert cleaner.netlink == netlink  # netlink did the work when asked to (no fallback)


def test_without_cleanup_the_flow_stays_on_the_removed_backend(topo: Topology) -> None:
    """The case above is a real test: with no cleanup the kernel keeps the flow pinned."""
    pinned, late = flow_after_removal(topo, None)
    assert set(late) == {pinned}, late
