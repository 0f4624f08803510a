"""The iptables mode's traffic policies Local: the exact rules (rules.py), where a
connection goes by its source (traced through the in-memory netfilter), the DROP for
no local endpoint, and a steady full sync reading them back as written."""

from __future__ import annotations

from nftrace import Source, trace
from proxierkit import iptables_on_fake, sync_ok

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.table import LocalPolicy, RealServer, VirtualServer, make_table

LOCAL, REMOTE = "10.244.1.2", "10.244.2.2"
NODE_IP = "172.29.0.11"
CIDRS = ("10.244.0.0/16",)
OUTSIDE = Source("172.29.0.200")


def vs(address: str, port: int, policy: LocalPolicy, *, local: tuple[str, ...] = (LOCAL,),
       reals: tuple[str, ...] = (LOCAL, REMOTE), owner: str = "ns/web",
       persistence: int = 0) -> VirtualServer:
    return VirtualServer.create(
        "TCP", address, port, [RealServer(a, 8080, local=a in local) for a in reals],
        owner=owner, local_policy=policy, persistence=persistence)




def test_external_local_node_port_rules() -> None:
    v = vs("0.0.0.0", 30080, "external")
    svc, clu = rules.service_chain(v.key), rules.cluster_chain(v.key)
    local, remote = (rules.endpoint_chain(v.key, r) for r in v.real_servers)
    assert rules.chains_of(v) == [svc, clu, local, remote]
    assert rules.service_rules(v, CIDRS, False) == [
        f"-A {svc} -s 10.244.0.0/16 -j {clu}",
        f"-A {svc} -m addrtype --src-type LOCAL -j SVCPROXY-MARK-MASQ",
        f"-A {svc} -m addrtype --src-type LOCAL -j {clu}",
        f"-A {svc} -j {local}",
        f"-A {clu} -m statistic --mode random --probability 0.50000000000 -j {local}",
        f"-A {clu} -j {remote}",
        f"-A {local} -s 10.244.1.2/32 -j SVCPROXY-MARK-MASQ",
        f"-A {local} -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080",
        f"-A {remote} -s 10.244.2.2/32 -j SVCPROXY-MARK-MASQ",
        f"-A {remote} -p tcp -m tcp -j DNAT --to-destination 10.244.2.2:8080",
    ]
    assert rules.reject_rule(v) is None
    assert rules.rule_count(v, CIDRS, False) == 11
    # masqueradeAll does not masquerade outside clients of a Local policy (as kube-proxy).
    assert rules.service_rules(v, CIDRS, True) == rules.service_rules(v, CIDRS, False)


def test_external_local_without_a_local_endpoint_drops_and_without_any_rejects() -> None:
    none_here = vs("192.0.2.7", 80, "external", local=())
    assert rules.reject_rule(none_here) == (
        "-A SVCPROXY-NO-ENDPOINTS -d 192.0.2.7/32 -p tcp -m comment --comment ns/web -m tcp"
        " --dport 80 -j DROP")
    svc = rules.service_chain(none_here.key)
    assert [r for r in rules.service_rules(none_here, CIDRS, False) if r.startswith(f"-A {svc} ")] == [
        f"-A {svc} -s 10.244.0.0/16 -j {rules.cluster_chain(none_here.key)}",
        f"-A {svc} -m addrtype --src-type LOCAL -j SVCPROXY-MARK-MASQ",
        f"-A {svc} -m addrtype --src-type LOCAL -j {rules.cluster_chain(none_here.key)}",
    ]
    node_port = vs("0.0.0.0", 30080, "external", local=())
    assert rules.reject_rule(node_port) == (
        "-A SVCPROXY-NO-ENDPOINTS -p tcp -m comment --comment ns/web -m addrtype --dst-type LOCAL"
        " -m tcp --dport 30080 -j DROP")
    empty = vs("0.0.0.0", 30080, "external", reals=())
    assert rules.reject_rule(empty) is not None and rules.reject_rule(empty).endswith(
        "-j REJECT --reject-with icmp-port-unreachable")


def test_internal_local_cluster_ip_rules_use_only_local_endpoints() -> None:
    v = vs("10.96.0.10", 80, "internal", persistence=60)
    svc = rules.service_chain(v.key)
    (local,) = (rules.endpoint_chain(v.key, r) for r in v.real_servers if r.local)
    assert rules.chains_of(v) == [svc, local]
    mask = "255.255.255.255"
    assert rules.service_rules(v, CIDRS, False) == [
        f"-A {svc} ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j SVCPROXY-MARK-MASQ",
        f"-A {svc} -m recent --rcheck --seconds 60 --reap --name {local} --mask {mask} --rsource -j {local}",
        f"-A {svc} -j {local}",
        f"-A {local} -s 10.244.1.2/32 -j SVCPROXY-MARK-MASQ",
        f"-A {local} -p tcp -m recent --set --name {local} --mask {mask} --rsource -m tcp"
        " -j DNAT --to-destination 10.244.1.2:8080",
    ]
    assert rules.rule_count(v, CIDRS, False) == 6
    assert rules.reject_rule(vs("10.96.0.10", 80, "internal", local=())) == (
        "-A SVCPROXY-NO-ENDPOINTS -d 10.96.0.10/32 -p tcp -m comment --comment ns/web -m tcp"
        " --dport 80 -j DROP")


def test_connections_go_by_their_source() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    table = make_table([
        vs("0.0.0.0", 30080, "external"), vs("192.0.2.7", 80, "external"),
        vs("0.0.0.0", 30081, "external", local=(), owner="ns/elsewhere"),
        vs("10.96.0.10", 80, "internal"), vs("10.96.0.11", 80, "internal", local=(), owner="ns/elsewhere"),
    ])
    sync_ok(p, table)
    both = {f"{LOCAL}:8080", f"{REMOTE}:8080"}
    for dst, port in ((NODE_IP, 30080), ("192.0.2.7", 80)):
        # From outside: the local endpoint only, no masquerade (the client address stays).
        assert trace(nf, dst, port, src=OUTSIDE) == {f"{LOCAL}:8080"}
        # From a Pod: every endpoint, not masqueraded; from the node: every one, masqueraded.
        assert trace(nf, dst, port, src=Source("10.244.1.9")) == both
        assert trace(nf, dst, port, chain="OUTPUT", src=Source(NODE_IP, local=True)) == both | {"masq"}
    assert trace(nf, NODE_IP, 30081, src=OUTSIDE) == set()
    assert trace(nf, NODE_IP, 30081, table="filter", chain="INPUT", src=OUTSIDE) == {"drop"}
    assert trace(nf, NODE_IP, 30081, src=Source(NODE_IP, local=True)) == both | {"masq"}
    assert trace(nf, "10.96.0.10", 80, src=Source("10.244.1.9")) == {f"{LOCAL}:8080"}
    assert trace(nf, "10.96.0.11", 80, src=Source("10.244.1.9")) == set()
    assert trace(nf, "10.96.0.11", 80, table="filter", chain="FORWARD") == {"drop"}
    sync_ok(p, table)
    assert p.last_full.restores == 0  # every rule form read back as written


def test_a_node_gaining_its_first_local_endpoint_is_a_partial_sync() -> None:
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    sync_ok(p, make_table([vs("0.0.0.0", 30080, "external", local=())]))
    assert trace(nf, NODE_IP, 30080, table="filter", chain="INPUT") == {"drop"}
    sync_ok(p, make_table([vs("0.0.0.0", 30080, "external")]), {"ns/web"})
    assert trace(nf, NODE_IP, 30080, src=OUTSIDE) == {f"{LOCAL}:8080"}
    assert trace(nf, NODE_IP, 30080, table="filter", chain="INPUT") == set()
    sync_ok(p, make_table([vs("0.0.0.0", 30080, "")]), {"ns/web"})  # back to Cluster
    assert trace(nf, NODE_IP, 30080, src=OUTSIDE) == {"masq", f"{LOCAL}:8080", f"{REMOTE}:8080"}
    assert not any(c.startswith("SVCPROXY-CLU-") for c in nf.tables["nat"])


def test_a_steady_full_sync_reads_the_cluster_chains_as_sums_once() -> None:
    """SVCPROXY-CLU- chains are per-service chains: summed like SVC and SEP, so the steady
    state's read-back matches at once (no second read of the groups)."""
    nf, p = iptables_on_fake(cluster_cidrs=CIDRS)
    table = make_table([vs("0.0.0.0", 30080, "external"), vs("192.0.2.7", 80, "external", persistence=30)])
    sync_ok(p, table)
    reads = []
    observe = p._observe

    def counted(v6: bool, reader: object) -> object:
        reads.append(reader)
        return observe(v6, reader)  # type: ignore[arg-type]

    p._observe = counted  # type: ignore[method-assign]
    sync_ok(p, table)
    assert p.last_full.restores == 0 and len(reads) == 1
    nf.tables["nat"][rules.cluster_chain(table[next(iter(table))].key)].rules.clear()  # drift by hand
    sync_ok(p, table)
    assert p.last_full.dirty_services == 1
    assert trace(nf, NODE_IP, 30080, src=Source("10.244.1.9")) == {f"{LOCAL}:8080", f"{REMOTE}:8080"}
