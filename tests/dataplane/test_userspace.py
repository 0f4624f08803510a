"""userspace mode on the host kernel: the proxier runs in the node netns, traffic from the
client netns (no default route): ClusterIPs, node ports on the node's address, external
and load-balancer IPs, TCP and UDP, IPv4 and IPv6."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svcproxy.agent.convert import virtual_server
from svcproxy.api.program import RealServerSpec, VirtualServerSpec
from svcproxy_lab.topology import CLIENT, Topology, in_ns

VIP = "10.96.6.10"
DRIVER = Path(__file__).with_name("us_driver.py")


class Driver:
    def __init__(self, topo: Topology) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.node, sys.executable, str(DRIVER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert json.loads(self._line())["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the userspace driver died"
        return line

    def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        answer: dict[str, Any] = json.loads(self._line())
        assert not answer["errors"], answer
        return answer

    def sync(self, *services: dict[str, Any], only: list[str] | None = None) -> dict[str, Any]:
        return self.call({"op": "sync", "table": list(services), "only": only})

    def stop(self) -> None:
        self.call({"op": "cleanup"})
        self.proc.kill()
        self.proc.wait()


def svc(topo: Topology, backends: list[int], *, protocol: str = "TCP", port: int = 80,
        scheduler: str = "rr", persistence: int = 0, weights: list[int] | None = None
        ) -> dict[str, Any]:
    ws = weights or [1] * len(backends)
    return {"protocol": protocol, "address": VIP, "port": port, "scheduler": scheduler,
            "persistence": persistence, "owner": f"ns/{protocol.lower()}{port}",
            "reals": [[topo.backends[i], 8080, w] for i, w in zip(backends, ws, strict=True)]}


@pytest.fixture()
def driver(topo: Topology) -> Iterator[Driver]:
    d = Driver(topo)
    try:
        yield d
    finally:
        d.stop()


def test_round_robin_alternates_tcp_and_udp(topo: Topology, driver: Driver) -> None:
    driver.sync(svc(topo, [0, 1]), svc(topo, [0, 1], protocol="UDP", port=53))
    names = topo.ask(VIP, 80, 6)
    assert names in (["be0", "be1"] * 3, ["be1", "be0"] * 3), names
    udp = topo.ask(VIP, 53, 6, udp=True)
    assert sorted(udp) == ["be0"] * 3 + ["be1"] * 3, udp


def test_retries_past_a_dead_backend(topo: Topology, driver: Driver) -> None:
    driver.sync(svc(topo, [0, 1, 2], port=81))
    topo.stop_echo(1)
    try:
        names = topo.ask(VIP, 81, 9)
        assert "-" not in names and "be1" not in names, names
        assert set(names) == {"be0", "be2"}
    finally:
        topo.start_echo(1)


def test_client_ip_affinity_pins(topo: Topology, driver: Driver) -> None:
    driver.sync(svc(topo, [0, 1, 2], port=82, persistence=600))
    names = topo.ask(VIP, 82, 10)
    assert len(set(names)) == 1 and names[0] != "-", names


def test_wrr_follows_weights_and_draining_gets_nothing(topo: Topology, driver: Driver) -> None:
    driver.sync(svc(topo, [0, 1, 2], port=83, scheduler="wrr", weights=[3, 1, 0]))
    names = topo.ask(VIP, 83, 8)
    assert sorted(names) == ["be0"] * 6 + ["be1"] * 2, names


def test_serving_terminating_backends_answer_when_none_is_ready(topo: Topology, driver: Driver) -> None:
    """Weights from the agent's conversion (kube-proxy's rule): all terminating -> used."""
    def weights(states: list[bool]) -> list[int]:  # True = ready, False = serving-terminating
        reals = [RealServerSpec(address=a, port=8080, ready=r, terminating=not r)
                 for a, r in zip(topo.backends, states, strict=True)]
        spec = VirtualServerSpec(address=VIP, port=85, mode="userspace", real_servers=reals)
        return [r.weight for r in virtual_server(spec, "ns/tcp85").real_servers]

    driver.sync(svc(topo, [0, 1, 2], port=85, weights=weights([False, False, False])))
    assert set(topo.ask(VIP, 85, 9)) == {"be0", "be1", "be2"}
    driver.sync(svc(topo, [0, 1, 2], port=85, weights=weights([False, True, False])))
    assert topo.ask(VIP, 85, 6) == ["be1"] * 6


def test_tcp_service_without_ready_backend_refuses(topo: Topology, driver: Driver) -> None:
    none = svc(topo, [], port=84)
    driver.sync(none)
    assert topo.connect_error(VIP, 84) == "ECONNREFUSED"
    driver.sync(svc(topo, [0], port=84), only=[none["owner"]])
    assert topo.connect_error(VIP, 84) == "connected"
    assert topo.ask(VIP, 84, 2) == ["be0", "be0"]
    driver.sync(svc(topo, [0], port=84, weights=[0]), only=[none["owner"]])
    assert topo.connect_error(VIP, 84) == "ECONNREFUSED"
    driver.sync(svc(topo, [0], port=84, weights=[0]))  # a full sync keeps refusing
    assert topo.connect_error(VIP, 84) == "ECONNREFUSED"


def test_udp_service_without_ready_backend_refuses(topo: Topology, driver: Driver) -> None:
    # ICMP port unreachable, as kube-proxy's REJECT answers, rather than silence.
    none = svc(topo, [], protocol="UDP", port=54)
    driver.sync(none)
    assert topo.connect_error(VIP, 54, udp=True) == "ECONNREFUSED"
    driver.sync(svc(topo, [0], protocol="UDP", port=54), only=[none["owner"]])
    assert topo.connect_error(VIP, 54, udp=True) == "answered"
    driver.sync(svc(topo, [0], protocol="UDP", port=54, weights=[0]), only=[none["owner"]])
    assert topo.connect_error(VIP, 54, udp=True) == "ECONNREFUSED"


def test_ipv6_vip_is_proxied_over_tcp_and_udp(topo: Topology, driver: Driver) -> None:
    v6 = topo.enable_ipv6()
    vip6 = "fd00:96::10"

    def svc6(port: int, protocol: str, weights: list[int]) -> dict[str, Any]:
        return {"protocol": protocol, "address": vip6, "port": port, "scheduler": "rr",
                "persistence": 0, "owner": f"ns/v6-{protocol.lower()}{port}",
                "reals": [[a, 8080, w] for a, w in zip(v6, weights, strict=False)]}

    first = driver.sync(svc6(80, "TCP", [1, 1]), svc6(53, "UDP", [1, 1]), svc6(81, "TCP", [0]))
    assert first["counts"] == [3, 5]
    names = topo.ask(vip6, 80, 6)
    assert names in (["be0", "be1"] * 3, ["be1", "be0"] * 3), names
    assert sorted(topo.ask(vip6, 53, 4, udp=True)) == ["be0", "be0", "be1", "be1"]
    assert topo.connect_error(vip6, 81) == "ECONNREFUSED"  # no ready backend
    assert "fd00:96::10/128" in in_ns(topo.node, "ip6tables-save", "-t", "nat").stdout
    # Counts follow partial syncs: one portal loses a backend, one goes.
    changed = driver.sync(svc6(80, "TCP", [1]), only=["ns/v6-tcp80", "ns/v6-udp53"])
    assert changed["counts"] == [2, 2]


def test_full_sync_reads_beside_partial_syncs_and_puts_jumps_back(topo: Topology, driver: Driver) -> None:
    """The periodic full sync reads the nat table while the agent may run partial syncs
    (``between`` ran while the read was not done), then restores a jump deleted by hand."""
    web = svc(topo, [0, 1])
    driver.sync(web)
    jumps = [ln for ln in in_ns(topo.node, "iptables-save", "-t", "nat").stdout.splitlines()
             if "svcproxy-portals" in ln and ln.startswith("-A PREROUTING")]
    assert jumps, "no jump from PREROUTING into the portal chain after the first sync"
    in_ns(topo.node, "iptables", "-t", "nat", "-D", *jumps[0].split()[1:])
    assert sorted(set(topo.ask(VIP, 80, 2))) != sorted(["be0", "be1"])  # the jump is gone
    answer = driver.call({"op": "sync_full", "table": [web]})
    assert answer["beside"] == [True], answer
    saved = in_ns(topo.node, "iptables-save", "-t", "nat").stdout
    assert jumps[0] in saved.splitlines(), saved
    assert sorted(set(topo.ask(VIP, 80, 4))) == ["be0", "be1"]


NODE_IP = "10.99.0.1"  # the node's address on the client's link
EXTERNAL_IP, LB_IP = "192.0.2.7", "198.51.100.3"  # TEST-NET: routed via the node in the client netns only
NAMES = {"be0", "be1", "be2"}


def at(topo: Topology, address: str, port: int, *, protocol: str = "TCP", owner: str = "ns/web",
       backends: list[str] | None = None) -> dict[str, Any]:
    """A portal on ``address`` (0.0.0.0 / :: for a node port) to every backend."""
    return {"protocol": protocol, "address": address, "port": port, "scheduler": "rr",
            "persistence": 0, "owner": owner,
            "reals": [[a, 8080, 1] for a in (backends if backends is not None else topo.backends)]}


def test_node_port_external_and_load_balancer_ips_reach_the_backends(topo: Topology, driver: Driver) -> None:
    for net in (f"{EXTERNAL_IP}/32", f"{LB_IP}/32"):
        in_ns(topo.client, "ip", "route", "replace", net, "via", NODE_IP)
    driver.sync(at(topo, VIP, 80), at(topo, EXTERNAL_IP, 80), at(topo, LB_IP, 80),
                at(topo, "0.0.0.0", 30080), at(topo, "0.0.0.0", 30053, protocol="UDP"),
                at(topo, "0.0.0.0", 30081, owner="ns/none", backends=[]))
    assert set(topo.ask(NODE_IP, 30080, 6)) == NAMES  # round robin over the three
    assert set(topo.ask(NODE_IP, 30053, 6, udp=True)) == NAMES
    assert set(topo.ask(EXTERNAL_IP, 80, 6)) == NAMES
    assert set(topo.ask(LB_IP, 80, 6)) == NAMES
    assert set(topo.ask(VIP, 80, 6)) == NAMES
    assert topo.connect_error(NODE_IP, 80) == "ECONNREFUSED"  # only the node port is taken
    assert topo.connect_error(NODE_IP, 30081) == "ECONNREFUSED"  # no ready backend: refused
    # From the node itself (nat OUTPUT), to its own address and to loopback.
    for address in (NODE_IP, "127.0.0.1"):
        out = in_ns(topo.node, sys.executable, "-m", CLIENT, address, "30080", "6", "tcp").stdout
        assert set(out.split()) == NAMES, (address, out)
    saved = in_ns(topo.node, "iptables-save", "-t", "nat").stdout.splitlines()
    assert sum(line.startswith("-A SVCPROXY-PORTALS-NODEPORTS ") for line in saved) == 3, saved
    # The node port follows a partial sync: its backends change, then it goes.
    driver.sync(at(topo, "0.0.0.0", 30080, backends=topo.backends[:1]), only=["ns/web"])
    assert set(topo.ask(NODE_IP, 30080, 4)) == {"be0"}
    # Withdrawn with its owner: nothing captures it, and the node has no route there.
    assert topo.connect_error(EXTERNAL_IP, 80) == "ENETUNREACH"
    driver.sync(at(topo, VIP, 80, owner="ns/other"))
    assert topo.connect_error(NODE_IP, 30080) == "ECONNREFUSED"
    assert set(topo.ask(VIP, 80, 3)) == NAMES


def test_ipv6_node_port_and_external_ip_reach_the_backends(topo: Topology, driver: Driver) -> None:
    v6 = topo.enable_ipv6()
    in_ns(topo.client, "ip", "-6", "route", "replace", "2001:db8::7/128", "via", "fd00:99::1")
    driver.sync(at(topo, "::", 30080, backends=v6), at(topo, "::", 30053, protocol="UDP", backends=v6),
                at(topo, "2001:db8::7", 80, backends=v6))
    assert set(topo.ask("fd00:99::1", 30080, 6)) == NAMES
    assert set(topo.ask("fd00:99::1", 30053, 6, udp=True)) == NAMES
    assert set(topo.ask("2001:db8::7", 80, 6)) == NAMES
    assert "SVCPROXY-PORTALS-NODEPORTS" in in_ns(topo.node, "ip6tables-save", "-t", "nat").stdout
