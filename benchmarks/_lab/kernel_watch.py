"""The kernel side of the lab benchmarks: a mirror of one node's nf_tables NAT state.

Run as a script inside a node's network namespace by ``harness.KernelWatchers`` (one
process per node), it follows ``nft -a monitor`` (every rule, chain and map-element change
the kernel commits, with the commit marker ``# new generation N``) on top of one initial
``nft -a list ruleset``, so it reads the kernel's state as it changes without dumping 40k
rules on every poll. iptables-nft (the host's iptables, used by kube-proxy's iptables mode
and svcproxy's iptables mode) and kube-proxy's nftables mode all land in nf_tables, so one
reader serves every system under test.

For each watched ``VIP:port`` it resolves what the kernel would DNAT to: the entry rules
(``ip daddr VIP ... dport PORT`` in a ``*SERVICES`` chain, or an element of kube-proxy's
``service-ips`` verdict map), then every chain reachable by ``jump``/``goto`` (vmaps
included), collecting ``dnat to`` targets (also kube-proxy's ``dnat ip to numgen ... map``),
and whether affinity rules (``recent`` / ``@affinity``) are on the path. After each commit
it prints, as JSON lines on stdout, the watched keys whose answer changed, stamped with the
wall-clock time the commit was seen.

Commands on stdin (JSON lines): ``{"op": "watch", "key": "10.96.16.1:80"}``,
``{"op": "unwatch", "key": ...}``, ``{"op": "count", "id": N}`` (histogram of the number of
targets over every service entry). The pure part (``NftMirror``) is unit-tested.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

Table = str  # "ip nat", "ip kube-proxy"

_ADD_RULE = re.compile(r"^add rule (\S+ \S+) (\S+) (.*) # handle (\d+)\s*$")
_DEL_RULE = re.compile(r"^delete rule (\S+ \S+) (\S+) handle (\d+)")
_ADD_CHAIN = re.compile(r"^(?:add|create) chain (\S+ \S+) (\S+)")
_DEL_CHAIN = re.compile(r"^delete chain (\S+ \S+) (\S+)")
_FLUSH_CHAIN = re.compile(r"^flush chain (\S+ \S+) (\S+)")
_DEL_TABLE = re.compile(r"^(delete|flush) table (\S+ \S+)")
_ELEMENT = re.compile(r"^(add|delete) element (\S+ \S+) (\S+) \{(.*)\}")
_ENTRY = re.compile(r"(\d+\.\d+\.\d+\.\d+) \. (\w+) \. (\d+)(?: : (?:goto|jump) ([^\s,}]+))?")
_JUMP = re.compile(r"\b(?:jump|goto) ([^\s,}]+)")
_DNAT = re.compile(r"\bdnat (?:ip )?to (\d\S+)")
# kube-proxy >= 1.33 nftables without affinity: "dnat ip to numgen random mod 2 map { 0 : A . P, ... }"
_DNAT_MAP = re.compile(r": (\d+\.\d+\.\d+\.\d+) \. (\d+)")
_DADDR = re.compile(r"ip daddr (\d+\.\d+\.\d+\.\d+) .*?dport (\d+)")
_HANDLE = re.compile(r"^(.*?)\s*# handle (\d+)\s*$")


@dataclass(frozen=True)
class Answer:
    """What the kernel does with one VIP:port: DNAT targets and whether affinity is on."""

    targets: tuple[str, ...]
    affinity: bool


@dataclass
class NftMirror:
    """The rules, chains and verdict-map elements of every nf_tables table, kept by events."""

    rules: dict[tuple[Table, str], dict[int, str]] = field(default_factory=dict)
    elements: dict[tuple[Table, str], dict[str, str]] = field(default_factory=dict)

    def load_dump(self, text: str) -> None:
        """Replace the mirror with the output of ``nft -a list ruleset``."""
        self.rules.clear()
        self.elements.clear()
        table = ""
        chain = ""
        in_map = ""
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("table "):
                table = " ".join(line.split()[1:3])
                chain = in_map = ""
            elif line.startswith("chain "):
                chain, in_map = line.split()[1], ""
                self.rules.setdefault((table, chain), {})
            elif line.startswith("map "):
                in_map, chain = line.split()[1], ""
                self.elements.setdefault((table, in_map), {})
            elif line.startswith("set "):
                chain = in_map = ""
            elif in_map and (line.startswith("elements") or pending):
                pending += " " + line
                if "}" in line:
                    self._elements(table, in_map, pending, add=True)
                    pending = ""
            elif chain:
                match = _HANDLE.match(line)
                if match and match.group(1):
                    self.rules[(table, chain)][int(match.group(2))] = match.group(1)

    def apply(self, line: str) -> bool:
        """Apply one ``nft -a monitor`` line; True when it marks a committed generation."""
        if line.startswith("# new generation"):
            return True
        if m := _ADD_RULE.match(line):
            self.rules.setdefault((m.group(1), m.group(2)), {})[int(m.group(4))] = m.group(3).strip()
        elif m := _DEL_RULE.match(line):
            self.rules.get((m.group(1), m.group(2)), {}).pop(int(m.group(3)), None)
        elif m := _ELEMENT.match(line):
            self._elements(m.group(2), m.group(3), m.group(4), add=m.group(1) == "add")
        elif m := _ADD_CHAIN.match(line):
            self.rules.setdefault((m.group(1), m.group(2)), {})
        elif m := _DEL_CHAIN.match(line):
            self.rules.pop((m.group(1), m.group(2)), None)
        elif m := _FLUSH_CHAIN.match(line):
            self.rules[(m.group(1), m.group(2))] = {}
        elif m := _DEL_TABLE.match(line):
            table = m.group(2)
            for key in [k for k in self.rules if k[0] == table]:
                if m.group(1) == "delete":
                    del self.rules[key]
                else:
                    self.rules[key] = {}
            for key in [k for k in self.elements if k[0] == table]:
                del self.elements[key]
        return False

    def _elements(self, table: Table, name: str, body: str, add: bool) -> None:
        elems = self.elements.setdefault((table, name), {})
        for vip, proto, port, target in _ENTRY.findall(body):
            key = f"{vip}:{port}/{proto}"
            if add and target:
                elems[key] = target
            elif not add:
                elems.pop(key, None)

    def entries(self) -> dict[str, list[tuple[Table, str]]]:
        """Every service entry: "VIP:port" -> the (table, chain)s it jumps to."""
        out: dict[str, list[tuple[Table, str]]] = {}
        for (table, chain), rules in self.rules.items():
            if not chain.endswith("SERVICES"):
                continue
            for text in rules.values():
                d = _DADDR.search(text)
                if d:
                    out.setdefault(f"{d.group(1)}:{d.group(2)}", []).extend(
                        (table, j) for j in _JUMP.findall(text))
        for (table, _name), elems in self.elements.items():
            for key, target in elems.items():
                out.setdefault(key.split("/")[0], []).append((table, target))
        return out

    def resolve(self, key: str, start: list[tuple[Table, str]] | None = None) -> Answer:
        """The DNAT targets reachable from the entries of ``key`` ("VIP:port")."""
        if start is None:
            vip, port = key.split(":")
            start = []
            for (table, chain), rules in self.rules.items():
                if chain.endswith("SERVICES"):
                    for text in rules.values():
                        if f"ip daddr {vip} " in text and f"dport {port} " in f"{text} ":
                            start.extend((table, j) for j in _JUMP.findall(text))
            for (table, _name), elems in self.elements.items():
                for proto in ("tcp", "udp", "sctp"):
                    if target := elems.get(f"{key}/{proto}"):
                        start.append((table, target))
        seen: set[tuple[Table, str]] = set()
        todo = list(start)
        targets: set[str] = set()
        affinity = False
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            for text in self.rules.get(node, {}).values():
                targets.update(_DNAT.findall(text))
                if "dnat" in text and "map {" in text:
                    targets.update(f"{a}:{p}" for a, p in _DNAT_MAP.findall(text))
                affinity = affinity or "recent" in text or "@affinity" in text
                todo.extend((node[0], j) for j in _JUMP.findall(text))
        return Answer(tuple(sorted(targets)), affinity)

    def histogram(self) -> dict[int, int]:
        """Number of service entries by number of DNAT targets."""
        return dict(Counter(len(self.resolve(k, s).targets) for k, s in self.entries().items()))


class Reader:
    """The process side: nft monitor -> mirror -> JSON lines for watched keys."""

    def __init__(self) -> None:
        self.mirror = NftMirror()
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.watched: dict[str, Answer | None] = {}
        self.generation_time = time.time()

    def emit(self, obj: dict[str, object]) -> None:
        with self.out_lock:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    def dump(self) -> None:
        text = subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True, text=True,
                              check=True).stdout
        with self.lock:
            self.mirror.load_dump(text)

    def report(self, t: float, keys: list[str] | None = None) -> None:
        """Print the watched keys whose answer changed (call with the lock held)."""
        for key in keys if keys is not None else list(self.watched):
            answer = self.mirror.resolve(key)
            if answer != self.watched.get(key):
                self.watched[key] = answer
                self.emit({"ev": "state", "key": key, "targets": list(answer.targets),
                           "affinity": answer.affinity, "t": t})

    def follow(self, monitor: subprocess.Popen[str]) -> None:
        assert monitor.stdout is not None
        for line in monitor.stdout:
            with self.lock:
                if self.mirror.apply(line.rstrip("\n")):
                    self.generation_time = time.time()
                    self.report(self.generation_time)
        self.emit({"ev": "error", "why": "nft monitor ended"})

    def errors(self, monitor: subprocess.Popen[str]) -> None:
        """nft monitor reports lost events (netlink ENOBUFS) on stderr: re-read everything.

        Other stderr lines ("XT target MASQUERADE not found": a target nft cannot print) are
        drained and ignored; a slow reader here would block nft, and so the events.
        """
        assert monitor.stderr is not None
        for line in monitor.stderr:
            if "lost" not in line.lower() and "buffer" not in line.lower():
                continue
            self.emit({"ev": "resync", "why": line.strip()})
            self.dump()
            with self.lock:
                self.report(time.time())

    def commands(self) -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            with self.lock:
                if cmd["op"] == "watch":
                    self.watched[cmd["key"]] = None
                    self.report(time.time(), [cmd["key"]])
                elif cmd["op"] == "unwatch":
                    self.watched.pop(cmd["key"], None)
                elif cmd["op"] == "count":
                    hist = self.mirror.histogram()
                    self.emit({"ev": "count", "id": cmd["id"], "hist": hist, "t": time.time()})

    def run(self) -> int:
        monitor = subprocess.Popen(["stdbuf", "-oL", "nft", "-a", "monitor"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1)
        time.sleep(0.2)  # let the monitor subscribe before the dump, so nothing falls between
        self.dump()
        threading.Thread(target=self.follow, args=(monitor,), daemon=True).start()
        threading.Thread(target=self.errors, args=(monitor,), daemon=True).start()
        self.emit({"ev": "ready", "t": time.time()})
        try:
            self.commands()
        finally:
            monitor.terminate()
        return 0


if __name__ == "__main__":
    sys.exit(Reader().run())
