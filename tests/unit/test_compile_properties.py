"""Property tests of compile_program over generated EndpointSlices."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from test_compile_helpers import endpoint, endpoint_slice, policy, service

from svcproxy.api import ProxyVirtualServerSpec
from svcproxy.compile.program import compile_program

PORTS = [
    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
]
SLICE_PORTS = [
    {"name": "http", "port": 8080, "protocol": "TCP"},
    {"name": "dns", "port": 5353, "protocol": "UDP"},
]

conditions = st.sampled_from(
    [
        {"ready": True},
        {"ready": None},
        {"ready": False, "serving": True, "terminating": True},
        {"ready": False, "serving": False, "terminating": True},
        {"ready": False},
    ]
)
endpoints = st.dictionaries(
    st.tuples(st.integers(1, 3), st.integers(2, 40)).map(lambda t: f"10.244.{t[0]}.{t[1]}"),
    conditions,
    max_size=12,
)


def _slices(eps: dict[str, dict[str, Any]], cut: int) -> list[dict[str, Any]]:
    items = [endpoint(addr, pod=f"pod-{addr.replace('.', '-')}", **cond) for addr, cond in eps.items()]
    cut = min(cut, len(items))
    return [
        endpoint_slice(items[:cut], ports=SLICE_PORTS, name="a"),
        endpoint_slice(items[cut:], ports=SLICE_PORTS, name="b"),
    ]


def _compile(slices: list[dict[str, Any]]) -> ProxyVirtualServerSpec:
    out = compile_program(policy(), service(ports=PORTS), slices)
    assert isinstance(out, ProxyVirtualServerSpec)
    return out


@settings(max_examples=200)
@given(eps=endpoints, cut=st.integers(0, 12), data=st.data())
def test_hash_stable_under_slice_and_endpoint_permutations(eps: dict[str, Any], cut: int, data: Any) -> None:
    slices = _slices(eps, cut)
    reference = _compile(slices)
    shuffled = [dict(s, endpoints=data.draw(st.permutations(s["endpoints"]))) for s in slices]
    shuffled = data.draw(st.permutations(shuffled))
    again = _compile(shuffled)
    assert again.content_hash == reference.content_hash
    assert again == reference


@settings(max_examples=200)
@given(eps=endpoints, cut=st.integers(0, 12))
def test_each_serving_endpoint_once_per_port_and_none_not_serving(eps: dict[str, Any], cut: int) -> None:
    prog = _compile(_slices(eps, cut))
    serving = {
        a
        for a, c in eps.items()
        if c.get("ready") is not False or (c.get("serving") and c.get("terminating"))
    }
    assert len(prog.virtual_servers) == len(PORTS)
    for vs in prog.virtual_servers:
        addresses = [r.address for r in vs.real_servers]
        assert sorted(addresses) == sorted(serving)  # once each, nothing else
        for rs in vs.real_servers:
            cond = eps[rs.address]
            if cond.get("terminating"):
                assert rs.weight == 1 and not rs.ready and rs.terminating  # the agent drains it
            else:
                assert rs.weight == 1 and rs.ready
        keys = [tuple(int(x) for x in r.address.split(".")) for r in vs.real_servers]
        assert keys == sorted(keys)


@settings(max_examples=100)
@given(eps=endpoints, cut=st.integers(0, 12))
def test_hash_differs_when_an_endpoint_changes(eps: dict[str, Any], cut: int) -> None:
    before = _compile(_slices(eps, cut))
    changed = dict(eps)
    changed["10.244.9.9"] = {"ready": True}
    assert _compile(_slices(changed, cut)).content_hash != before.content_hash
