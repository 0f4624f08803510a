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

Many keys are watched at once (every change of an open-loop run is outstanding until it
lands), so each commit resolves the watched keys from one index of the service entries, and
a commit that touched only the probe table resolves nothing.

The reader measures its own lag: ``probe_start`` makes it write known rules (one
transaction each, through libnftables in this process, at exponential random intervals)
into a table of the benchmark's own, ``ip bench_probe``, which has no hooked chain and so
no effect on packets; for each it prints when the write was issued, when the kernel acked
it and when the monitor delivered its commit.

Commands on stdin (JSON lines): ``{"op": "watch", "key": "10.96.16.1:80"}``,
``{"op": "unwatch", "key": ...}``, ``{"op": "count", "id": N}`` (histogram of the number of
targets over every service entry), ``{"op": "probe_start", "rate": R, "seed": S}``,
``{"op": "probe_stop"}``, ``{"op": "owned", "id": N}`` (svcproxy's chains and tables left) and
``{"op": "sweep", "id": N}`` (remove them, with the jumps into them). The pure part
(``NftMirror``) is unit-tested.
"""

from __future__ import annotations

import ctypes
import json
import random
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
_PROBE = re.compile(r'comment "probe-(\d+)"')
PROBE_TABLE = "ip bench_probe"
OWNED_PREFIX = "SVCPROXY-"  # svcproxy's iptables chains; its nftables table is "svcproxy"


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

    def answers(self, keys: list[str]) -> dict[str, Answer]:
        """``resolve`` for many keys from one pass over the entries."""
        index = self.entries()
        return {key: self.resolve(key, index.get(key, [])) for key in keys}

    def owned(self) -> list[tuple[Table, str]]:
        """svcproxy's chains (``SVCPROXY-*``) and the chains of its ``svcproxy`` tables."""
        return sorted(k for k in self.rules
                      if k[1].startswith(OWNED_PREFIX) or k[0].split()[-1] == "svcproxy")

    def sweep_script(self) -> str:
        """An nft script removing what ``owned`` lists: first the jumps into it, then it."""
        owned = set(self.owned())
        lines = []
        for (table, chain), rules in self.rules.items():
            if (table, chain) in owned:
                continue
            for handle, text in rules.items():
                if any((table, j) in owned for j in _JUMP.findall(text)):
                    lines.append(f"delete rule {table} {chain} handle {handle}")
        lines += [f"flush chain {t} {c}" for t, c in sorted(owned)]
        lines += [f"delete chain {t} {c}" for t, c in sorted(owned) if t.split()[-1] != "svcproxy"]
        lines += [f"delete table {t}" for t in sorted({t for t, _ in owned if t.split()[-1] == "svcproxy"})]
        return "\n".join(lines) + "\n" if lines else ""

    def histogram(self) -> dict[int, int]:
        """Number of service entries by number of DNAT targets."""
        return dict(Counter(len(self.resolve(k, s).targets) for k, s in self.entries().items()))


class Nft:
    """nft commands from this process: libnftables when it loads (no process start in the
    timed path), else the ``nft`` tool."""

    def __init__(self) -> None:
        self.ctx: int | None = None
        self.lock = threading.Lock()  # one libnftables context: the probes and a sweep share it
        try:
            self.lib = ctypes.CDLL("libnftables.so.1")
            self.lib.nft_ctx_new.restype = ctypes.c_void_p
            self.lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            self.lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            self.ctx = self.lib.nft_ctx_new(0)
        except OSError:
            self.ctx = None

    @property
    def how(self) -> str:
        return "libnftables" if self.ctx else "nft tool"

    def run(self, script: str) -> str | None:
        """Run ``script`` as one transaction; what went wrong, or None."""
        if self.ctx:
            with self.lock:
                rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
            return None if rc == 0 else f"libnftables returned {rc} for: {script[:200]}"
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              check=False)
        return None if proc.returncode == 0 else proc.stderr.strip()[-300:]


class Reader:
    """The process side: nft monitor -> mirror -> JSON lines for watched keys."""

    def __init__(self) -> None:
        self.mirror = NftMirror()
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.watched: dict[str, Answer | None] = {}
        self.generation_time = time.time()
        self.nft = Nft()
        self.touched: set[str] = set()  # tables changed since the last commit
        self.probes: dict[int, dict[str, float]] = {}  # probe id -> written / acked / seen
        self.in_generation: list[int] = []
        self.probing = threading.Event()

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
        answers = self.mirror.answers(keys if keys is not None else list(self.watched))
        for key, answer in answers.items():
            if answer != self.watched.get(key):
                self.watched[key] = answer
                self.emit({"ev": "state", "key": key, "targets": list(answer.targets),
                           "affinity": answer.affinity, "t": t})

    def follow(self, monitor: subprocess.Popen[str]) -> None:
        assert monitor.stdout is not None
        for raw in monitor.stdout:
            line = raw.rstrip("\n")
            with self.lock:
                if self.mirror.apply(line):
                    self.generation_time = time.time()
                    if self.touched - {PROBE_TABLE}:
                        self.report(self.generation_time)
                    for pid in self.in_generation:
                        self._probe_part(pid, "seen", self.generation_time)
                    self.touched.clear()
                    self.in_generation.clear()
                    continue
                words = line.split()
                if len(words) >= 4:
                    self.touched.add(" ".join(words[2:4]))
                if m := _PROBE.search(line):
                    self.in_generation.append(int(m.group(1)))
        self.emit({"ev": "error", "why": "nft monitor ended"})

    def _probe_part(self, pid: int, what: str, t: float) -> None:
        """Note one stamp of probe ``pid``; print the probe once all three are in (lock held)."""
        probe = self.probes.setdefault(pid, {})
        probe[what] = t
        if len(probe) == 3:
            del self.probes[pid]
            self.emit({"ev": "probe", "id": pid, **probe})

    def probe(self, rate: float, seed: int) -> None:
        """Write probe rules at exponential random intervals until ``probe_stop``."""
        rng = random.Random(seed)
        why = self.nft.run(f"add table {PROBE_TABLE}\nadd chain {PROBE_TABLE} probe\n")
        if why:
            self.emit({"ev": "error", "why": f"cannot make the probe table: {why}"})
            return
        pid = 0
        while self.probing.is_set():
            time.sleep(rng.expovariate(rate))
            pid += 1
            script = (f"flush chain {PROBE_TABLE} probe\n"
                      f'add rule {PROBE_TABLE} probe counter comment "probe-{pid}"\n')
            written = time.time()
            why = self.nft.run(script)
            acked = time.time()
            if why:
                self.emit({"ev": "error", "why": f"probe write failed: {why}"})
                return
            with self.lock:
                self._probe_part(pid, "written", written)
                self._probe_part(pid, "acked", acked)
        self.nft.run(f"delete table {PROBE_TABLE}\n")

    def commands(self) -> None:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "probe_start" and not self.probing.is_set():
                self.probing.set()
                threading.Thread(target=self.probe, args=(cmd["rate"], cmd["seed"]),
                                 daemon=True).start()
                continue
            if cmd["op"] == "probe_stop":
                self.probing.clear()
                continue
            with self.lock:
                self.command(cmd)

    def command(self, cmd: dict[str, object]) -> None:
        """One stdin command other than the probes' (lock held)."""
        if cmd["op"] == "watch":
            key = str(cmd["key"])
            self.watched[key] = None
            self.report(time.time(), [key])
        elif cmd["op"] == "unwatch":
            self.watched.pop(str(cmd["key"]), None)
        elif cmd["op"] == "count":
            hist = self.mirror.histogram()
            self.emit({"ev": "count", "id": cmd["id"], "hist": hist, "t": time.time()})
        elif cmd["op"] == "owned":
            self.emit({"ev": "owned", "id": cmd["id"],
                       "chains": [f"{t} {c}" for t, c in self.mirror.owned()]})
        elif cmd["op"] == "sweep":
            script = self.mirror.sweep_script()
            why = self.nft.run(script) if script else None
            self.emit({"ev": "swept", "id": cmd["id"], "ops": script.count("\n"), "error": why})

    def run(self) -> int:
        monitor = subprocess.Popen(["stdbuf", "-oL", "nft", "-a", "monitor"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1)
        time.sleep(0.2)  # let the monitor subscribe before the dump, so nothing falls between
        self.dump()
        threading.Thread(target=self.follow, args=(monitor,), daemon=True).start()
        threading.Thread(target=self.errors, args=(monitor,), daemon=True).start()
        self.emit({"ev": "ready", "t": time.time(), "writer": self.nft.how})
        try:
            self.commands()
        finally:
            self.probing.clear()
            self.nft.run(f"delete table {PROBE_TABLE}\n")
            monitor.terminate()
        return 0

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


if __name__ == "__main__":
    sys.exit(Reader().run())
