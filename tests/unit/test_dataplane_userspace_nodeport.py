"""The userspace mode's node ports, external and load-balancer IPs on the in-memory
netfilter: the exact rules and chain layout, one listener per portal, connections
traced to local destinations only, VIP rules kept ahead of the node-port jump by
partial syncs, the refusing port, IPv6 node ports in ip6tables (also when the first
arrives in a partial sync), and cleanup of both chains. No traffic is sent here
(that is tests/dataplane/test_userspace.py)."""

from __future__ import annotations

from nftrace import trace
from proxierkit import userspace_env  # noqa: F401 (the fixture env)
from proxierkit import userspace_ok as ok

from svcproxy.base import IPFamily
from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy.dataplane.userspace.proxier import (
    CHAIN,
    NODEPORTS,
    NODEPORTS_JUMP,
    UserspaceProxier,
    full_chains,
)

NODE_IP, NODE_IP6 = "172.29.0.11", "fd00:29::11"
LOCAL = frozenset({NODE_IP, "127.0.0.1", NODE_IP6, "::1"})
CLUSTER_IP, EXTERNAL_IP, LB_IP = "10.96.6.10", "192.0.2.7", "198.51.100.3"


def vs(address: str, port: int, protocol: str = "TCP", *, weights: tuple[int, ...] = (1, 1),
       owner: str = "ns/web") -> VirtualServer:
    six = IPFamily.is_v6(address)
    reals = [RealServer(f"fd00:244::{i + 2}" if six else f"10.244.1.{i + 2}", 8080, w)
             for i, w in enumerate(weights)]
    return VirtualServer.create(protocol, address, port, reals, owner=owner)  # type: ignore[arg-type]




def to(nf: FakeNetfilter, dst: str, port: int, proto: str = "tcp", chain: str = "PREROUTING") -> set[str]:
    return trace(nf, dst, port, proto, chain=chain, local=LOCAL)


def test_node_port_rules_match_protocol_and_port_in_their_own_chain() -> None:
    node_port, external = vs("0.0.0.0", 30080), vs(EXTERNAL_IP, 80)
    assert node_port.is_node_port and vs("::", 30080).is_node_port and not external.is_node_port
    text = full_chains([
        f"-A {NODEPORTS} -p tcp -m comment --comment ns/web -m tcp --dport 30080 -j REDIRECT --to-ports 4001",
        f"-A {CHAIN} -d 192.0.2.7/32 -p tcp -m comment --comment ns/web -m tcp --dport 80"
        " -j REDIRECT --to-ports 4002",
    ])
    assert text.splitlines() == [
        "*nat", f":{CHAIN} - [0:0]", f":{NODEPORTS} - [0:0]",
        f"-A {CHAIN} -d 192.0.2.7/32 -p tcp -m comment --comment ns/web -m tcp --dport 80"
        " -j REDIRECT --to-ports 4002",
        f"-A {CHAIN} -m comment --comment svcproxy-portals-nodeports -m addrtype --dst-type LOCAL"
        f" -j {NODEPORTS}",
        f"-A {NODEPORTS} -p tcp -m comment --comment ns/web -m tcp --dport 30080 -j REDIRECT --to-ports 4001",
        "COMMIT",
    ]
    assert NODEPORTS.startswith(CHAIN)  # cleanup removes every chain under CHAIN's name


async def test_each_address_gets_its_own_listener_and_node_ports_only_local_destinations(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    table = make_table([vs(CLUSTER_IP, 80), vs(EXTERNAL_IP, 80), vs(LB_IP, 80),
                        vs("0.0.0.0", 30080), vs("0.0.0.0", 30053, "UDP")])
    await ok(p, table)
    targets = [to(nf, CLUSTER_IP, 80), to(nf, EXTERNAL_IP, 80), to(nf, LB_IP, 80),
               to(nf, NODE_IP, 30080), to(nf, NODE_IP, 30053, "udp")]
    assert all(len(t) == 1 and next(iter(t)).startswith("redirect:") for t in targets), targets
    assert len({next(iter(t)) for t in targets}) == 5  # five listeners, five ports
    assert p.counts().virtual_servers == 5
    # The node port on every local address, from outside (PREROUTING) and the node (OUTPUT).
    assert to(nf, "127.0.0.1", 30080, chain="OUTPUT") == to(nf, NODE_IP, 30080)
    assert to(nf, NODE_IP, 30080, chain="OUTPUT") == targets[3]
    # Not for an address that is not the node's, nor the other protocol, nor another port.
    assert to(nf, "10.99.0.5", 30080) == set()
    assert to(nf, NODE_IP, 30080, "udp") == set() and to(nf, NODE_IP, 30081) == set()
    assert to(nf, NODE_IP, 80) == set()  # the ClusterIP's port is not a node port
    assert nf.rules("nat", CHAIN)[-1] == NODEPORTS_JUMP
    assert len(nf.rules("nat", NODEPORTS)) == 2


async def test_partial_syncs_keep_vip_rules_ahead_of_the_node_ports(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    await ok(p, make_table([vs("0.0.0.0", 30080, owner="ns/np")]))
    node_port = to(nf, NODE_IP, 30080)
    # An external IP that is the node's own address, on the node port's number: it wins
    # (kube-proxy matches external IPs before node ports), also when added partially.
    table = make_table([vs("0.0.0.0", 30080, owner="ns/np"), vs(NODE_IP, 30080, owner="ns/ext")])
    await ok(p, table, {"ns/ext"})
    external = to(nf, NODE_IP, 30080)
    assert external != node_port and len(external) == 1
    assert nf.rules("nat", CHAIN)[-1] == NODEPORTS_JUMP
    assert to(nf, "127.0.0.1", 30080, chain="OUTPUT") == node_port
    # A full sync writes the same layout.
    before = (nf.rules("nat", CHAIN), nf.rules("nat", NODEPORTS))
    await ok(p, table)
    assert (nf.rules("nat", CHAIN), nf.rules("nat", NODEPORTS)) == before
    # The external IP goes: the node port answers there again.
    await ok(p, make_table([vs("0.0.0.0", 30080, owner="ns/np")]), {"ns/ext"})
    assert to(nf, NODE_IP, 30080) == node_port
    assert nf.rules("nat", CHAIN) == [NODEPORTS_JUMP]


async def test_a_node_port_without_ready_backend_goes_to_the_refusing_port_and_back(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    await ok(p, make_table([vs("0.0.0.0", 30080)]))
    listener = to(nf, NODE_IP, 30080)
    result = await ok(p, make_table([vs("0.0.0.0", 30080, weights=(0, 0))]), {"ns/web"})
    assert result.operations == {"update_virtual_server": 1}  # the listener stays
    refused = to(nf, NODE_IP, 30080)
    assert refused != listener and refused
    await ok(p, make_table([vs("0.0.0.0", 30080)]), {"ns/web"})
    assert to(nf, NODE_IP, 30080) == listener
    assert len(nf.rules("nat", NODEPORTS)) == 1


async def test_ipv6_node_port_goes_to_ip6tables_even_when_first_seen_in_a_partial_sync(
    env: tuple[FakeNetfilter, UserspaceProxier]
) -> None:
    nf, p = env
    await ok(p, make_table([vs("0.0.0.0", 30080, owner="ns/four")]))
    assert nf.family(True).save().count("SVCPROXY") == 0  # no IPv6 portal: ip6tables untouched
    table = make_table([vs("0.0.0.0", 30080, owner="ns/four"), vs("::", 30080, owner="ns/six"),
                        vs("fd00:96::10", 80, owner="ns/six")])
    await ok(p, table, {"ns/six"})
    nf6 = nf.family(True)
    assert to(nf6, NODE_IP6, 30080) and to(nf6, "fd00:96::10", 80)
    assert to(nf6, NODE_IP6, 30080) != to(nf, NODE_IP, 30080)
    assert len(nf.rules("nat", NODEPORTS)) == 1 and len(nf6.rules("nat", NODEPORTS)) == 1
    assert nf6.rules("nat", CHAIN)[-1] == NODEPORTS_JUMP
    assert {j.split(" -j ")[-1] for j in nf6.jumps("nat")} == {CHAIN}
    # A second IPv6 change is partial: only its rule moves.
    await ok(p, make_table([vs("0.0.0.0", 30080, owner="ns/four"), vs("::", 30080, owner="ns/six")]),
             {"ns/six"})
    assert to(nf6, "fd00:96::10", 80) == set() and to(nf6, NODE_IP6, 30080)


async def test_cleanup_removes_both_chains(env: tuple[FakeNetfilter, UserspaceProxier]) -> None:
    nf, p = env
    await ok(p, make_table([vs("0.0.0.0", 30080), vs("::", 30080, owner="ns/six"), vs(EXTERNAL_IP, 80)]))
    assert (await p.cleanup()).ok
    assert "SVCPROXY" not in nf.save() and "SVCPROXY" not in nf.family(True).save()
    assert p.counts().virtual_servers == 0
    # After cleanup the chains are written whole again, even by a partial sync.
    await ok(p, make_table([vs("0.0.0.0", 30080)]), {"ns/web"})
    assert to(nf, NODE_IP, 30080) and nf.rules("nat", CHAIN) == [NODEPORTS_JUMP]
