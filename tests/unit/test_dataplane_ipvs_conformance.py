"""The IPVS conformance cases (tests/dataplane/ipvs_cases.py) against the in-memory fake.

The same cases run against the real kernel in a UML guest (tests/dataplane/test_ipvs.py).
"""

from __future__ import annotations

import pytest

from svcproxy.dataplane.ipvs.kernel import FakeAddresses, FakeIpvs
from tests.dataplane.ipvs_cases import CASES, Kit


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_on_fake(name: str) -> None:
    CASES[name](Kit(FakeIpvs(), FakeAddresses()))
