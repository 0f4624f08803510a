"""The ``userspace`` mode: the agent proxies TCP and UDP itself, in its event loop.

Built by :func:`svcproxy.dataplane.modes.build_proxier` (``create``). Each
virtual server gets one listener on an ephemeral local port (TCP server or
UDP endpoint, bound to the wildcard address) and one REDIRECT rule from
VIP:port to that port in the nat chain ``SVCPROXY-PORTALS`` (jumped to from
PREROUTING and OUTPUT), written with the netfilter adapter. New connections
ask a :class:`~svcproxy.dataplane.userspace.balancer.Balancer` for backends
and try them in turn, so a refused connect moves on to the next backend. A
changed virtual server keeps its listener; only its balancer is updated.

Node ports, external and load-balancer IPs. An external or LB IP is a VIP like a
ClusterIP: one REDIRECT rule in the portal chain. A node port (address 0.0.0.0 or
``::``) gets its own listener too and a REDIRECT rule matched by protocol and port in
``SVCPROXY-PORTALS-NODEPORTS``, which the portal chain's last rule enters for
destinations local to the node (``-m addrtype --dst-type LOCAL``). Captured by
netfilter rather than by binding ``0.0.0.0:<nodePort>``: it is how this mode already
captures every portal, so the no-endpoint refusal (the rule points at the refusing
port), node-local clients (nat OUTPUT) and the handover with other modes and
kube-proxy (a rule swapped in one restore; no port that another process may hold
bound) work the same; the listener's own port stays private. The node-port chain is
entered after every VIP rule (VIP rules are inserted at the top of the portal chain,
the jump stays last), so an external IP that is a node address wins over a node port
with the same number, as in kube-proxy. No masquerade is needed: the agent itself
connects to the backend, which answers the agent.

Source ranges of a load-balancer IP are matched by the portal's REDIRECT rules (one
per range, one for the node itself) and the rest dropped in the filter chain
``SVCPROXY-PORTALS-FIREWALL``. Traffic policies Local: the portal's balancer keeps only
this node's endpoints ("internal"), or the portal gets a second listener for outside
clients that does ("external"; Pods and the node keep the first, which has them all).
The agent connects to the backend, so the client address is not kept. The rule text
and each listener's endpoints: ``portals.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from svcproxy.base import IPFamily, Mode
from svcproxy.dataplane.capabilities import ModeCapabilities, ModeCounts
from svcproxy.dataplane.mirror import Mirror
from svcproxy.dataplane.nfkernel import NetfilterKernel, names_only
from svcproxy.dataplane.proxier import (
    Between,
    DataplaneError,
    ModeUnavailableError,
    SyncResult,
    UnsupportedError,
    read_beside,
)
from svcproxy.dataplane.table import Table, VirtualServer, VSKey
from svcproxy.dataplane.userspace.balancer import USERSPACE_SCHEDULERS, Backend, Balancer
from svcproxy.dataplane.userspace.portals import (
    CHAIN,
    FILTER_JUMPS,
    FIREWALL,
    JUMPS,
    NODEPORTS,
    NODEPORTS_JUMP,
    PortalRules,
    changed_lines,
    full_chains,
    full_filter,
    portal_rules,
    scopes,
)

__all__ = ["CHAIN", "FIREWALL", "MODE", "NODEPORTS", "NODEPORTS_JUMP", "UserspaceProxier", "create",
           "full_chains"]

MODE: Mode = "userspace"
UDP_IDLE_SECONDS = 30.0


@dataclass
class _Listener:
    balancer: Balancer
    port: int
    server: asyncio.AbstractServer | None = None
    udp: asyncio.DatagramTransport | None = None


@dataclass
class _Portal:
    vs: VirtualServer  # as the table asks for it (the balancers hold their scopes of it)
    main: _Listener
    local: _Listener | None = None  # outside clients of an "external" traffic policy Local
    rules: PortalRules | None = None  # its rules now in the kernel (None = none yet)


def _v6(vs: VirtualServer) -> bool:
    return IPFamily.is_v6(vs.address)


def _wanted(
    desired: Table, only: frozenset[str] | None
) -> tuple[dict[VSKey, VirtualServer], list[DataplaneError]]:
    """The virtual servers this sync programs, and those refused (SCTP)."""
    errors: list[DataplaneError] = []
    want: dict[VSKey, VirtualServer] = {}
    for key, vs in desired.items():
        if only is not None and vs.owner not in only:
            continue
        if vs.protocol == "SCTP":
            errors.append(UnsupportedError(
                f"{key}: the userspace mode proxies TCP and UDP only;"
                " use ipvs or iptables mode for SCTP", owner=vs.owner))
            continue
        want[key] = vs
    return want, errors


class UserspaceProxier:
    def __init__(
        self,
        netfilter: NetfilterKernel | None = None,
        netfilter6: NetfilterKernel | None = None,
        *,
        connect_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cluster_cidrs: tuple[str, ...] = ("10.244.0.0/16",),
    ) -> None:
        if netfilter is None:  # the real tools (``create``); unit tests pass a fake
            from svcproxy.dataplane.netfilter import Netfilter

            netfilter = Netfilter()
        self._nf = netfilter
        # ip6tables, made on first use (its probe runs subprocesses): IPv6 VIPs only.
        self._nf6 = netfilter6
        self._v6_used = False
        # Families whose chains this proxier wrote whole: until then, a partial sync of
        # that family writes it whole too (the chains may not exist yet: the first IPv6
        # portal, say, comes in a partial sync).
        self._declared: set[bool] = set()
        backend, reason = self._nf.backend()
        self._timeout = connect_timeout
        self._clock = clock
        self._cidrs = cluster_cidrs  # Pods: clients of every endpoint under an external policy
        self._portals: dict[VSKey, _Portal] = {}
        self._lock = asyncio.Lock()
        # Ports that refuse, so a Service with no ready backend is refused at once (as
        # kube-proxy's REJECT does) instead of accepting and closing or going silent:
        # TCP, bound but never listening (a SYN gets a reset); UDP, bound and connected to
        # a peer that never sends (the kernel matches no socket for other senders, so it
        # answers ICMP port unreachable). Bound, so no other process can take the port.
        self._refusers: dict[tuple[bool, str], socket.socket] = {}  # by (is IPv6, protocol)
        self._mirror = Mirror()  # each portal's virtual server: owner index, counts
        self._caps = ModeCapabilities(
            mode=MODE,
            available=bool(backend),
            reason=reason,
            schedulers=USERSPACE_SCHEDULERS,
            backend=backend,
        )

    @property
    def mode(self) -> Mode:
        return MODE

    def capabilities(self) -> ModeCapabilities:
        return self._caps

    def counts(self) -> ModeCounts:
        return ModeCounts(
            virtual_servers=len(self._portals),
            real_servers=self._mirror.real_servers,
            rules=len(self._portals),
        )

    async def sync_full(self, desired: Table, between: Between) -> SyncResult:
        """The periodic full sync (``SteppedFullSync``): the iptables-save that checks the
        jumps into the portal chain runs beside the partial syncs, then the full sync
        runs under the lock with what it read. That read is of the whole nat table, and
        under the lock it would hold every change on the node back, even with no
        userspace Service."""
        if not self._caps.available:
            return await self.sync(desired, None)
        families = [False, True] if self._v6_used else [False]

        def read() -> dict[bool, set[str]]:
            present: dict[bool, set[str]] = {}
            for v6 in families:
                with contextlib.suppress(DataplaneError):  # the write reads again and reports
                    saved = self._netfilter(v6).read(("nat", "filter"), None, names_only)
                    # One set for both tables: their jumps differ by their comments.
                    present[v6] = saved["nat"].jumps | saved["filter"].jumps
            return present

        present, _ = await read_beside(read, between, self._nf.read_beside_for)
        # Partial syncs that ran meanwhile need no care: the full sync rewrites the whole
        # portal chain from the portals as they are now.
        return await self.sync(desired, None, present)

    async def sync(
        self,
        desired: Table,
        only: frozenset[str] | None = None,
        present: Mapping[bool, Collection[str]] | None = None,
    ) -> SyncResult:
        """``present``: the jump rules of the nat and filter tables, read by :meth:`sync_full`."""
        start = time.monotonic()
        async with self._lock:
            if not self._caps.available:
                owners = frozenset(v.owner for v in desired.values())
                err = ModeUnavailableError(f"userspace mode needs iptables: {self._caps.reason}")
                return SyncResult(MODE, only is None, {}, (err,), owners, 0.0)
            want, errors = _wanted(desired, only)
            if only is None:
                mine = set(self._portals)
            else:
                mine = self._mirror.keys_of(only)
                mine |= {k for k in want if k in self._portals}
            ops: dict[str, int] = {}
            await self._open_or_update(want, ops, errors)
            gone_keys = mine - set(want)
            gone = [self._portals[k] for k in gone_keys]
            kept = [self._portals[k] for k in sorted(want) if k in self._portals]
            for v6 in (False, True):
                fam_kept = [p for p in kept if _v6(p.vs) == v6]
                fam_gone = [p for p in gone if _v6(p.vs) == v6]
                if v6 and not (fam_kept or fam_gone or self._v6_used):
                    continue  # no IPv6 VIP ever: leave ip6tables alone
                full = only is None or v6 not in self._declared
                if full and only is not None:  # the whole family, from every portal of it
                    fam_kept = [self._portals[k] for k in sorted(self._portals)
                                if k not in gone_keys and _v6(self._portals[k].vs) == v6]
                try:
                    await self._write_rules(v6, fam_kept, fam_gone, full=full,
                                            present=(present or {}).get(v6))
                except DataplaneError as err:
                    err.owner = err.owner or next(
                        (p.vs.owner for p in fam_kept + fam_gone), None)
                    errors.append(err)
            for key in gone_keys:
                portal = self._portals.pop(key)
                self._mirror.drop(key)
                await self._close(portal)
                ops["delete_virtual_server"] = ops.get("delete_virtual_server", 0) + 1
            failed = frozenset(e.owner for e in errors if e.owner)
            return SyncResult(MODE, only is None, ops, tuple(errors), failed,
                              time.monotonic() - start, self.counts())

    async def _open_or_update(
        self, want: Mapping[VSKey, VirtualServer], ops: dict[str, int], errors: list[DataplaneError]
    ) -> None:
        """Listeners for each new portal; a changed one keeps its listeners, gets new
        balancer states (and gains or loses the local listener with an external policy)."""
        for key, vs in want.items():
            portal = self._portals.get(key)
            try:
                if portal is None:
                    self._portals[key] = await self._open(vs)
                    op = "add_virtual_server"
                elif portal.vs != vs:
                    await self._update(portal, vs)
                    op = "update_virtual_server"
                else:
                    continue
            except OSError as err:
                errors.append(DataplaneError(f"{key}: cannot listen: {err}", owner=vs.owner))
                continue
            self._mirror.put(key, vs)
            ops[op] = ops.get(op, 0) + 1

    async def _write_rules(
        self,
        v6: bool,
        kept: list[_Portal],
        gone: list[_Portal],
        *,
        full: bool,
        present: Collection[str] | None,
    ) -> None:
        """One family's rules: the whole chains (full) or the rules that changed."""
        nf = self._netfilter(v6)
        rules = {id(p): self._rules_for(p) for p in kept}
        if full:
            nat = [line for p in kept for line in rules[id(p)].nat]
            drops = [rules[id(p)].drop for p in kept if rules[id(p)].drop]
            await asyncio.to_thread(self._write_full, nf, nat, drops, present)
        else:
            pairs = [(p.rules, rules[id(p)]) for p in kept] + [(p.rules, None) for p in gone]
            lines, drops = changed_lines(pairs)
            text = ("*nat\n" + "\n".join(lines) + "\nCOMMIT\n") if lines else ""
            text += ("*filter\n" + "\n".join(drops) + "\nCOMMIT\n") if drops else ""
            if text:
                await asyncio.to_thread(nf.restore, text)
        for p in kept:
            p.rules = rules[id(p)]
        self._v6_used = self._v6_used or v6
        if full:
            self._declared.add(v6)

    def _netfilter(self, v6: bool) -> NetfilterKernel:
        if not v6:
            return self._nf
        if self._nf6 is None:
            self._nf6 = self._nf.family(True)
        return self._nf6

    def _rules_for(self, portal: _Portal) -> PortalRules:
        vs = portal.vs
        local = portal.local.port if portal.local is not None else None
        return portal_rules(vs, portal.main.port, lambda: self._refuse_port(_v6(vs), vs.protocol),
                            local_port=local, cluster_cidrs=self._cidrs)

    def _refuse_port(self, v6: bool, protocol: str) -> int:
        sock = self._refusers.get((v6, protocol))
        if sock is None:
            udp = protocol == "UDP"
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                                 socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(("::" if v6 else "0.0.0.0", 0))  # TCP: never listen(), SYNs get a reset
            if udp:
                # Port 9 (discard) on loopback: nothing is sent by connect(), and no
                # datagram from a client can match the connected socket.
                sock.connect(("::1" if v6 else "127.0.0.1", 9))
            self._refusers[(v6, protocol)] = sock
        port: int = sock.getsockname()[1]
        return port

    @staticmethod
    def _write_full(nf: NetfilterKernel, body: list[str], drops: list[str],
                    present: Collection[str] | None = None) -> None:
        nf.restore(full_chains(body) + full_filter(drops))
        nf.ensure_jumps(JUMPS, present)
        nf.ensure_jumps(FILTER_JUMPS, present)

    async def cleanup(self) -> SyncResult:
        async with self._lock:
            count = len(self._portals)
            for portal in list(self._portals.values()):
                await self._close(portal)
            self._portals.clear()
            self._mirror.clear()
            self._declared.clear()
            errors: tuple[DataplaneError, ...] = ()
            if self._caps.available:
                try:
                    await asyncio.to_thread(self._nf.remove, "nat", CHAIN, JUMPS)
                    await asyncio.to_thread(self._nf.remove, "filter", FIREWALL, FILTER_JUMPS)
                except DataplaneError as err:
                    errors = (err,)
                with contextlib.suppress(DataplaneError):  # no ip6tables nat: nothing of ours
                    await asyncio.to_thread(self._netfilter(True).remove, "nat", CHAIN, JUMPS)
                    await asyncio.to_thread(self._netfilter(True).remove, "filter", FIREWALL, FILTER_JUMPS)
            ops = {"delete_virtual_server": count} if count else {}
            return SyncResult(MODE, True, ops, errors)

    async def close(self) -> None:
        for portal in list(self._portals.values()):
            await self._close(portal)
        self._portals.clear()
        self._mirror.clear()
        for sock in self._refusers.values():
            sock.close()
        self._refusers.clear()

    # Listeners.

    async def _open(self, vs: VirtualServer) -> _Portal:
        main, local = scopes(vs)
        portal = _Portal(vs, await self._listen(main))
        if local is not None:
            try:
                portal.local = await self._listen(local)
            except OSError:
                await self._close(portal)
                raise
        return portal

    async def _update(self, portal: _Portal, vs: VirtualServer) -> None:
        main, local = scopes(vs)
        if local is not None and portal.local is None:
            portal.local = await self._listen(local)
        elif local is None and portal.local is not None:
            await self._close_listener(portal.local)
            portal.local = None
        elif local is not None and portal.local is not None:
            portal.local.balancer.update(local)
        portal.main.balancer.update(main)
        portal.vs = vs

    async def _listen(self, vs: VirtualServer) -> _Listener:
        """A listener on an ephemeral port choosing among ``vs``'s real servers."""
        balancer = Balancer(vs, clock=self._clock)
        loop = asyncio.get_running_loop()
        # IPv6 VIPs get an IPv6 listener (asyncio binds "::" IPv6-only).
        host, family = ("::", socket.AF_INET6) if _v6(vs) else ("0.0.0.0", socket.AF_INET)
        if vs.protocol == "TCP":
            server = await asyncio.start_server(
                lambda r, w: self._serve_tcp(balancer, r, w), host, 0, family=family
            )
            port = server.sockets[0].getsockname()[1]
            return _Listener(balancer, port, server=server)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpPortal(balancer), local_addr=(host, 0), family=family
        )
        port = transport.get_extra_info("sockname")[1]
        return _Listener(balancer, port, udp=transport)

    async def _close(self, portal: _Portal) -> None:
        await self._close_listener(portal.main)
        if portal.local is not None:
            await self._close_listener(portal.local)

    @staticmethod
    async def _close_listener(listener: _Listener) -> None:
        if listener.server is not None:
            listener.server.close()
            with contextlib.suppress(Exception):
                await listener.server.wait_closed()
        if listener.udp is not None:
            listener.udp.close()

    async def _serve_tcp(
        self, balancer: Balancer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        client = writer.get_extra_info("peername")[0]
        for backend in balancer.candidates(client):
            try:
                up_r, up_w = await asyncio.wait_for(
                    asyncio.open_connection(*backend), self._timeout
                )
            except (OSError, TimeoutError):
                continue  # dead backend: retry the next one
            balancer.connected(client, backend)
            try:
                await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
            finally:
                balancer.closed(backend)
            return
        writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        if reader.at_eof():
            writer.close()


class _UdpPortal(asyncio.DatagramProtocol):
    """One UDP listener: a connected upstream socket per client address."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self.transport: asyncio.DatagramTransport | None = None
        self.flows: dict[tuple[str, int], tuple[asyncio.DatagramTransport, float]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        flow = self.flows.get(addr)
        now = time.monotonic()
        if flow is not None and flow[1] > now:
            self.flows[addr] = (flow[0], now + UDP_IDLE_SECONDS)
            flow[0].sendto(data)
            return
        asyncio.get_running_loop().create_task(self._open_flow(data, addr))

    async def _open_flow(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        for backend in self.balancer.candidates(addr[0]):
            try:
                upstream, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpUpstream(self, addr), remote_addr=backend
                )
            except OSError:
                continue
            self.balancer.connected(addr[0], backend)
            self.flows[addr] = (upstream, time.monotonic() + UDP_IDLE_SECONDS)
            upstream.sendto(data)
            loop.call_later(UDP_IDLE_SECONDS, self._expire, addr, backend)
            return

    def _expire(self, addr: tuple[str, int], backend: Backend) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            return
        if flow[1] > time.monotonic():
            asyncio.get_running_loop().call_later(UDP_IDLE_SECONDS, self._expire, addr, backend)
            return
        flow[0].close()
        del self.flows[addr]
        self.balancer.closed(backend)


class _UdpUpstream(asyncio.DatagramProtocol):
    def __init__(self, portal: _UdpPortal, client: tuple[str, int]) -> None:
        self.portal = portal
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.portal.transport is not None:
            self.portal.transport.sendto(data, self.client)


def create(config: object) -> UserspaceProxier:
    """The real-kernel proxier (called by ``modes.build_proxier``)."""
    return UserspaceProxier(cluster_cidrs=tuple(getattr(config, "cluster_cidrs", ("10.244.0.0/16",))))
