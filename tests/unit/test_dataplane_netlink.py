"""The hand-packed IPVS netlink requests are byte-for-byte what pyroute2 encodes
(its codec: tests/dataplane/ipvs_reference.py)."""

from __future__ import annotations

import pytest

from svcproxy.base import IPFamily
from svcproxy.dataplane.diff import Operation, OpKind
from svcproxy.dataplane.ipvs import nlpack
from svcproxy.dataplane.table import RealServer, VirtualServer
from tests.dataplane.ipvs_reference import encode_op

VS = [
    VirtualServer("TCP", "10.96.0.10", 80, "sh", frozenset({"sh-port"}), 10800),
    VirtualServer("UDP", "fd00::10", 53, "rr"),
    VirtualServer("SCTP", "10.96.0.11", 36412, "wrr"),
]
RS = [RealServer("10.244.1.2", 8080, 3), RealServer("fd01::2", 53, 0)]


@pytest.mark.parametrize("kind", list(OpKind))
@pytest.mark.parametrize("index", range(len(VS)))
def test_pack_op_matches_pyroute2(kind: OpKind, index: int) -> None:
    vs = VS[index]
    rs = None
    if kind in (OpKind.ADD_RS, OpKind.UPDATE_RS, OpKind.DELETE_RS):
        rs = RS[1] if IPFamily.is_v6(vs.address) else RS[0]
    op = Operation(kind, vs, rs)
    assert nlpack.pack_op(op, 31, 42) == encode_op(op, 31, 42)
