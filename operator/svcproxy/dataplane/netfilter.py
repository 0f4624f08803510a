"""The netfilter adapter: the only module that runs iptables-save / iptables-restore.

Used by the ``iptables`` and ``userspace`` proxiers (their NAT chains) and by
the ``ipvs`` node setup (its masquerade chain). Every write goes through
``iptables-restore --noflush``, which applies a whole batch atomically and
touches only the chains named in it, so chains and rules the project does
not own are never flushed. Each mode owns chains under its own prefix and
sweeps only those.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from svcproxy.dataplane.proxier import KernelError, ModeUnavailableError


@dataclass(frozen=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of our chains."""

    table: str
    chain: str  # built-in chain (PREROUTING, OUTPUT, POSTROUTING)
    rule: str  # rule spec after "-A CHAIN ", e.g. "-m comment --comment svcproxy -j SVCPROXY-SERVICES"


def _in_netns(netns: str | None) -> list[str]:
    # Tests and benchmarks program a node network namespace from outside it.
    return ["ip", "netns", "exec", netns] if netns else []


def detect_backend(netns: str | None = None) -> tuple[str, str]:
    """("iptables-nft" | "iptables-legacy", "") or ("", why not usable)."""
    if shutil.which("iptables-restore") is None:
        return "", "iptables-restore is not installed: install the iptables package"
    proc = subprocess.run(
        [*_in_netns(netns), "iptables", "-V"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return "", f"`iptables -V` failed: {proc.stderr.strip()}"
    return ("iptables-nft" if "nf_tables" in proc.stdout else "iptables-legacy"), ""


# Creates and deletes one chain of ours in one atomic batch: leaves nothing behind,
# and fails where nf_tables cannot make a nat table.
_NAT_PROBE = "*nat\n:SVCPROXY-PROBE - [0:0]\n-X SVCPROXY-PROBE\nCOMMIT\n"


def needs_legacy(ipv6: bool = False, netns: str | None = None) -> bool:
    """True when ``iptables`` is the nft variant but this kernel has no nft NAT
    (``nft_chain_nat``; e.g. the UML kernel has only x_tables ``iptable_nat``), so
    NAT chains can only be made with the ``-legacy`` tools."""
    base = "ip6tables" if ipv6 else "iptables"
    if shutil.which(f"{base}-nft-restore") is None or shutil.which(f"{base}-legacy-restore") is None:
        return False
    if detect_backend(netns)[0] != "iptables-nft":
        return False
    proc = subprocess.run(
        [*_in_netns(netns), f"{base}-nft-restore", "--noflush", "-w", "5"],
        input=_NAT_PROBE, capture_output=True, text=True, check=False,
    )
    return proc.returncode != 0


class Netfilter:
    """iptables-save / iptables-restore for one address family."""

    def __init__(
        self, ipv6: bool = False, netns: str | None = None, legacy: bool | None = None
    ) -> None:
        # legacy: the x_tables binaries, for kernels without nft NAT (e.g. the UML kernel
        # has iptable_nat but no nft_chain_nat); None: find out by probing the kernel.
        if legacy is None:
            legacy = needs_legacy(ipv6, netns)
        self.legacy = legacy
        base = ("ip6tables" if ipv6 else "iptables") + ("-legacy" if legacy else "")
        self._save = f"{base}-save"
        self._restore = f"{base}-restore"
        self._prefix = _in_netns(netns)
        self.netns = netns

    def _run_save(self, *args: str, modules: str) -> str:
        proc = subprocess.run([*self._prefix, self._save, *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            command = " ".join([self._save, *args])
            raise ModeUnavailableError(
                f"{command} failed: {proc.stderr.strip()} (is {modules} loadable?)"
            )
        return proc.stdout

    def save(self, table: str = "nat") -> str:
        return self._run_save("-t", table, modules=f"the iptable_{table} or nf_tables module")

    def save_tables(self, tables: Iterable[str]) -> dict[str, str]:
        """Several tables from ONE iptables-save run (the nft variant fetches the whole
        ruleset for each run, so one run costs what ``save(table)`` costs): table -> its
        section (``*table`` ... ``COMMIT``); a table the kernel does not have yet comes
        back as an empty section."""
        saved = self._run_save(modules="an iptable_* or the nf_tables module")
        sections: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in saved.splitlines():
            if line.startswith("*"):
                current = sections.setdefault(line[1:], [])
            if current is not None:
                current.append(line)
            if line == "COMMIT":
                current = None
        return {t: "\n".join(sections.get(t, [f"*{t}", "COMMIT"])) + "\n" for t in tables}

    def restore(self, text: str) -> None:
        """Apply one atomic batch (``*table`` ... ``COMMIT``) without flushing anything else."""
        proc = subprocess.run(
            [*self._prefix, self._restore, "--noflush", "-w", "5"],
            input=text,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise KernelError(
                f"{self._restore} --noflush refused the batch: {proc.stderr.strip()[:2000]}"
                " (retried on the next sync)",
                errno=proc.returncode,
            )

    def chains(self, table: str, prefix: str) -> dict[str, list[str]]:
        """Our chains (name starts with ``prefix``) and their rules as saved."""
        return parse_chains(self.save(table), prefix)

    def ensure_jumps(self, jumps: Iterable[Jump], saved: str | None = None) -> None:
        """Insert missing jump rules (first position) into built-in chains.

        ``saved``: iptables-save output of the jumps' table, when all are in one table
        and the caller read it already (saves one iptables-save run)."""
        by_table: dict[str, list[Jump]] = {}
        for jump in jumps:
            by_table.setdefault(jump.table, []).append(jump)
        for table, items in by_table.items():
            text = saved if saved is not None and len(by_table) == 1 else self.save(table)
            lines = set(text.splitlines())
            missing = [j for j in items if f"-A {j.chain} {j.rule}" not in lines]
            if missing:
                body = "\n".join(f"-I {j.chain} 1 {j.rule}" for j in missing)
                self.restore(f"*{table}\n{body}\nCOMMIT\n")

    def remove(self, table: str, prefix: str, jumps: Iterable[Jump]) -> None:
        """Delete our jumps and every chain under ``prefix`` in ``table``."""
        text = self.save(table)
        lines = set(text.splitlines())
        ours = parse_chains(text, prefix)
        out = [f"*{table}"]
        out += [f"-D {j.chain} {j.rule}" for j in jumps if f"-A {j.chain} {j.rule}" in lines]
        out += [f":{name} - [0:0]" for name in ours]  # flush first: -X needs empty chains
        out += [f"-X {name}" for name in ours]
        if len(out) > 1:
            self.restore("\n".join(out) + "\nCOMMIT\n")


_CHAIN = re.compile(r"^:(\S+) ")


def parse_chains(saved: str, prefix: str) -> dict[str, list[str]]:
    """Chains starting with ``prefix`` -> their rule lines ("-A ...") from iptables-save."""
    chains: dict[str, list[str]] = {}
    for line in saved.splitlines():
        match = _CHAIN.match(line)
        if match and match.group(1).startswith(prefix):
            chains[match.group(1)] = []
        elif line.startswith("-A "):
            name = line.split(" ", 2)[1]
            if name in chains:
                chains[name].append(line)
    return chains
