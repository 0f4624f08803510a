"""Fixtures for data-plane tests: root only, a fresh netns topology per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from svcproxy_lab.topology import Topology, require_root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = require_root()
    for item in items:
        if "tests/dataplane" in str(item.fspath):
            item.add_marker(pytest.mark.root)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    t = Topology()
    try:
        t.create(3)
        yield t
    finally:
        t.destroy()
