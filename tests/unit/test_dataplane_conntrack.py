"""Which conntrack flows a table change leaves stale (kube-proxy's cases), and the tool's argv."""

from __future__ import annotations

import subprocess

import pytest

from svcproxy.dataplane import conntrack
from svcproxy.dataplane.conntrack import ConntrackCleaner, StaleFlow, clear_stale, stale_flows
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table

VIP = "10.96.0.10"


def vs(*reals: tuple[str, int], protocol: str = "UDP", address: str = VIP) -> VirtualServer:
    servers = [RealServer(a, 53, w) for a, w in reals]
    return VirtualServer.create(protocol, address, 53, servers, owner="ns/dns")  # type: ignore[arg-type]


A, B, C = "10.244.1.2", "10.244.1.3", "10.244.1.4"


def ep(address: str, protocol: str = "UDP") -> StaleFlow:
    return StaleFlow(protocol, VIP, 53, address, 53, "ns/dns")


def test_removed_real_server_is_cleared() -> None:
    assert stale_flows(make_table([vs((A, 1), (B, 1))]), make_table([vs((A, 1))])) == [ep(B)]


def test_real_server_that_stops_taking_new_connections_is_cleared() -> None:
    assert stale_flows(make_table([vs((A, 1), (B, 1))]), make_table([vs((A, 1), (B, 0))])) == [ep(B)]


def test_draining_real_server_removed_later_is_not_cleared_again() -> None:
    assert stale_flows(make_table([vs((A, 1), (B, 0))]), make_table([vs((A, 1))])) == []


def test_removed_virtual_server_clears_each_serving_real_server() -> None:
    assert stale_flows(make_table([vs((A, 1), (B, 1), (C, 0))]), {}) == [ep(A), ep(B)]


def test_first_real_server_clears_the_whole_virtual_ip_port() -> None:
    whole = [StaleFlow("UDP", VIP, 53, owner="ns/dns")]
    assert stale_flows(make_table([vs()]), make_table([vs((A, 1))])) == whole
    assert stale_flows(make_table([vs((A, 0))]), make_table([vs((A, 1))])) == whole  # none serving
    assert stale_flows({}, make_table([vs((A, 1))])) == whole  # a new virtual server had none


def test_unchanged_or_grown_table_clears_nothing() -> None:
    table = make_table([vs((A, 1), (B, 1))])
    assert stale_flows(table, table) == []
    assert stale_flows(make_table([vs((A, 1))]), table) == []
    assert stale_flows({}, make_table([vs()])) == []  # still no real server


def test_tcp_is_never_touched() -> None:
    old = make_table([vs((A, 1), (B, 1), protocol="TCP")])
    assert stale_flows(old, {}) == []
    assert stale_flows(old, make_table([vs((A, 1), (B, 0), protocol="TCP")])) == []
    assert stale_flows({}, old) == []


def test_sctp_is_cleared_like_udp() -> None:
    old = make_table([vs((A, 1), (B, 1), protocol="SCTP")])
    new = make_table([vs((A, 1), protocol="SCTP")])
    assert stale_flows(old, new) == [ep(B, "SCTP")]


def test_argv_filters_by_original_destination_and_reply_source() -> None:
    assert ep(B).argv() == ["-D", "-f", "ipv4", "-p", "udp", "--orig-dst", VIP, "--orig-port-dst", "53",
                            "--reply-src", B, "--reply-port-src", "53"]
    whole = StaleFlow("UDP", "fd00:96::10", 53)
    assert whole.argv() == ["-D", "-f", "ipv6", "-p", "udp", "--orig-dst", "fd00:96::10",
                            "--orig-port-dst", "53"]
    node_port = StaleFlow("UDP", "0.0.0.0", 30053, A, 53)  # any local address: no --orig-dst
    assert "--orig-dst" not in node_port.argv() and "30053" in node_port.argv()


def _run(returncode: int, stderr: str):  # type: ignore[no-untyped-def]
    calls: list[list[str]] = []

    def run(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, returncode, "", stderr)

    return calls, run


def test_cleaner_runs_the_tool_in_the_netns_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, run = _run(0, "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n")
    monkeypatch.setattr(conntrack.subprocess, "run", run)
    cleaner = ConntrackCleaner(netns="node1", netlink=False)
    assert cleaner.clear([ep(B)]) == []
    assert calls[0][:5] == ["ip", "netns", "exec", "node1", "conntrack"]
    assert cleaner.deleted == 2


def test_nothing_matched_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _, run = _run(1, "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n")
    monkeypatch.setattr(conntrack.subprocess, "run", run)
    assert ConntrackCleaner(netlink=False).clear([ep(B)]) == []


def test_failure_is_logged_with_service_and_node_never_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, run = _run(1, "conntrack v1.4.7 (conntrack-tools): Operation failed: invalid parameters\n")
    monkeypatch.setattr(conntrack.subprocess, "run", run)
    cleaner = ConntrackCleaner(node="node-a", netlink=False)
    errors = cleaner.clear([ep(B)])
    assert len(errors) == 1 and "ns/dns" in errors[0]
    assert "node-a" in caplog.text and "ns/dns" in caplog.text

    def missing(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError("conntrack")

    monkeypatch.setattr(conntrack.subprocess, "run", missing)
    old, new = make_table([vs((A, 1), (B, 1))]), make_table([vs((A, 1))])
    assert clear_stale(cleaner, old, new) == [ep(B)]  # logged, not raised
    assert clear_stale(None, old, new) == []


class Recorder(ConntrackCleaner):
    """Records the flows instead of running the tool."""

    def __init__(self) -> None:
        super().__init__(node="test")
        self.flows: list[StaleFlow] = []

    def clear(self, flows):  # type: ignore[no-untyped-def,override]
        self.flows += list(flows)
        return []


def test_iptables_proxier_clears_after_partial_and_full_syncs_not_the_first() -> None:
    import asyncio

    from svcproxy.dataplane.iptables.proxier import IptablesProxier
    from svcproxy.dataplane.nffake import FakeNetfilter

    nf = FakeNetfilter()
    rec = Recorder()
    p = IptablesProxier(nf, nf.family(True), conntrack=rec)
    assert asyncio.run(p.sync(make_table([vs((A, 1), (B, 1))]))).ok
    assert rec.flows == []  # first sync after start: the old table is unknown
    assert asyncio.run(p.sync(make_table([vs((A, 1))]), frozenset({"ns/dns"}))).ok
    assert rec.flows == [ep(B)]
    assert asyncio.run(p.sync({})).ok  # a full sync that withdraws it
    assert rec.flows == [ep(B), ep(A)]


def test_ipvs_proxier_clears_against_what_the_kernel_had() -> None:
    import asyncio

    from svcproxy.dataplane.ipvs.kernel import FakeAddresses, FakeIpvs
    from svcproxy.dataplane.ipvs.proxier import IpvsProxier

    kernel, addrs, rec = FakeIpvs(), FakeAddresses(), Recorder()
    p = IpvsProxier(kernel, addrs, interface="svcproxy0", conntrack=rec)
    assert asyncio.run(p.sync(make_table([vs((A, 1), (B, 1))]))).ok
    assert rec.flows == [StaleFlow("UDP", VIP, 53, owner="ns/dns")]  # new: had none
    restarted = IpvsProxier(kernel, addrs, interface="svcproxy0", conntrack=rec)
    rec.flows.clear()
    assert asyncio.run(restarted.sync(make_table([vs((A, 1), (B, 0))]))).ok
    assert rec.flows == [ep(B)]  # the kernel's read-back is the old table, even after restart


def test_unusable_netlink_falls_back_to_the_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, run = _run(0, "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been deleted.\n")
    monkeypatch.setattr(conntrack.subprocess, "run", run)

    def unusable(self: ConntrackCleaner, flow: StaleFlow) -> int:
        raise conntrack._NetlinkUnusableError("no ctnetlink")

    monkeypatch.setattr(ConntrackCleaner, "_netlink", unusable)
    cleaner = ConntrackCleaner()
    assert cleaner.clear([ep(A), ep(B)]) == []
    assert len(calls) == 2 and cleaner.deleted == 2 and not cleaner.netlink
