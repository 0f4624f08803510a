"""The iptables mode's node ports, external and load-balancer IPs: the exact rules
(rules.py), connections traced through the in-memory netfilter, drift repair of
SVCPROXY-NODEPORTS, and adoption of rules an older agent wrote without that chain."""

from __future__ import annotations

from nftrace import trace
from proxierkit import iptables_on_fake, sync_ok

from svcproxy.dataplane.iptables import drift, rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table

BACKENDS = ("10.244.1.2", "10.244.1.3")
NODE_IP = "172.29.0.11"
CIDRS = ("10.244.0.0/16",)


def node_port(port: int = 30080, address: str = "0.0.0.0", reals: tuple[str, ...] = BACKENDS,
              owner: str = "ns/web") -> VirtualServer:
    return VirtualServer.create("TCP", address, port, [RealServer(a, 8080) for a in reals], owner=owner)


def external(address: str = "192.0.2.7") -> VirtualServer:
    return VirtualServer.create("TCP", address, 80, [RealServer(a, 8080) for a in BACKENDS], owner="ns/web")




def test_node_port_rules_match_the_port_on_local_addresses_and_always_masquerade() -> None:
    vs = node_port()
    svc = rules.service_chain(vs.key)
    seps = [rules.endpoint_chain(vs.key, r) for r in vs.real_servers]
    assert vs.is_node_port and not external().is_node_port
    assert rules.service_jump(vs) == (
        f"-A SVCPROXY-NODEPORTS -p tcp -m comment --comment ns/web -m tcp --dport 30080 -j {svc}")
    assert rules.service_rules(vs, CIDRS, False) == [
        f"-A {svc} -p tcp -m tcp --dport 30080 -j SVCPROXY-MARK-MASQ",
        f"-A {svc} -m statistic --mode random --probability 0.50000000000 -j {seps[0]}",
        f"-A {svc} -j {seps[1]}",
        f"-A {seps[0]} -s 10.244.1.2/32 -j SVCPROXY-MARK-MASQ",
        f"-A {seps[0]} -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080",
        f"-A {seps[1]} -s 10.244.1.3/32 -j SVCPROXY-MARK-MASQ",
        f"-A {seps[1]} -p tcp -m tcp -j DNAT --to-destination 10.244.1.3:8080",
    ]
    assert rules.reject_rule(node_port(reals=())) == (
        "-A SVCPROXY-NO-ENDPOINTS -p tcp -m comment --comment ns/web -m addrtype --dst-type LOCAL"
        " -m tcp --dport 30080 -j REJECT --reject-with icmp-port-unreachable")
    v6 = node_port(address="::", reals=())
    assert rules.service_jump(v6).startswith("-A SVCPROXY-NODEPORTS -p tcp ")
    assert rules.reject_rule(v6) is not None and rules.reject_rule(v6).endswith("icmp6-port-unreachable")
    assert rules.rule_count(vs, CIDRS, False) == len(rules.service_rules(vs, CIDRS, False)) + 1


def test_the_node_ports_chain_is_entered_for_local_destinations_after_the_services() -> None:
    jumps = [j.line for j in rules.JUMPS if j.chain == "PREROUTING"]
    assert jumps[0] == ("-A PREROUTING -m comment --comment svcproxy-nodeports -m addrtype --dst-type LOCAL"
                        " -j SVCPROXY-NODEPORTS")
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([node_port()]))
    prerouting = nf.rules("nat", "PREROUTING")
    assert [r.split("-j ")[-1] for r in prerouting] == ["SVCPROXY-SERVICES", "SVCPROXY-NODEPORTS"]


def test_external_ips_are_plain_vips_in_the_services_chain() -> None:
    vs = external()
    assert rules.service_jump(vs) == (
        "-A SVCPROXY-SERVICES -d 192.0.2.7/32 -p tcp -m comment --comment ns/web -m tcp --dport 80"
        f" -j {rules.service_chain(vs.key)}")
    assert rules.service_rules(vs, CIDRS, False)[0] == (
        f"-A {rules.service_chain(vs.key)} ! -s 10.244.0.0/16 -d 192.0.2.7/32 -p tcp -m tcp --dport 80"
        " -j SVCPROXY-MARK-MASQ")


def test_connections_to_a_node_port_and_an_external_ip_reach_the_backends() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([node_port(), external(), node_port(30081, reals=(), owner="ns/empty")]))
    for chain in ("PREROUTING", "OUTPUT"):
        assert trace(nf, NODE_IP, 30080, chain=chain) == {f"{b}:8080" for b in BACKENDS}
        assert trace(nf, "192.0.2.7", 80, chain=chain) == {f"{b}:8080" for b in BACKENDS}
    assert trace(nf, NODE_IP, 80) == set() and trace(nf, NODE_IP, 30080, "udp") == set()
    assert trace(nf, NODE_IP, 30081, table="filter", chain="INPUT") == {"reject"}
    assert trace(nf, NODE_IP, 30080, table="filter", chain="INPUT") == set()


def test_node_port_drift_is_repaired_by_a_full_sync_and_withdrawal_removes_the_jump() -> None:
    nf, p = iptables_on_fake()
    table = make_table([node_port(), external()])
    sync_ok(p, table)
    sync_ok(p, table)
    assert p.last_full.restores == 0  # steady state: NODEPORTS read back as written
    nf.tables["nat"][rules.NODEPORTS].rules.clear()  # by hand
    assert trace(nf, NODE_IP, 30080) == set()
    sync_ok(p, table)
    assert p.last_full.dirty_services == 1 and trace(nf, NODE_IP, 30080) == {f"{b}:8080" for b in BACKENDS}
    nf.restore(f"*nat\n-A {rules.NODEPORTS} -p tcp -m comment --comment ns/gone -m tcp --dport 30999"
               f" -j {rules.MARK_MASQ}\nCOMMIT\n")  # a stale jump
    sync_ok(p, table)
    assert not any("30999" in r for r in nf.rules("nat", rules.NODEPORTS))
    sync_ok(p, make_table([external()]), {"ns/web"})
    assert nf.rules("nat", rules.NODEPORTS) == [] and trace(nf, NODE_IP, 30080) == set()
    assert trace(nf, "192.0.2.7", 80) == {f"{b}:8080" for b in BACKENDS}


def test_rules_written_before_node_ports_existed_are_adopted() -> None:
    """An agent of the previous version left SVCPROXY-SERVICES and its jumps but no
    SVCPROXY-NODEPORTS: a first partial sync creates it without flushing the services."""
    nf, old = iptables_on_fake()
    sync_ok(old, make_table([external()]))
    nf.restore("*nat\n" + "".join(f"-D {j.chain} {j.rule}\n" for j in rules.JUMPS if "nodeports" in j.rule)
               + f"-X {rules.NODEPORTS}\nCOMMIT\n")
    restarted = IptablesProxier(nf, nf.family(True))
    sync_ok(restarted, make_table([external(), node_port()]), {"ns/web"})
    assert trace(nf, NODE_IP, 30080) == {f"{b}:8080" for b in BACKENDS}
    assert trace(nf, "192.0.2.7", 80) == {f"{b}:8080" for b in BACKENDS}
    saved = drift.parse_saved(nf.save(("nat",)), "nat")
    plan = drift.plan_full([external()], saved, None, CIDRS, False)
    assert isinstance(plan, drift.FullPlan) and not plan.declare_nodeports
    saved.pop(rules.NODEPORTS)
    plan = drift.plan_full([external()], saved, None, CIDRS, False)
    assert isinstance(plan, drift.FullPlan) and plan.declare_nodeports and plan.declares(rules.NODEPORTS)
    assert not plan.declares(rules.SERVICES)


def test_an_ipv6_node_port_goes_to_ip6tables() -> None:
    nf, p = iptables_on_fake()
    sync_ok(p, make_table([node_port(address="::", reals=("fd00:244::2",))]))
    v6 = nf.family(True)
    assert trace(v6, "fd00:29::11", 30080) == {"[fd00:244::2]:8080"}
    assert nf.rules("nat", rules.NODEPORTS) == []
