"""The netfilter conformance cases (nf_cases.py) against the real tools, as root: each case
in a fresh network namespace of its own. tests/unit/test_netfilter_conformance_fake.py runs the
same cases on the in-memory fake."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest
from nf_cases import CASES, cases

from svcproxy.dataplane.netfilter import Netfilter


@pytest.fixture()
def netns() -> Iterator[str]:
    name = f"svcpnf-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.mark.parametrize(("name", "args"), cases(), ids=[f"{n}{a}" if a else n for n, a in cases()])
def test_case_on_the_kernel(netns: str, name: str, args: tuple[object, ...]) -> None:
    CASES[name](Netfilter(netns=netns), *args)
