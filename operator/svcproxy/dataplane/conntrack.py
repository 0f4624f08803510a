"""Conntrack entries a table change leaves stale, and their deletion.

A UDP (or SCTP) "connection" never ends, so a client that keeps sending from one
source port stays on the backend its conntrack entry DNATed it to, even after that
backend left the Service. kube-proxy deletes such entries after each sync
(pkg/proxy/conntrack); so does svcproxy, in the two cases kube-proxy covers:

* a real server that left a UDP/SCTP virtual server, or stopped taking new
  connections (weight 0): entries whose original destination is the virtual
  server and whose reply source is that real server;
* a UDP/SCTP virtual server that gains its first serving real server after having
  none (or after not existing): every entry to the virtual IP:port, since those
  flows were rejected or lost and their entries would keep them so.

TCP is never touched: a TCP connection to a gone backend is reset and reconnects.
:func:`stale_flows` is pure; :class:`ConntrackCleaner` is the I/O edge (the
``conntrack`` tool, in the node's network namespace). Errors are logged with the
owners concerned and never fail a sync.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from svcproxy.base import IPFamily
from svcproxy.dataplane.table import VirtualServer, VSKey

log = logging.getLogger(__name__)

# Protocols whose flows have no end the kernel sees (TCP resets instead).
CLEARED_PROTOCOLS = frozenset({"UDP", "SCTP"})
ANY_ADDRESSES = frozenset({"0.0.0.0", "::"})  # a node port: any local address


@dataclass(frozen=True, slots=True, order=True)
class StaleFlow:
    """Conntrack entries to delete: original destination ``address``:``port`` (any
    local address for a node port, ``0.0.0.0`` / ``::``) and, when ``real_address``
    is set, reply source ``real_address``:``real_port`` (the DNATed backend)."""

    protocol: str
    address: str
    port: int
    real_address: str = ""
    real_port: int = 0
    owner: str = ""

    def argv(self) -> list[str]:
        """``conntrack -D`` arguments selecting these entries."""
        args = ["-D", "-f", "ipv6" if IPFamily.is_v6(self.address) else "ipv4",
                "-p", self.protocol.lower()]
        if self.address not in ANY_ADDRESSES:
            args += ["--orig-dst", self.address]
        args += ["--orig-port-dst", str(self.port)]
        if self.real_address:
            args += ["--reply-src", self.real_address, "--reply-port-src", str(self.real_port)]
        return args


def _serving(vs: VirtualServer | None) -> set[tuple[str, int]]:
    return {r.key for r in vs.real_servers if not r.draining} if vs is not None else set()


def stale_flows(
    old: Mapping[VSKey, VirtualServer], new: Mapping[VSKey, VirtualServer]
) -> list[StaleFlow]:
    """The flows to clear when the table goes from ``old`` to ``new`` (module docstring).

    A key missing from ``new`` is a removed virtual server (every real server left);
    missing from ``old``, a new one (it had none). Sorted, for stable logs and tests."""
    out: list[StaleFlow] = []
    for key in set(old) | set(new):
        if key.protocol not in CLEARED_PROTOCOLS:
            continue
        before, after = old.get(key), new.get(key)
        owner = (after or before).owner  # type: ignore[union-attr]
        had, has = _serving(before), _serving(after)
        for address, port in had - has:
            out.append(StaleFlow(key.protocol, key.address, key.port, address, port, owner))
        if has and not had:
            out.append(StaleFlow(key.protocol, key.address, key.port, owner=owner))
    return sorted(out)


class ConntrackCleaner:
    """Deletes conntrack entries with the ``conntrack`` tool (conntrack-tools), in
    network namespace ``netns`` (None: the agent's own, i.e. the node's)."""

    def __init__(self, netns: str | None = None, tool: str = "conntrack", node: str = "") -> None:
        self.netns = netns
        self.tool = tool
        self.node = node or os.uname().nodename
        self.deleted = 0  # entries deleted so far (tests, metrics)

    def clear(self, flows: Iterable[StaleFlow]) -> list[str]:
        """Delete the entries of each flow; returns the error messages (also logged)."""
        errors: list[str] = []
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        for flow in flows:
            argv = [*prefix, self.tool, *flow.argv()]
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            except (OSError, subprocess.TimeoutExpired) as err:
                errors.append(self._report(flow, str(err)))
                continue
            # Exit status 1 with "0 flow entries" only means nothing matched.
            count = _deleted_count(proc.stderr)
            if proc.returncode != 0 and count != 0:
                errors.append(self._report(flow, proc.stderr.strip() or f"exit {proc.returncode}"))
                continue
            self.deleted += count or 0
        return errors

    def _report(self, flow: StaleFlow, why: str) -> str:
        message = f"conntrack cleanup for {flow.owner or '-'} ({' '.join(flow.argv())}) failed: {why}"
        where = f" in netns {self.netns}" if self.netns else ""
        log.warning("node %s%s: %s", self.node, where, message)
        return message


def _deleted_count(stderr: str) -> int | None:
    """N from conntrack's "N flow entries have been deleted." (None if absent)."""
    for line in stderr.splitlines():
        words = line.split(":")[-1].split()
        if "deleted." in words and words and words[0].isdigit():
            return int(words[0])
    return None


def available(tool: str = "conntrack") -> bool:
    return shutil.which(tool) is not None


def clear_stale(
    cleaner: ConntrackCleaner | None,
    old: Mapping[VSKey, VirtualServer],
    new: Mapping[VSKey, VirtualServer],
) -> list[StaleFlow]:
    """The proxiers' shared hook after a successful sync: compute and delete; returns
    the flows it tried (nothing without a cleaner). Never raises."""
    if cleaner is None:
        return []
    flows = stale_flows(old, new)
    if flows:
        try:
            cleaner.clear(flows)
        except Exception:  # never fatal to the sync
            log.exception("conntrack cleanup failed")
    return flows
