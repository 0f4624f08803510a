"""Conformance cases for the netfilter kernel surface: run against the fake and the real kernel.

Each case takes a fresh, empty :class:`NetfilterKernel` and asserts on what it reads
back. tests/unit/test_netfilter_conformance_fake.py runs them on ``FakeNetfilter``;
tests/dataplane/test_netfilter_conformance_kernel.py on the real tools, each case in a network
namespace of its own. If the fake and the kernel disagree, one of the two runs fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from svcproxy.dataplane.iptables import rules
from svcproxy.dataplane.iptables.proxier import IptablesProxier
from svcproxy.dataplane.nfkernel import Jump, NetfilterKernel, keep_rules, names_only
from svcproxy.dataplane.proxier import KernelError
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table

A, B = "SVCPROXY-CASE-A", "SVCPROXY-CASE-B"
JUMP = Jump("nat", "PREROUTING", f"-m comment --comment svcproxy-case -j {A}")


def batch(*lines: str, table: str = "nat") -> str:
    return "\n".join([f"*{table}", *lines, "COMMIT"]) + "\n"


def case_rules_read_back_as_iptables_save_prints_them(nf: NetfilterKernel) -> None:
    nf.restore(batch(
        f":{A} - [0:0]", f":{B} - [0:0]",
        f"-A {A} -m comment --comment ns/web -j RETURN",
        f"-A {A} -m comment --comment plain-word_1 -j RETURN",
        f"-A {A} -m statistic --mode random --probability 0.33333333333 -j {B}",
        f"-A {B} -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 1234",
    ))
    assert nf.chains("nat", "SVCPROXY-CASE-") == {
        A: [
            f'-A {A} -m comment --comment "ns/web" -j RETURN',
            f"-A {A} -m comment --comment plain-word_1 -j RETURN",
            f"-A {A} -m statistic --mode random --probability 0.33333333349 -j {B}",
        ],
        B: [f"-A {B} -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 1234"],
    }


def case_a_declared_chain_is_flushed_and_others_are_kept(nf: NetfilterKernel) -> None:
    nf.restore(batch(f":{A} - [0:0]", f":{B} - [0:0]", f"-A {A} -j RETURN", f"-A {B} -j RETURN"))
    nf.restore(batch(f":{A} - [0:0]", f"-A {A} -j ACCEPT"))
    assert nf.chains("nat", "SVCPROXY-CASE-") == {A: [f"-A {A} -j ACCEPT"], B: [f"-A {B} -j RETURN"]}


REFUSED = [
    f"-D {A} -j ACCEPT",  # no such rule
    f"-A {A} -j SVCPROXY-CASE-MISSING",  # jump to a missing chain
    "-A SVCPROXY-CASE-MISSING -j RETURN",  # rule in a missing chain
    f"-X {A}",  # not empty (and jumped to)
    f"-X {B}",  # jumped to
    "-X SVCPROXY-CASE-MISSING",
]


def case_a_refused_batch_changes_nothing(nf: NetfilterKernel, bad: str) -> None:
    nf.restore(batch(f":{A} - [0:0]", f":{B} - [0:0]", f"-A {A} -j {B}"))
    before = nf.chains("nat", "SVCPROXY-CASE-")
    with pytest.raises(KernelError):
        nf.restore(batch(":SVCPROXY-CASE-NEW - [0:0]", f"-A {B} -j RETURN", bad))
    assert nf.chains("nat", "SVCPROXY-CASE-") == before


def case_jumps_go_first_once_and_foreign_rules_stay(nf: NetfilterKernel) -> None:
    nf.restore(batch(":FOREIGN-CASE - [0:0]", "-A FOREIGN-CASE -d 192.0.2.1/32 -j RETURN",
                     "-A PREROUTING -d 192.0.2.2/32 -j FOREIGN-CASE", f":{A} - [0:0]"))
    nf.ensure_jumps([JUMP])
    nf.ensure_jumps([JUMP])  # present already: nothing inserted
    assert nf.jumps("nat") == {JUMP.line}
    saved = nf.read(("nat",), None, names_only)["nat"]
    assert saved.present and saved.problem is None
    prerouting = [line for line in _save(nf, "nat") if line.startswith("-A PREROUTING ")]
    assert prerouting == [JUMP.line, "-A PREROUTING -d 192.0.2.2/32 -j FOREIGN-CASE"]
    nf.remove("nat", "SVCPROXY-CASE-", [JUMP])
    assert nf.jumps("nat") == set() and nf.chains("nat", "SVCPROXY-CASE-") == {}
    assert nf.chains("nat", "FOREIGN-") == {"FOREIGN-CASE": ["-A FOREIGN-CASE -d 192.0.2.1/32 -j RETURN"]}
    assert [line for line in _save(nf, "nat") if line.startswith("-A PREROUTING ")] == prerouting[1:]


def _save(nf: NetfilterKernel, table: str) -> list[str]:
    """Every rule of ``table``, built-in chains included, as iptables-save prints them."""
    out: list[str] = []
    nf.read((table,), "", lambda name, lines: out.extend(lines))
    return out


def case_two_tables_in_one_read_and_a_missing_one_is_empty(nf: NetfilterKernel) -> None:
    nf.restore(batch(f":{A} - [0:0]", f"-A {A} -j RETURN"))
    nf.restore(batch(f":{B} - [0:0]", f"-A {B} -j ACCEPT", table="filter"))
    saved = nf.read(("nat", "filter", "raw"), "SVCPROXY-CASE-", keep_rules)
    assert saved["nat"].chains == {A: [f"-A {A} -j RETURN"]}
    assert saved["filter"].chains == {B: [f"-A {B} -j ACCEPT"]}
    assert saved["raw"].chains == {} and not saved["raw"].jumps
    assert all(t.problem is None for t in saved.values())


def case_remove_of_nothing_writes_nothing_and_succeeds(nf: NetfilterKernel) -> None:
    nf.remove("nat", "SVCPROXY-CASE-", [JUMP])
    assert nf.chains("nat", "SVCPROXY-CASE-") == {} and nf.jumps("nat") == set()


def case_the_backend_is_named(nf: NetfilterKernel) -> None:
    name, reason = nf.backend()
    assert name in ("iptables-nft", "iptables-legacy") and reason == ""
    assert nf.family(False).backend()[0] == name
    assert nf.family(True).family(False).backend() == (name, reason)


def case_the_iptables_proxiers_rules_read_back_as_written(nf: NetfilterKernel) -> None:
    """Every rule form the iptables mode writes, read back: the next full sync finds no
    drift (restores nothing), and the read-back is each rule as written up to the two
    rewrites (quoted comments, the kernel's probability)."""
    def reals(*weights: int) -> list[RealServer]:
        return [RealServer(f"10.244.7.{i + 2}", 8080, w) for i, w in enumerate(weights)]

    def local(*weights: int) -> list[RealServer]:  # the first on this node
        return [RealServer(f"10.244.7.{i + 2}", 8080, w, local=i == 0) for i, w in enumerate(weights)]

    servers = [
        VirtualServer.create("TCP", "10.96.7.1", 80, reals(1, 1, 1), owner="ns/even"),
        VirtualServer.create("TCP", "10.96.7.1", 81, reals(3, 2, 7), owner="ns/weighted"),
        VirtualServer.create("UDP", "10.96.7.1", 53, reals(1, 1), persistence=600, owner="ns/sticky"),
        VirtualServer.create("TCP", "10.96.7.1", 82, reals(1, 0), owner="ns/draining"),
        VirtualServer.create("TCP", "10.96.7.1", 83, [], owner="ns/empty"),
        VirtualServer.create("TCP", "fd00:96::7:1", 80, [RealServer("fd00:244::2", 8080)],
                             persistence=60, owner="ns/six"),
        VirtualServer.create("TCP", "0.0.0.0", 30080, reals(1, 1), owner="ns/nodeport"),
        VirtualServer.create("UDP", "0.0.0.0", 30053, [], owner="ns/nodeport-empty"),
        VirtualServer.create("TCP", "::", 30080, [RealServer("fd00:244::2", 8080)], owner="ns/nodeport6"),
        VirtualServer.create("TCP", "::", 30081, [], owner="ns/nodeport6-empty"),
        VirtualServer.create("TCP", "192.0.2.7", 80, reals(1), owner="ns/external"),
        # Traffic policies Local: a local and a remote endpoint, and none local (DROP).
        VirtualServer.create("TCP", "0.0.0.0", 30082, local(1, 1), persistence=60, owner="ns/etp",
                             local_policy="external"),
        VirtualServer.create("TCP", "198.51.100.3", 80, reals(1), owner="ns/etp-none",
                             local_policy="external"),
        VirtualServer.create("TCP", "::", 30082, [RealServer("fd00:244::2", 8080, local=True)],
                             owner="ns/etp6", local_policy="external"),
        VirtualServer.create("TCP", "10.96.7.2", 80, local(1, 1), owner="ns/itp", local_policy="internal"),
        VirtualServer.create("TCP", "10.96.7.3", 80, reals(1), owner="ns/itp-none", local_policy="internal"),
        # Source ranges: a firewall chain, with and without ranges of the family, Local behind one.
        VirtualServer.create("TCP", "198.51.100.4", 80, reals(1, 1), owner="ns/lbsrc",
                             source_ranges=("203.0.113.0/24", "10.0.0.0/8")),
        VirtualServer.create("TCP", "198.51.100.5", 80, reals(1), owner="ns/lbsrc-closed", source_ranges=()),
        VirtualServer.create("TCP", "198.51.100.6", 80, local(1, 1), owner="ns/lbsrc-etp",
                             local_policy="external", source_ranges=("203.0.113.0/24",)),
        VirtualServer.create("TCP", "2001:db8::6", 80, [RealServer("fd00:244::2", 8080)], owner="ns/lbsrc6",
                             source_ranges=("2001:db8:1::/48",)),
    ]
    p = IptablesProxier(nf, nf.family(True))
    table = make_table(servers)
    first = asyncio.run(p.sync(table))
    assert first.ok, first.errors
    assert asyncio.run(p.sync(table)).ok
    assert (p.last_full.restores, p.last_full.dirty_services) == (0, 0), p.last_full
    weighted = nf.chains("nat", rules.service_chain(servers[1].key))[rules.service_chain(servers[1].key)]
    assert [line.split("--probability ")[1].split()[0] for line in weighted if "probability" in line] == [
        "0.25000000000", "0.22222222202"]
    assert asyncio.run(p.cleanup()).ok
    assert nf.chains("nat", "SVCPROXY-") == {} and nf.chains("filter", "SVCPROXY-") == {}
    assert nf.jumps("nat") == set() and nf.jumps("filter") == set()
    assert nf.family(True).chains("nat", "SVCPROXY-") == {}


Case = Callable[..., None]
CASES: dict[str, Case] = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}
PARAMS: dict[str, list[str]] = {"a_refused_batch_changes_nothing": REFUSED}


def cases() -> list[tuple[str, tuple[object, ...]]]:
    """(name, extra args) for every case and parameter."""
    out: list[tuple[str, tuple[object, ...]]] = []
    for name in sorted(CASES):
        out += [(name, (p,)) for p in PARAMS[name]] if name in PARAMS else [(name, ())]
    return out
