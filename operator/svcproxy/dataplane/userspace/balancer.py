"""Backend choice for the ``userspace`` mode: schedulers and ClientIP affinity; pure.

Used by ``svcproxy.dataplane.userspace.proxier`` once per new connection
(TCP) or new client flow (UDP). :meth:`Balancer.candidates` returns the
backends to try in order: the scheduler's pick first, then the others, so
a failed connect is retried on the next one. Schedulers that make sense for
one proxy: rr (default), wrr, lc, wlc, sed, nq (by this proxy's own active
connections), sh and mh (hash of the client address), dh (hash of the
virtual address). Weight 0 (draining) is never picked for a new client.
Time comes from an injected clock so affinity expiry is testable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from svcproxy.dataplane.table import RealServer, VirtualServer

USERSPACE_SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "mh", "dh"})
Backend = tuple[str, int]


@dataclass
class Balancer:
    vs: VirtualServer
    clock: Callable[[], float] = time.monotonic
    active: dict[Backend, int] = field(default_factory=dict)
    _affinity: dict[str, tuple[Backend, float]] = field(default_factory=dict)
    _next: int = 0
    _current: dict[Backend, int] = field(default_factory=dict)  # smooth wrr state

    def update(self, vs: VirtualServer) -> None:
        """New spec (real servers, scheduler, persistence) without losing live counts."""
        self.vs = vs
        keep = {r.key for r in vs.real_servers}
        self._affinity = {c: (b, t) for c, (b, t) in self._affinity.items() if b in keep}
        self._current = {b: w for b, w in self._current.items() if b in keep}

    def _ready(self) -> list[RealServer]:
        return [r for r in self.vs.real_servers if r.weight > 0]

    def _pick(self, ready: list[RealServer], client: str) -> RealServer:
        sched = self.vs.scheduler
        if sched in ("sh", "mh", "dh"):
            text = self.vs.address if sched == "dh" else client
            digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
            return ready[digest % len(ready)]
        if sched == "wrr":
            total = sum(r.weight for r in ready)
            for r in ready:
                self._current[r.key] = self._current.get(r.key, 0) + r.weight
            best = max(ready, key=lambda r: self._current[r.key])
            self._current[best.key] -= total
            return best
        if sched in ("lc", "wlc", "sed", "nq"):
            def cost(r: RealServer) -> float:
                conns = self.active.get(r.key, 0)
                if sched == "lc":
                    return conns
                if sched == "nq" and conns == 0:
                    return -1.0 / r.weight
                return (conns + (1 if sched in ("sed", "nq") else 0)) / r.weight

            return min(ready, key=cost)
        pick = ready[self._next % len(ready)]
        self._next += 1
        return pick

    def candidates(self, client: str) -> list[Backend]:
        """Backends to try in order for a new connection from ``client``."""
        ready = self._ready()
        if not ready:
            return []
        now = self.clock()
        chosen: Backend | None = None
        if self.vs.persistence:
            pinned = self._affinity.get(client)
            if pinned and pinned[1] > now and pinned[0] in {r.key for r in ready}:
                chosen = pinned[0]
        if chosen is None:
            chosen = self._pick(ready, client).key
        order = [r.key for r in ready]
        start = order.index(chosen)
        return order[start:] + order[:start]

    def connected(self, client: str, backend: Backend) -> None:
        self.active[backend] = self.active.get(backend, 0) + 1
        if self.vs.persistence:
            self._affinity[client] = (backend, self.clock() + self.vs.persistence)

    def closed(self, backend: Backend) -> None:
        self.active[backend] = max(0, self.active.get(backend, 0) - 1)
