"""The real netfilter adapter: the only module that runs iptables-save / iptables-restore.

Implements :class:`~svcproxy.dataplane.nfkernel.NetfilterKernel` for the ``iptables``
and ``userspace`` proxiers (their NAT chains) and the ``ipvs`` node setup (its
masquerade chain); ``nffake.FakeNetfilter`` is its in-memory twin. Every write goes
through ``iptables-restore --noflush``, which applies a whole batch atomically and
touches only the chains named in it, so chains and rules the project does not own are
never flushed. Reads stream ``iptables-save``'s output line by line through
:func:`~svcproxy.dataplane.nfkernel.scan`, never holding it whole. It also probes
which backend the node has (nft or x_tables) and whether nft can make NAT chains.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

from svcproxy.dataplane.nfkernel import (
    PROJECT_PREFIX,
    Jump,
    NetfilterKernel,
    SavedTable,
    SaveRestore,
    keep_rules,
    names_only,
    scan,
)
from svcproxy.dataplane.proxier import KernelError, ModeUnavailableError

__all__ = [
    "NFT_READ_BESIDE", "PROJECT_PREFIX", "Jump", "Netfilter", "NetfilterKernel", "SavedTable",
    "detect_backend", "keep_rules", "names_only", "needs_legacy", "scan",
]


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


# How long a full sync lets partial syncs commit beside its iptables-save (see
# proxier.read_beside). The nft variant's dump starts over when the ruleset changes
# under it; past this the read has the table to itself. At 1k Services the read takes
# ~0.3 s (never cut short); at 10k a few seconds, which changes then wait at most.
NFT_READ_BESIDE = 1.0


class Netfilter(SaveRestore):
    """iptables-save / iptables-restore for one address family (a ``NetfilterKernel``)."""

    def __init__(
        self, ipv6: bool = False, netns: str | None = None, legacy: bool | None = None
    ) -> None:
        # legacy: the x_tables binaries, for kernels without nft NAT (e.g. the UML kernel
        # has iptable_nat but no nft_chain_nat); None: find out by probing the kernel.
        if legacy is None:
            legacy = needs_legacy(ipv6, netns)
        self.legacy = legacy
        # For read_beside: -legacy reads a table in one getsockopt, undisturbed by commits.
        self.read_beside_for: float | None = None if legacy else NFT_READ_BESIDE
        base = ("ip6tables" if ipv6 else "iptables") + ("-legacy" if legacy else "")
        self._save = f"{base}-save"
        self._restore = f"{base}-restore"
        self._prefix = _in_netns(netns)
        self.netns = netns
        self.ipv6 = ipv6

    def backend(self) -> tuple[str, str]:
        name, reason = detect_backend(self.netns)
        if name and self.legacy:
            name = "iptables-legacy"  # fell back to x_tables (no nft NAT here)
        return name, reason

    def family(self, ipv6: bool) -> Netfilter:
        return self if ipv6 == self.ipv6 else Netfilter(ipv6=ipv6, netns=self.netns)

    def lines(self, *args: str, modules: str) -> Iterator[str]:
        """iptables-save's output line by line as the tool prints it (never the whole text).

        When the tool fails it raises, after the last line it printed:
        :class:`ModeUnavailableError` if it printed nothing (the table cannot be made
        here: ``modules``), :class:`KernelError` if it stopped midway. So a consumer
        must not act on what it read before the iteration has ended.
        """
        command = " ".join([self._save, *args]) + (f" in netns {self.netns}" if self.netns else "")
        count = 0
        # stderr to a file, not a pipe that nobody reads until stdout ends (a full pipe
        # would stall the tool). surrogateescape: a foreign rule's comment may hold bytes
        # that are not UTF-8; they must not abort the read (such lines are not ours).
        with tempfile.TemporaryFile() as err:
            with subprocess.Popen(
                [*self._prefix, self._save, *args], stdout=subprocess.PIPE, stderr=err,
                text=True, errors="surrogateescape",
            ) as proc:
                assert proc.stdout is not None
                try:
                    for line in proc.stdout:
                        count += 1
                        yield line.rstrip("\n")
                finally:
                    proc.stdout.close()  # a consumer that stopped early: the tool gets EPIPE
                    code = proc.wait()
            err.seek(0)
            message = err.read().decode(errors="replace").strip()[:2000]
        if code != 0 and count == 0:
            raise ModeUnavailableError(f"{command} failed: {message} (is {modules} loadable?)")
        if code != 0:
            raise KernelError(
                f"{command} stopped after {count} lines with exit status {code}: {message}."
                " The read-back is incomplete, so nothing was written from it and the next"
                " sync reads again; if this repeats, run that command on the node to see why",
                errno=code,
            )

    def save_lines(self, tables: Sequence[str]) -> Iterator[str]:
        """One table is asked for with ``-t`` (the -legacy tool then reads only that one);
        several with one run of the whole ruleset (the nft variant fetches all of it for
        any run, so two tables cost what one does)."""
        if len(tables) == 1:
            return self.lines("-t", tables[0], modules=f"the iptable_{tables[0]} or nf_tables module")
        return self.lines(modules="an iptable_* or the nf_tables module")

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
