"""The netfilter conformance cases (tests/dataplane/nf_cases.py) against the in-memory fake.

The same cases run against the real tools in a network namespace
(tests/dataplane/test_netfilter_conformance_kernel.py).
"""

from __future__ import annotations

import pytest

from svcproxy.dataplane.nffake import FakeNetfilter
from tests.dataplane.nf_cases import CASES, cases


@pytest.mark.parametrize(("name", "args"), cases(), ids=[f"{n}{a}" if a else n for n, a in cases()])
def test_case_on_fake(name: str, args: tuple[object, ...]) -> None:
    CASES[name](FakeNetfilter(), *args)
