"""compile_program: one Service + its EndpointSlices -> one ProxyVirtualServer program."""

from __future__ import annotations

import pytest
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.api import ProxyVirtualServerSpec
from svcproxy.compile.program import NotProxied, compile_program, content_hash


def _program(result: ProxyVirtualServerSpec | NotProxied) -> ProxyVirtualServerSpec:
    assert isinstance(result, ProxyVirtualServerSpec), result
    return result


def test_every_port_times_every_cluster_ip() -> None:
    svc = service(
        ports=[
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        ],
        cluster_ip="10.96.0.10",
        cluster_ips=["10.96.0.10", "fd00::10"],
    )
    slices = [
        endpoint_slice(
            [endpoint("10.244.1.2"), endpoint("10.244.2.2")],
            ports=[
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
        ),
        endpoint_slice(
            [endpoint("fd00:244::2")],
            ports=[{"name": "http", "port": 8080, "protocol": "TCP"}],
            address_type="IPv6",
            name="web-v6",
        ),
    ]
    prog = _program(compile_program(policy(), svc, slices))
    got = [
        (vs.address, vs.port, vs.protocol, [(r.address, r.port) for r in vs.real_servers])
        for vs in prog.virtual_servers
    ]
    assert got == [
        ("10.96.0.10", 53, "UDP", [("10.244.1.2", 5353), ("10.244.2.2", 5353)]),
        ("10.96.0.10", 80, "TCP", [("10.244.1.2", 8080), ("10.244.2.2", 8080)]),
        ("fd00::10", 53, "UDP", []),
        ("fd00::10", 80, "TCP", [("fd00:244::2", 8080)]),
    ]
    assert prog.summary.vips.startswith("10.96.0.10:53/UDP,10.96.0.10:80/TCP,[fd00::10]:53/UDP")
    assert prog.summary.endpoints == "3/3"
    assert all(vs.address_type == "ClusterIP" for vs in prog.virtual_servers)


def test_scheduler_flags_and_mode_come_from_the_policy() -> None:
    prog = _program(
        compile_program(
            policy(spec={"services": ["web"], "ipvs": {"scheduler": "sh", "schedulerFlags": ["sh-port"]}}),
            service(),
            [endpoint_slice([endpoint("10.244.1.2")])],
        )
    )
    assert (prog.mode, prog.scheduler, prog.scheduler_flags) == ("ipvs", "sh", ["sh-port"])
    assert prog.virtual_servers[0].scheduler == "sh"
    default = _program(compile_program(policy(), service(), []))
    assert (default.scheduler, default.scheduler_flags) == ("rr", [])
    iptables = _program(
        compile_program(policy(spec={"services": ["web"], "mode": "iptables"}), service(), [])
    )
    assert iptables.scheduler is None and iptables.virtual_servers[0].scheduler is None
    assert iptables.virtual_servers[0].mode == "iptables"


@pytest.mark.parametrize(
    ("policy_affinity", "svc_affinity", "svc_timeout", "expected"),
    [
        (None, None, None, 0),
        (None, "ClientIP", None, 10800),
        (None, "ClientIP", 77, 77),
        ({"type": "ClientIP", "timeoutSeconds": 600}, None, None, 600),
        ({"type": "ClientIP"}, None, None, 10800),
        ({"type": "None"}, "ClientIP", 77, 0),  # the policy overrides the Service
        ({"type": "ClientIP", "timeoutSeconds": 5}, "ClientIP", 77, 5),
    ],
)
def test_persistence_from_policy_else_service(
    policy_affinity: dict[str, object] | None,
    svc_affinity: str | None,
    svc_timeout: int | None,
    expected: int,
) -> None:
    spec: dict[str, object] = {"services": ["web"]}
    if policy_affinity is not None:
        spec["sessionAffinity"] = policy_affinity
    prog = _program(
        compile_program(policy(spec=spec), service(affinity=svc_affinity, affinity_timeout=svc_timeout), [])
    )
    assert prog.persistence_timeout_seconds == expected
    assert all(vs.persistence_timeout_seconds == expected for vs in prog.virtual_servers)


def test_endpoint_conditions_ready_terminating_not_serving() -> None:
    slices = [
        endpoint_slice(
            [
                endpoint("10.244.1.5", ready=True),
                endpoint("10.244.1.4", ready=False, serving=True, terminating=True),
                endpoint("10.244.1.3", ready=False, serving=False, terminating=True),
                endpoint("10.244.1.2", ready=False),  # not ready, not terminating: starting up
                endpoint("10.244.1.6", ready=None),  # unknown: consumers treat it as ready
            ]
        )
    ]
    rs = _program(compile_program(policy(), service(), slices)).virtual_servers[0].real_servers
    assert [(r.address, r.weight, r.ready, r.terminating) for r in rs] == [
        ("10.244.1.4", 1, False, True),  # serving-terminating: kept, weight kept (agent decides)
        ("10.244.1.5", 1, True, False),
        ("10.244.1.6", 1, True, False),
    ]


def test_target_port_resolved_by_port_name_per_slice() -> None:
    # Pods of one Service may expose the named port on different numbers: each slice says which.
    slices = [
        endpoint_slice([endpoint("10.244.1.2")], ports=[{"name": "http", "port": 8080, "protocol": "TCP"}]),
        endpoint_slice(
            [endpoint("10.244.2.2")], ports=[{"name": "http", "port": 9090, "protocol": "TCP"}], name="web-2"
        ),
        endpoint_slice(
            [endpoint("10.244.3.2")], ports=[{"name": "other", "port": 1, "protocol": "TCP"}], name="web-3"
        ),
    ]
    rs = _program(compile_program(policy(), service(), slices)).virtual_servers[0].real_servers
    assert [(r.address, r.port) for r in rs] == [("10.244.1.2", 8080), ("10.244.2.2", 9090)]


def test_weights_first_match_by_pod_labels_terminating_too() -> None:
    pol = policy(
        spec={
            "services": ["web"],
            "ipvs": {"scheduler": "wrr"},
            "weights": [
                {"podSelector": {"matchLabels": {"track": "canary"}}, "weight": 5},
                {"podSelector": {"matchLabels": {"app": "web"}}, "weight": 3},
            ],
        }
    )
    slices = [
        endpoint_slice(
            [
                endpoint("10.244.1.2", pod="canary-1"),
                endpoint("10.244.1.3", pod="stable-1"),
                endpoint("10.244.1.4", pod="unknown"),
                endpoint("10.244.1.5", pod="canary-2", ready=False, serving=True, terminating=True),
            ]
        )
    ]
    labels = {
        "canary-1": {"app": "web", "track": "canary"},
        "stable-1": {"app": "web"},
        "canary-2": {"app": "web", "track": "canary"},
    }
    rs = _program(compile_program(pol, service(), slices, labels)).virtual_servers[0].real_servers
    assert [(r.address, r.weight, r.pod_name) for r in rs] == [
        ("10.244.1.2", 5, "canary-1"),
        ("10.244.1.3", 3, "stable-1"),
        ("10.244.1.4", 1, "unknown"),
        ("10.244.1.5", 5, "canary-2"),  # kept for when no endpoint is ready
    ]


def test_canonical_order_is_numeric_not_textual() -> None:
    slices = [endpoint_slice([endpoint("10.244.1.10"), endpoint("10.244.1.9"), endpoint("10.244.1.100")])]
    rs = _program(compile_program(policy(), service(), slices)).virtual_servers[0].real_servers
    assert [r.address for r in rs] == ["10.244.1.9", "10.244.1.10", "10.244.1.100"]


def test_duplicate_endpoint_across_slices_kept_once_preferring_ready() -> None:
    slices = [
        endpoint_slice([endpoint("10.244.1.2", ready=False, serving=True, terminating=True)], name="a"),
        endpoint_slice([endpoint("10.244.1.2", ready=True)], name="b"),
    ]
    rs = _program(compile_program(policy(), service(), slices)).virtual_servers[0].real_servers
    assert [(r.address, r.ready) for r in rs] == [("10.244.1.2", True)]


@pytest.mark.parametrize(
    ("svc", "reason"),
    [
        (service(type_="ExternalName", cluster_ip=None), "ExternalName"),
        (service(cluster_ip="None"), "Headless"),
        (service(cluster_ip=None), "NoClusterIP"),
        (service(ports=[]), "NoPorts"),
        (service(ports=[{"name": "x", "port": 0}]), "NoPorts"),
        (service(ports=[{"name": "x", "port": 80, "protocol": "ICMP"}]), "NoPorts"),
    ],
)
def test_never_proxied(svc: dict[str, object], reason: str) -> None:
    result = compile_program(policy(), svc, [endpoint_slice([endpoint("10.244.1.2")])])
    assert isinstance(result, NotProxied)
    assert result.reason == reason
    assert result.message


def test_garbage_in_slices_is_skipped_not_fatal() -> None:
    slices = [
        {"endpoints": None, "ports": None},
        {
            "endpoints": [{"addresses": []}, "junk", {"addresses": ["not-an-ip"]}],
            "ports": [{"name": "http", "port": 8080}],
        },
        endpoint_slice([endpoint("10.244.1.2")], ports=[{"name": "http", "port": 70000, "protocol": "TCP"}]),
    ]
    prog = _program(compile_program(policy(), service(), slices))  # type: ignore[arg-type]
    assert prog.virtual_servers[0].real_servers == []


def test_hash_changes_with_program_not_with_policy_generation() -> None:
    slices = [endpoint_slice([endpoint("10.244.1.2")])]
    a = _program(compile_program(policy(generation=1), service(), slices))
    b = _program(compile_program(policy(generation=2), service(), slices))
    c = _program(
        compile_program(policy(spec={"services": ["web"], "ipvs": {"scheduler": "lc"}}), service(), slices)
    )
    assert a.content_hash == b.content_hash == content_hash(a)
    assert a.content_hash != c.content_hash
    assert b.policy.generation == 2
