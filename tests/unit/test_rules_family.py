"""IP family is told one way: ``IPFamily.of(address)``, never by testing for a colon inline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from svcproxy.base import IPFamily

ROOT = Path(__file__).resolve().parents[2]
# The one place allowed to look for the colon.
ALLOWED = {ROOT / "operator/svcproxy/base.py"}
SNIFF = re.compile(r"""["']:["']\s+(not\s+)?in\s""")


def test_no_colon_sniffing_outside_ipfamily() -> None:
    found = []
    for top in ("operator/svcproxy", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path in ALLOWED or path == Path(__file__).resolve():
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SNIFF.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "use svcproxy.base.IPFamily instead of a colon test:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("address", "family", "host"),
    [
        ("10.96.0.1", IPFamily.V4, "10.96.0.1"),
        ("10.244.0.0/16", IPFamily.V4, "10.244.0.0/16"),
        ("kubernetes.default", IPFamily.V4, "kubernetes.default"),
        ("fd00::1", IPFamily.V6, "[fd00::1]"),
        ("fd00:10:244::/56", IPFamily.V6, "[fd00:10:244::/56]"),
    ],
)
def test_ipfamily_of(address: str, family: IPFamily, host: str) -> None:
    assert IPFamily.of(address) is family
    assert IPFamily.is_v6(address) == (family is IPFamily.V6)
    assert IPFamily.bracketed(address) == host
    assert family.host_prefix == (128 if family is IPFamily.V6 else 32)
