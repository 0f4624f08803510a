"""The nf_tables mirror of the benchmarks' kernel reader (benchmarks/_lab/kernel_watch.py).

Fed with the text that ``nft -a list ruleset`` and ``nft -a monitor`` print (captured from
iptables-nft and kube-proxy-style nftables rules on this machine's kernel), it must resolve
what a VIP:port DNATs to after each change.
"""

from __future__ import annotations

from benchmarks._lab.kernel_watch import NftMirror

DUMP = """table ip nat { # handle 2
\tchain KUBE-SERVICES { # handle 1
\t\tmeta l4proto tcp ip daddr 10.96.0.5  tcp dport 80 counter packets 0 bytes 0 jump KUBE-SVC-A # handle 4
\t}

\tchain KUBE-SVC-A { # handle 2
\t\tmeta random & 2147483647 < 1073741824 counter packets 0 bytes 0 jump KUBE-SEP-X # handle 5
\t\tcounter packets 0 bytes 0 jump KUBE-SEP-Y # handle 9
\t}

\tchain KUBE-SEP-X { # handle 3
\t\tmeta l4proto tcp   counter packets 0 bytes 0 dnat to 10.244.1.5:8080 # handle 6
\t}

\tchain KUBE-SEP-Y { # handle 7
\t\tmeta l4proto tcp   counter packets 0 bytes 0 dnat to 10.244.1.6:8080 # handle 8
\t}
}
table ip kube-proxy { # handle 3
\tmap service-ips { # handle 4
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\telements = { 10.96.0.7 . tcp . 80 : goto service-A-ns/s/tcp/p,
\t\t\t     10.96.0.8 . tcp . 80 : goto service-B-ns/t/tcp/p }
\t}

\tchain service-A-ns/s/tcp/p { # handle 1
\t\t@VMAP@ # handle 10
\t}

\tchain endpoint-1-ns/s/tcp/p__10.244.1.5/8080 { # handle 2
\t\tmeta l4proto tcp dnat to 10.244.1.5:8080 # handle 7
\t}

\tchain endpoint-1-ns/s/tcp/p__10.244.1.6/8080 { # handle 3
\t\tmeta l4proto tcp dnat to 10.244.1.6:8080 # handle 8
\t}
}
"""
VMAP = ("numgen random mod 2 vmap { 0 : goto endpoint-1-ns/s/tcp/p__10.244.1.5/8080, "
        "1 : goto endpoint-1-ns/s/tcp/p__10.244.1.6/8080 }")


def mirror() -> NftMirror:
    m = NftMirror()
    m.load_dump(DUMP.replace("@VMAP@", VMAP))
    return m


def test_dump_resolves_iptables_chains_and_nft_verdict_maps() -> None:
    m = mirror()
    assert m.resolve("10.96.0.5:80").targets == ("10.244.1.5:8080", "10.244.1.6:8080")
    assert m.resolve("10.96.0.7:80").targets == ("10.244.1.5:8080", "10.244.1.6:8080")
    assert m.resolve("10.96.0.8:80").targets == ()  # its chain is missing: nothing reachable
    assert m.resolve("10.96.0.9:80").targets == ()
    assert m.histogram() == {2: 2, 0: 1}


def test_monitor_events_change_the_answer_only_at_generation_lines() -> None:
    m = mirror()
    assert not m.apply("delete rule ip nat KUBE-SVC-A handle 5")
    assert not m.apply("delete chain ip nat KUBE-SEP-X")
    assert not m.apply("create chain ip nat KUBE-SEP-Z # handle 11")
    assert not m.apply("add rule ip nat KUBE-SEP-Z meta l4proto tcp dnat to 10.244.2.1:8080 # handle 12")
    assert not m.apply("add rule ip nat KUBE-SVC-A counter packets 0 bytes 0 jump KUBE-SEP-Z # handle 13")
    assert m.apply("# new generation 8 by process 22535 (iptables-restor)")
    assert m.resolve("10.96.0.5:80").targets == ("10.244.1.6:8080", "10.244.2.1:8080")


def test_map_elements_and_affinity() -> None:
    m = mirror()
    m.apply("delete element ip kube-proxy service-ips { 10.96.0.7 . tcp . 80 : goto service-A-ns/s/tcp/p }")
    assert m.resolve("10.96.0.7:80").targets == ()
    m.apply("add element ip kube-proxy service-ips { 10.96.0.9 . tcp . 80 : goto service-A-ns/s/tcp/p }")
    assert m.resolve("10.96.0.9:80").targets == ("10.244.1.5:8080", "10.244.1.6:8080")
    assert not m.resolve("10.96.0.5:80").affinity
    m.apply('add rule ip nat KUBE-SVC-A xt match "recent" counter jump KUBE-SEP-X # handle 20')
    assert m.resolve("10.96.0.5:80").affinity


def test_flush_and_table_deletion_forget_rules() -> None:
    m = mirror()
    m.apply("flush chain ip nat KUBE-SVC-A")
    assert m.resolve("10.96.0.5:80").targets == ()
    m.apply("delete table ip kube-proxy")
    assert m.resolve("10.96.0.7:80").targets == ()


def test_kube_proxy_numgen_dnat_map_without_endpoint_chains() -> None:
    m = mirror()
    m.apply("add chain ip kube-proxy service-C-ns/u/tcp/http # handle 60")
    m.apply("add rule ip kube-proxy service-C-ns/u/tcp/http meta l4proto tcp dnat ip to numgen random mod 2 "
            "map { 0 : 10.244.16.1 . 8080, 1 : 10.244.16.2 . 8080 } # handle 61")
    m.apply("add element ip kube-proxy service-ips { 10.96.16.1 . tcp . 80 : goto service-C-ns/u/tcp/http }")
    assert m.resolve("10.96.16.1:80").targets == ("10.244.16.1:8080", "10.244.16.2:8080")


def test_answers_for_many_keys_match_one_by_one_resolution() -> None:
    m = mirror()
    keys = ["10.96.0.5:80", "10.96.0.7:80", "10.96.0.8:80", "10.96.9.9:80"]
    assert m.answers(keys) == {k: m.resolve(k) for k in keys}
    assert m.answers(["10.96.0.7:80"])["10.96.0.7:80"].targets == ("10.244.1.5:8080", "10.244.1.6:8080")


SVCPROXY_DUMP = """table ip nat { # handle 2
\tchain PREROUTING { # handle 1
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tcounter packets 0 bytes 0 jump SVCPROXY-SERVICES # handle 5
\t\tcounter packets 0 bytes 0 jump KUBE-SERVICES # handle 6
\t}

\tchain SVCPROXY-SERVICES { # handle 2
\t\tip daddr 10.96.0.9 tcp dport 80 counter packets 0 bytes 0 jump SVCPROXY-SVC-B # handle 7
\t}

\tchain SVCPROXY-SVC-B { # handle 3
\t\tcounter packets 0 bytes 0 dnat to 10.244.2.1:8080 # handle 8
\t}

\tchain KUBE-SERVICES { # handle 4
\t}
}
"""


def test_owned_lists_svcproxy_chains_and_the_sweep_removes_jumps_first() -> None:
    m = NftMirror()
    m.load_dump(SVCPROXY_DUMP)
    assert m.owned() == [("ip nat", "SVCPROXY-SERVICES"), ("ip nat", "SVCPROXY-SVC-B")]
    script = m.sweep_script().splitlines()
    assert script[0] == "delete rule ip nat PREROUTING handle 5"
    assert "delete rule ip nat PREROUTING handle 6" not in script  # kube-proxy's jump stays
    assert script.index("flush chain ip nat SVCPROXY-SERVICES") < script.index(
        "delete chain ip nat SVCPROXY-SERVICES")
    # Applying what the kernel would print for that script leaves nothing owned.
    for line in ["delete rule ip nat PREROUTING handle 5", "flush chain ip nat SVCPROXY-SERVICES",
                 "flush chain ip nat SVCPROXY-SVC-B", "delete chain ip nat SVCPROXY-SERVICES",
                 "delete chain ip nat SVCPROXY-SVC-B"]:
        m.apply(line)
    assert m.owned() == []
    assert m.sweep_script() == ""


class _NoNft:
    how = "none"

    def run(self, script: str) -> str | None:
        raise AssertionError(f"the test wrote to the kernel: {script}")


def test_reader_stamps_probes_and_resolves_only_on_real_commits() -> None:
    from types import SimpleNamespace

    from benchmarks._lab import kernel_watch

    reader = kernel_watch.Reader()
    reader.nft = _NoNft()  # type: ignore[assignment]
    reader.mirror = mirror()
    out: list[dict[str, object]] = []
    reader.emit = out.append  # type: ignore[method-assign]
    reader.watched = {"10.96.0.5:80": reader.mirror.resolve("10.96.0.5:80")}
    lines = [
        'add rule ip bench_probe probe counter packets 0 bytes 0 comment "probe-1" # handle 3',
        "# new generation 5 by process 7 (nft)",
        "add rule ip nat KUBE-SVC-A counter packets 0 bytes 0 jump KUBE-SEP-Z # handle 30",
        "add chain ip nat KUBE-SEP-Z",
        "add rule ip nat KUBE-SEP-Z meta l4proto tcp dnat to 10.244.1.9:8080 # handle 31",
        "# new generation 6 by process 8 (iptables-nft-restore)",
    ]
    reader.follow(SimpleNamespace(stdout=iter(line + "\n" for line in lines)))  # type: ignore[arg-type]
    states = [e for e in out if e["ev"] == "state"]
    assert len(states) == 1  # the probe-only commit resolved nothing
    assert "10.244.1.9:8080" in states[0]["targets"]  # type: ignore[operator]
    assert not [e for e in out if e["ev"] == "probe"]  # written / acked not known yet
    reader._probe_part(1, "written", 1.0)
    reader._probe_part(1, "acked", 1.001)
    probes = [e for e in out if e["ev"] == "probe"]
    assert len(probes) == 1 and probes[0]["id"] == 1 and probes[0]["written"] == 1.0
    assert isinstance(probes[0]["seen"], float)
