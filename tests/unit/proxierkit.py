"""The proxiers on the in-memory netfilter, for unit tests (one place, many test files).

``iptables_on_fake`` and ``sync_ok`` drive the iptables proxier synchronously;
``userspace_env`` (the fixture ``env``: import it into the test module) and ``userspace_ok`` the userspace
one, whose listeners are real sockets closed after the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.nffake import FakeNetfilter
from svcproxy.dataplane.proxier import SyncResult
from svcproxy.dataplane.table import Table
from svcproxy.dataplane.userspace.proxier import UserspaceProxier


def iptables_on_fake(**kwargs: Any) -> tuple[FakeNetfilter, IptablesProxier]:
    """A fresh fake netfilter and an IPv4 iptables proxier on it (``kwargs`` go to it)."""
    nf = FakeNetfilter()
    return nf, IptablesProxier(nf, nf.family(True), **kwargs)


def sync_ok(p: IptablesProxier, table: Table, only: set[str] | None = None) -> None:
    """One sync (full, or partial of the owners in ``only``) that must succeed."""
    result = asyncio.run(p.sync(table, frozenset(only) if only is not None else None))
    assert result.ok, result.errors


@pytest.fixture(name="env")
async def userspace_env() -> AsyncIterator[tuple[FakeNetfilter, UserspaceProxier]]:
    nf = FakeNetfilter()
    p = UserspaceProxier(nf)
    try:
        yield nf, p
    finally:
        await p.close()


async def userspace_ok(p: UserspaceProxier, table: Table, only: set[str] | None = None) -> SyncResult:
    """One userspace sync that must succeed; its result."""
    result = await p.sync(table, frozenset(only) if only is not None else None)
    assert result.ok, result.errors
    return result
