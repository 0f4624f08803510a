"""The kernel side of the lab benchmarks on UML nodes: polls the IPVS virtual servers watched.

IPVS has no netlink event stream (nf_tables has ``nft monitor``, read by
``kernel_watch.py``), so this reader polls. It runs inside a user-mode-linux lab node,
started by ``uml_watch.IpvsWatchers`` through the guest's command server, and asks the
kernel only about the watched ``VIP:port`` keys, every ``--interval`` seconds, over
generic netlink (``IPVS_CMD_GET_SERVICE`` for the persistence flag and timeout, then an
``IPVS_CMD_GET_DEST`` dump for the real servers): a few system calls per key and poll,
however many Services the node holds, and no fork+exec (~27 ms each in UML). The full
table (``/proc/net/ip_vs``) is read only on a ``count`` command (cold-sync progress).

Talking to the host: commands are JSON files the host drops into ``<dir>/cmd/`` (the lab
state folder is mounted in the guest through hostfs; the guest cannot see host writes
through inotify, so it lists that folder on every poll); answers are JSON lines on
stdout, which the guest's command server appends to a log file the host tails. Commands:
``{"op": "watch"|"unwatch", "key": "10.96.16.1:80"}``, ``{"op": "count", "id": N}``,
``{"op": "ping", "id": N}`` (answered with the guest's wall clock, to relate it to the
host's), ``{"op": "stats", "id": N, "reset": bool}`` (the reader's own poll intervals, poll cost,
CPU, since the start or the last reset).
Each ``state`` line carries ``t`` (guest wall clock right after the poll that saw the new
state) and ``prev`` (the poll before it): the change happened in (prev, t].

Standard library only, so it starts fast under ``python -I -S``. The parsers
(``parse_proc``, ``parse_attrs``, ``decode_service``, ``decode_dest``) are pure and unit-tested.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

# --- netlink constants (linux/netlink.h, linux/genetlink.h, linux/ip_vs.h) ---------------
NETLINK_GENERIC = 16
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2
IPVS_GENL_VERSION = 1
IPVS_CMD_GET_SERVICE = 4
IPVS_CMD_GET_DEST = 8
IPVS_CMD_ATTR_SERVICE = 1
IPVS_CMD_ATTR_DEST = 2
IPVS_SVC_ATTR_AF = 1
IPVS_SVC_ATTR_PROTOCOL = 2
IPVS_SVC_ATTR_ADDR = 3
IPVS_SVC_ATTR_PORT = 4
IPVS_SVC_ATTR_FLAGS = 7
IPVS_SVC_ATTR_TIMEOUT = 8
IPVS_DEST_ATTR_ADDR = 1
IPVS_DEST_ATTR_PORT = 2
IPVS_DEST_ATTR_WEIGHT = 4
IP_VS_SVC_F_PERSISTENT = 0x1
NLA_F_MASK = 0x3FFF  # strips NLA_F_NESTED / NLA_F_NET_BYTEORDER from the attribute type

IDLE_INTERVAL = 0.02  # seconds between command checks while nothing is watched

_NLMSG = struct.Struct("=IHHII")
_GENL = struct.Struct("=BBH")
_NLA = struct.Struct("=HH")


@dataclass(frozen=True)
class Answer:
    """One virtual server as the kernel holds it.

    ``targets``: real servers that take new connections (weight > 0), "addr:port" sorted;
    ``drained``: real servers kept at weight 0 (terminating, or kube-proxy's graceful
    delete while connections remain); ``affinity``: the persistence flag; ``timeout``: its
    seconds (0 from ``parse_proc``); ``present``: whether the virtual server exists at all.
    """

    present: bool
    targets: tuple[str, ...] = ()
    drained: tuple[str, ...] = ()
    affinity: bool = False
    timeout: int = 0


ABSENT = Answer(present=False)


# --- /proc/net/ip_vs ------------------------------------------------------------------------


def _hex_endpoint(text: str) -> str:
    """``0A601001:0050`` -> ``10.96.16.1:80`` (IPv4 only: the lab has no IPv6 Services)."""
    addr, port = text.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(addr))}:{int(port, 16)}"


def parse_proc(text: str) -> dict[str, Answer]:
    """``/proc/net/ip_vs`` -> "VIP:port" -> Answer (TCP/UDP/SCTP virtual servers; fwmark
    services and IPv6 are skipped). A service line reads
    ``TCP  0A601001:0050 rr persistent 10800`` (flags after the scheduler), a real-server
    line ``  -> 0AF41001:1F90      Masq    1      0          0``."""
    out: dict[str, Answer] = {}
    key = ""
    targets: list[str] = []
    drained: list[str] = []
    persistent = False

    def close() -> None:
        if key:
            out[key] = Answer(True, tuple(sorted(targets)), tuple(sorted(drained)), persistent)

    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] in ("TCP", "UDP", "SCTP") and len(fields) >= 3:
            close()
            key, targets, drained = "", [], []
            persistent = False
            if len(fields[1].split(":")[0]) != 8:
                continue  # IPv6 ([...]:port)
            key = _hex_endpoint(fields[1])
            # The timeout after "persistent" is printed in jiffies (HZ differs per kernel):
            # left at 0 here; the netlink reader has it in seconds.
            persistent = "persistent" in fields
        elif fields[0] == "FWM":
            close()
            key = ""
        elif fields[0] == "->" and key and len(fields) >= 4 and fields[1][0] != "R":
            if len(fields[1].split(":")[0]) != 8:
                continue
            (targets if int(fields[3]) > 0 else drained).append(_hex_endpoint(fields[1]))
    close()
    return out


def histogram(table: dict[str, Answer]) -> dict[str, int]:
    """Number of virtual servers by number of real servers taking new connections."""
    return {str(k): v for k, v in Counter(len(a.targets) for a in table.values()).items()}


# --- generic netlink --------------------------------------------------------------------------


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = _NLA.size + len(payload)
    return _NLA.pack(size, kind) + payload + b"\0" * (-size % 4)


def parse_attrs(buf: bytes) -> dict[int, bytes]:
    """Netlink attributes of ``buf`` -> type -> payload (the last one wins)."""
    out: dict[int, bytes] = {}
    offset = 0
    while offset + _NLA.size <= len(buf):
        size, kind = _NLA.unpack_from(buf, offset)
        if size < _NLA.size:
            break
        out[kind & NLA_F_MASK] = buf[offset + _NLA.size:offset + size]
        offset += (size + 3) & ~3
    return out


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, payload after the netlink header) for each message in ``data``."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        size, mtype, _flags, seq, _pid = _NLMSG.unpack_from(data, offset)
        if size < _NLMSG.size:
            break
        yield mtype, seq, data[offset + _NLMSG.size:offset + size]
        offset += (size + 3) & ~3


def service_attr(key: str) -> bytes:
    """The ``IPVS_CMD_ATTR_SERVICE`` nest naming TCP ``VIP:port``."""
    vip, port = key.rsplit(":", 1)
    nest = (attr(IPVS_SVC_ATTR_AF, struct.pack("=H", socket.AF_INET))
            + attr(IPVS_SVC_ATTR_PROTOCOL, struct.pack("=H", socket.IPPROTO_TCP))
            + attr(IPVS_SVC_ATTR_ADDR, socket.inet_aton(vip))
            + attr(IPVS_SVC_ATTR_PORT, struct.pack("!H", int(port))))
    return attr(IPVS_CMD_ATTR_SERVICE, nest)


def decode_service(payload: bytes) -> tuple[bool, int]:
    """A GET_SERVICE reply (after the netlink header) -> (persistent, timeout)."""
    svc = parse_attrs(parse_attrs(payload[_GENL.size:]).get(IPVS_CMD_ATTR_SERVICE, b""))
    flags = struct.unpack_from("=I", svc[IPVS_SVC_ATTR_FLAGS])[0] if IPVS_SVC_ATTR_FLAGS in svc else 0
    timeout = struct.unpack_from("=I", svc[IPVS_SVC_ATTR_TIMEOUT])[0] if IPVS_SVC_ATTR_TIMEOUT in svc else 0
    return bool(flags & IP_VS_SVC_F_PERSISTENT), timeout


def decode_dest(payload: bytes) -> tuple[str, int]:
    """One GET_DEST dump message (after the netlink header) -> ("addr:port", weight)."""
    dest = parse_attrs(parse_attrs(payload[_GENL.size:]).get(IPVS_CMD_ATTR_DEST, b""))
    addr = socket.inet_ntoa(dest[IPVS_DEST_ATTR_ADDR][:4])
    port = struct.unpack("!H", dest[IPVS_DEST_ATTR_PORT][:2])[0]
    weight = struct.unpack_from("=i", dest[IPVS_DEST_ATTR_WEIGHT])[0]
    return f"{addr}:{port}", weight


class Ipvs:
    """The IPVS generic netlink family, read-only: one virtual server at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.bind((0, 0))
        self.seq = 0
        reply = self._ask(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0,
                          attr(CTRL_ATTR_FAMILY_NAME, b"IPVS\0"), version=1)
        if not reply:
            raise SystemExit("no IPVS generic netlink family: is ip_vs loaded?")
        family = parse_attrs(reply[0][_GENL.size:])[CTRL_ATTR_FAMILY_ID]
        self.family = struct.unpack_from("=H", family)[0]

    def _ask(self, mtype: int, cmd: int, flags: int, body: bytes,
             version: int = IPVS_GENL_VERSION) -> list[bytes]:
        """Send one request; the payloads of its replies ([] when there is no such service)."""
        self.seq += 1
        payload = _GENL.pack(cmd, version, 0) + body
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(payload), mtype, NLM_F_REQUEST | flags,
                                   self.seq, 0) + payload)
        out: list[bytes] = []
        while True:
            for rtype, seq, data in messages(self.sock.recv(1 << 16)):
                if seq != self.seq:
                    continue
                if rtype == NLMSG_DONE:
                    return out
                if rtype == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data)
                    if code in (0, -errno.ESRCH, -errno.ENOENT):  # no such virtual server
                        return out
                    raise OSError(-code, f"IPVS netlink request {cmd}: {os.strerror(-code)}")
                out.append(data)
                if not flags & NLM_F_DUMP:
                    return out

    def answer(self, key: str) -> Answer:
        nest = service_attr(key)
        svc = self._ask(self.family, IPVS_CMD_GET_SERVICE, 0, nest)
        if not svc:
            return ABSENT
        affinity, timeout = decode_service(svc[0])
        targets, drained = [], []
        for msg in self._ask(self.family, IPVS_CMD_GET_DEST, NLM_F_DUMP, nest):
            real, weight = decode_dest(msg)
            (targets if weight > 0 else drained).append(real)
        return Answer(True, tuple(sorted(targets)), tuple(sorted(drained)), affinity, timeout)


# --- the process --------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Reader:
    def __init__(self, folder: str, interval: float) -> None:
        self.cmd_dir = os.path.join(folder, "cmd")
        os.makedirs(self.cmd_dir, exist_ok=True)
        self.interval = interval
        self.ipvs = Ipvs()
        self.watched: dict[str, Answer | None] = {}
        self.poll_costs: list[float] = []
        self.gaps: list[float] = []
        self.cpu0 = time.process_time()
        self.wall0 = time.time()
        self.busy_until = 0.0

    def emit(self, obj: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    def commands(self) -> None:
        for name in sorted(os.listdir(self.cmd_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.cmd_dir, name)
            with open(path) as f:
                cmd = json.load(f)
            os.unlink(path)
            self.busy_until = time.time() + 1.0
            op = cmd["op"]
            if op == "watch":
                self.watched[cmd["key"]] = None
            elif op == "unwatch":
                self.watched.pop(cmd["key"], None)
            elif op == "ping":
                self.emit({"ev": "pong", "id": cmd["id"], "t": time.time()})
            elif op == "count":
                with open("/proc/net/ip_vs") as f:
                    table = parse_proc(f.read())
                self.emit({"ev": "count", "id": cmd["id"], "hist": histogram(table), "t": time.time()})
            elif op == "stats":
                self.emit({"ev": "stats", "id": cmd["id"], **self.stats()})
                if cmd.get("reset"):  # the next report covers only what follows (one phase)
                    self.poll_costs, self.gaps = [], []
                    self.cpu0, self.wall0 = time.process_time(), time.time()

    def stats(self) -> dict[str, object]:
        wall = time.time() - self.wall0
        cpu = time.process_time() - self.cpu0
        return {"interval_s": self.interval, "polls": len(self.gaps),
                "gap_p50_ms": round(_quantile(self.gaps, 0.5) * 1e3, 2),
                "gap_p99_ms": round(_quantile(self.gaps, 0.99) * 1e3, 2),
                "gap_max_ms": round(max(self.gaps, default=0.0) * 1e3, 2),
                "poll_cost_p50_ms": round(_quantile(self.poll_costs, 0.5) * 1e3, 3),
                "poll_cost_p99_ms": round(_quantile(self.poll_costs, 0.99) * 1e3, 3),
                "cpu_s": round(cpu, 2), "wall_s": round(wall, 1),
                "cpu_share": round(cpu / wall, 4) if wall else 0.0}

    def run(self) -> int:
        self.emit({"ev": "ready", "t": time.time()})
        prev = time.time()
        while True:
            start = time.time()
            self.commands()
            for key, before in list(self.watched.items()):
                now = self.ipvs.answer(key)
                if now != before:
                    self.watched[key] = now
                    self.emit({"ev": "state", "key": key, "present": now.present,
                               "targets": list(now.targets), "drained": list(now.drained),
                               "affinity": now.affinity, "timeout": now.timeout,
                               "t": time.time(), "prev": prev})
            end = time.time()
            if self.watched:  # the reader's resolution is what it achieves while watching
                self.poll_costs.append(end - start)
                self.gaps.append(end - prev)
                if len(self.gaps) > 200_000:
                    del self.gaps[:100_000], self.poll_costs[:100_000]
            prev = end
            # Nothing watched (between changes): look for commands less often; every
            # system call costs the guest, and the system under test shares its CPU.
            # A second after any command it polls fast again (pings measure the channel).
            fast = self.watched or end < self.busy_until
            wait = self.interval if fast else max(self.interval, IDLE_INTERVAL)
            time.sleep(max(0.0, wait - (end - start)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="folder shared with the host (holds cmd/)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between polls")
    args = parser.parse_args()
    return Reader(args.dir, args.interval).run()


if __name__ == "__main__":
    sys.exit(main())
