"""iptables rule text: kube-proxy's probabilities, affinity, draining, chain names (pure)."""

from __future__ import annotations

import re

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.table import RealServer, VirtualServer


def vs(weights: tuple[int, ...] = (1, 1, 1), persistence: int = 0) -> VirtualServer:
    reals = [RealServer(f"10.244.1.{i + 2}", 8080, w) for i, w in enumerate(weights)]
    return VirtualServer.create("TCP", "10.96.0.10", 80, reals, persistence=persistence,
                                owner="ns/web")


def probabilities(lines: list[str]) -> list[float]:
    return [float(m.group(1)) for line in lines
            if (m := re.search(r"--probability (\S+)", line))]


def test_equal_weights_give_kube_proxy_probabilities() -> None:
    lines = rules.service_rules(vs(), ("10.244.0.0/16",), False)
    assert probabilities(lines) == [round(1 / 3, 11), 0.5]
    assert sum("DNAT --to-destination" in line for line in lines) == 3


def test_draining_endpoint_is_not_selectable() -> None:
    lines = rules.service_rules(vs((1, 0, 1)), ("10.244.0.0/16",), False)
    svc = rules.service_chain(vs().key)
    drained = rules.endpoint_chain(vs().key, RealServer("10.244.1.3", 8080))
    assert not any(line.startswith(f"-A {svc}") and drained in line for line in lines)
    assert probabilities(lines) == [0.5]


def test_affinity_uses_recent_with_the_timeout() -> None:
    lines = rules.service_rules(vs(persistence=600), ("10.244.0.0/16",), False)
    assert sum("--rcheck --seconds 600" in line for line in lines) == 3
    assert sum("--set --name SVCPROXY-SEP-" in line for line in lines) == 3


def test_chain_names_fit_the_kernel_limit_and_are_stable() -> None:
    v = vs()
    names = rules.chains_of(v)
    assert all(len(n) <= 28 and n.startswith("SVCPROXY-") for n in names)
    assert names == rules.chains_of(vs())
    assert all(rules.owned_chain(n) for n in names)
    assert not rules.owned_chain("SVCPROXY-PORTALS")  # the userspace mode's chains
    assert not rules.owned_chain("SVCPROXY-PORTALS-NODEPORTS")


def test_chain_hash_is_the_name_running_kernels_already_carry() -> None:
    # Names must not change across versions: a restarted agent adopts its chains.
    import base64
    import hashlib

    for text in ("TCP/10.96.0.10:80", "UDP/[fd00::1]:53>10.244.1.2:8080", ""):
        old = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:15]
        assert rules._hash(text) == old


def test_rule_count_matches_the_rules_written() -> None:
    for weights in ((1, 1, 1), (1, 0, 2), (), (0,)):
        for persistence in (0, 600):
            for cidrs, masq_all in ((("10.244.0.0/16",), False), ((), False), (("10.244.0.0/16",), True)):
                v = vs(weights, persistence)
                reject = 1 if rules.reject_rule(v) else 0
                assert rules.rule_count(v, cidrs, masq_all) == 1 + reject + len(
                    rules.service_rules(v, cidrs, masq_all)
                )


def test_reject_only_without_a_ready_endpoint() -> None:
    assert rules.reject_rule(vs()) is None
    assert rules.reject_rule(vs((0, 1))) is None
    for weights in ((), (0, 0)):
        line = rules.reject_rule(vs(weights))
        assert line is not None and line.startswith(f"-A {rules.NO_ENDPOINTS} -d 10.96.0.10/32")
        assert line.endswith("-j REJECT --reject-with icmp-port-unreachable")
