"""Trace a new connection through the in-memory netfilter's nat rules (tests only).

kube-proxy's iptables tests trace packets through the rules rather than compare rule
text; this does the same for the fake: from a built-in chain, follow the rules whose
address, protocol and port match, into our chains, and collect where the connection
can end up (every branch of a ``statistic`` or ``recent`` match is taken).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from svcproxy.dataplane.nffake import FakeNetfilter


@dataclass(frozen=True)
class Source:
    """The sender, when a trace should check source matches: its address, and whether
    it is one of the node's own (``-m addrtype --src-type LOCAL``)."""

    address: str
    local: bool = False


def _matches(words: list[str], dst: str, port: int, proto: str, *, local: frozenset[str] | None,
             src: Source | None) -> bool:
    """Destination, protocol and port; ``--dst-type LOCAL`` only with ``local`` (the
    node's addresses) and source matches only with ``src`` (else taken as met, e.g.
    masquerade marks)."""
    for i, word in enumerate(words[:-1]):
        value = words[i + 1]
        ok = True
        if word == "-d":
            ok = value.split("/")[0] == dst
        elif word == "-p":
            ok = value == proto
        elif word == "--dport":
            ok = int(value) == port
        elif word == "--dst-type" and local is not None:
            ok = (dst in local) == (value == "LOCAL")
        elif word == "-s" and src is not None:
            ok = ipaddress.ip_address(src.address) in ipaddress.ip_network(value, strict=False)
            ok = ok != (i > 0 and words[i - 1] == "!")
        elif word == "--src-type" and src is not None:
            ok = (value == "LOCAL") == src.local
        if not ok:
            return False
    return True


def trace(nf: FakeNetfilter, dst: str, port: int, proto: str = "tcp", *,
          table: str = "nat", chain: str = "PREROUTING", local: frozenset[str] | None = None,
          src: Source | None = None) -> set[str]:
    """Where a new connection to ``dst:port`` can go: "IP:PORT" (DNAT),
    "redirect:PORT", "reject", "drop"; empty when no rule of ours takes it. ``local``:
    the node's addresses, for ``-m addrtype --dst-type`` (None: taken as met). With
    ``src``, source matches are checked and "masq" says the masquerade mark was set."""
    out, _ = _walk(nf, table, chain, dst=dst, port=port, proto=proto, local=local, src=src, depth=0)
    return out


def _walk(nf: FakeNetfilter, table: str, chain: str, *, dst: str, port: int, proto: str,
          local: frozenset[str] | None, src: Source | None, depth: int) -> tuple[set[str], bool]:
    assert depth < 20, "a loop in the rules"
    found: set[str] = set()
    for line in nf.rules(table, chain):
        words = line.split()[2:]
        if not _matches(words, dst, port, proto, local=local, src=src):
            continue
        maybe = "statistic" in words or "--rcheck" in words
        target = words[words.index("-j") + 1] if "-j" in words else ""
        if target == "DNAT":
            found.add(words[words.index("--to-destination") + 1])
            done = True
        elif target == "REDIRECT":
            found.add(f"redirect:{words[words.index('--to-ports') + 1]}")
            done = True
        elif target == "REJECT":
            found.add("reject")
            done = True
        elif target == "DROP":
            found.add("drop")
            done = True
        elif target == "SVCPROXY-MARK-MASQ" and src is not None:
            found.add("masq")
            done = False
        elif target in nf.tables.get(table, {}):
            sub, done = _walk(nf, table, target, dst=dst, port=port, proto=proto, local=local,
                              src=src,
                              depth=depth + 1)
            found |= sub
        else:
            done = target in ("ACCEPT", "RETURN")
            if target == "RETURN":
                return found, False
        if done and not maybe:
            return found, True
    return found, False
