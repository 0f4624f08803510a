"""The IPVS conformance cases (tests/dataplane/ipvs_cases.py) against the in-memory fake.

The same cases run against the real kernel in a UML guest (tests/dataplane/test_ipvs.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dataplane"))

from ipvs_cases import CASES, Kit

from svcproxy.dataplane.ipvs.kernel import FakeAddresses, FakeIpvs


@pytest.mark.parametrize("name", sorted(CASES))
def test_case_on_fake(name: str) -> None:
    CASES[name](Kit(FakeIpvs(), FakeAddresses()))
