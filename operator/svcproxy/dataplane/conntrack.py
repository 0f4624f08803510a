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
:func:`stale_flows` is pure; :class:`ConntrackCleaner` is the I/O edge (netlink, or
the ``conntrack`` tool, in the node's network namespace). Errors are logged with the
owners concerned and never fail a sync.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from svcproxy.base import NODE_PORT_ADDRESSES, IPFamily
from svcproxy.dataplane.table import VirtualServer, VSKey

log = logging.getLogger(__name__)

# Protocols whose flows have no end the kernel sees (TCP resets instead).
CLEARED_PROTOCOLS = frozenset({"UDP", "SCTP"})


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
        if self.address not in NODE_PORT_ADDRESSES:
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
    """Deletes conntrack entries in network namespace ``netns`` (None: the agent's own,
    i.e. the node's): through netlink (pyroute2's ctnetlink socket: a dump filtered by
    original destination in the kernel, then one delete per entry whose reply source
    matches), or with the ``conntrack`` tool (conntrack-tools) when ``netlink`` is off
    or its socket cannot be opened."""

    def __init__(
        self, netns: str | None = None, tool: str = "conntrack", node: str = "", *, netlink: bool = True
    ) -> None:
        self.netns = netns
        self.tool = tool
        self.node = node or os.uname().nodename
        self.netlink = netlink
        self.deleted = 0  # entries deleted so far (tests, metrics)

    def clear(self, flows: Iterable[StaleFlow]) -> list[str]:
        """Delete the entries of each flow; returns the error messages (also logged)."""
        errors: list[str] = []
        for flow in flows:
            try:
                self.deleted += self._netlink(flow) if self.netlink else self._tool(flow)
            except _NetlinkUnusableError as err:
                log.info("node %s: conntrack netlink unusable (%s): using %s", self.node, err, self.tool)
                self.netlink = False
                try:
                    self.deleted += self._tool(flow)
                except Exception as tool_err:
                    errors.append(self._report(flow, str(tool_err)))
            except Exception as err:
                errors.append(self._report(flow, f"{type(err).__name__}: {err}"))
        return errors

    def _netlink(self, flow: StaleFlow) -> int:
        """Delete through ctnetlink; returns how many entries went."""
        try:
            from pyroute2 import Conntrack
            from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

            family = socket.AF_INET6 if IPFamily.is_v6(flow.address) else socket.AF_INET
            ct = Conntrack(nfgen_family=family, **({"netns": self.netns} if self.netns else {}))
        except (ImportError, OSError, TimeoutError) as err:
            raise _NetlinkUnusableError(str(err)) from err
        proto = _IPPROTO[flow.protocol]
        orig = NFCTAttrTuple(family=family, proto=proto, dport=flow.port,
                             daddr=None if flow.address in NODE_PORT_ADDRESSES else flow.address)
        reply = None
        if flow.real_address:
            reply = NFCTAttrTuple(family=family, saddr=flow.real_address, sport=flow.real_port)
        count = 0
        try:
            for entry in list(ct.dump_entries(tuple_orig=orig, tuple_reply=reply)):
                try:
                    ct.delete(entry)
                    count += 1
                except Exception as err:
                    if getattr(err, "code", None) != errno.ENOENT:
                        raise
        finally:
            ct.close()
        return count

    def _tool(self, flow: StaleFlow) -> int:
        """Delete with ``conntrack -D``; returns how many entries went."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        proc = subprocess.run([*prefix, self.tool, *flow.argv()], capture_output=True, text=True,
                              timeout=10, check=False)
        count = _deleted_count(proc.stderr)
        # Exit status 1 with "0 flow entries" only means nothing matched.
        if proc.returncode != 0 and count != 0:
            raise RuntimeError(proc.stderr.strip() or f"exit {proc.returncode}")
        return count or 0

    def _report(self, flow: StaleFlow, why: str) -> str:
        message = f"conntrack cleanup for {flow.owner or '-'} ({' '.join(flow.argv())}) failed: {why}"
        where = f" in netns {self.netns}" if self.netns else ""
        log.warning("node %s%s: %s", self.node, where, message)
        return message


class _NetlinkUnusableError(Exception):
    """pyroute2's ctnetlink socket cannot be had here: use the tool."""


_IPPROTO = {"UDP": socket.IPPROTO_UDP, "SCTP": socket.IPPROTO_SCTP, "TCP": socket.IPPROTO_TCP}


def _deleted_count(stderr: str) -> int | None:
    """N from conntrack's "N flow entries have been deleted." (None if absent)."""
    for line in stderr.splitlines():
        words = line.split(":")[-1].split()
        if "deleted." in words and words and words[0].isdigit():
            return int(words[0])
    return None


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
