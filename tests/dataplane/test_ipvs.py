"""ipvs mode in a user-mode-linux guest: real IPVS, real traffic, read back with ipvsadm.

One guest per module runs tests/dataplane/ipvs_guest.py (all cases in one
Python process: imports are slow in a guest); each test asserts on part of
what it observed. The same cases run against the in-memory fake in
tests/unit/test_dataplane_ipvs.py (conformance).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.uml
SCRIPT = Path(__file__).with_name("ipvs_guest.py")


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    try:
        from svcproxy_lab.uml import UmlError, booted_guest, kernel_dir
    except ImportError as err:  # pragma: no cover - the lab package is another engineer's
        pytest.skip(f"svcproxy_lab.uml is not importable: {err}")
    try:
        kernel_dir()
    except UmlError as err:
        pytest.skip(f"no user-mode-linux kernel: {err}")
    state = tmp_path_factory.mktemp("uml")
    with booted_guest("dp-ipvs", state, mem="512M") as guest:
        proc = guest.run([sys.executable, str(SCRIPT)], timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    data: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return data


def services(ipvsadm: str) -> dict[str, list[tuple[str, int]]]:
    """ipvsadm -Ln text -> {"TCP 10.96.7.10:80 rr": [(real, weight), ...]}; the real
    servers of ours (VIPs in 10.96.0.0/16) must be NAT (Masq)."""
    out: dict[str, list[tuple[str, int]]] = {}
    for current, reals in _parse(ipvsadm).items():
        for real, method, _weight in reals:
            if current.split()[1].startswith("10.96."):
                assert method == "Masq", f"not NAT forwarding: {current} -> {real} {method}"
        out[current] = [(real, weight) for real, _, weight in reals]
    return out


def methods(ipvsadm: str) -> dict[str, dict[str, str]]:
    """ipvsadm -Ln text -> {"TCP 10.96.7.10:80 rr": {real: forwarding method}}."""
    return {svc: {real: method for real, method, _ in reals} for svc, reals in _parse(ipvsadm).items()}


def _parse(ipvsadm: str) -> dict[str, list[tuple[str, str, int]]]:
    out: dict[str, list[tuple[str, str, int]]] = {}
    current = ""
    for line in ipvsadm.splitlines():
        if re.match(r"^(TCP|UDP|SCTP)\s", line):
            current = " ".join(line.split())
            out[current] = []
        elif line.strip().startswith("->") and current:
            parts = line.split()
            out[current].append((parts[1], parts[2], int(parts[3])))
    return out


def test_cold_sync_programs_every_service_as_asked(observed: dict[str, Any]) -> None:
    assert observed["capabilities"]["available"]
    assert {"rr", "wrr", "sh", "mh"} <= set(observed["capabilities"]["schedulers"])
    assert observed["results"]["cold"]["errors"] == []
    table = services(observed["ipvsadm_cold"])
    assert "UDP 10.96.7.13:53 rr persistent 3" in table
    assert table["TCP 10.96.7.14:80 wrr"] == [
        ("10.244.9.2:8080", 3), ("10.244.9.3:8080", 1), ("10.244.9.4:8080", 0)
    ]


def test_hash_schedulers_hold_real_servers_in_canonical_kernel_order(
    observed: dict[str, Any],
) -> None:
    unsorted = services(observed["ipvsadm_cold_nosort"])
    for line in ("TCP 10.96.7.11:80 sh", "TCP 10.96.7.12:80 mh"):
        assert [r for r, _ in unsorted[line]] == [
            "10.244.9.2:8080", "10.244.9.3:8080", "10.244.9.4:8080"
        ]


def test_rr_alternates(observed: dict[str, Any]) -> None:
    rr = observed["rr"]
    assert rr[:3] == rr[3:] and sorted(rr[:3]) == ["be0", "be1", "be2"], rr


def test_sh_and_mh_pin_a_client(observed: dict[str, Any]) -> None:
    for name in ("sh", "mh"):
        assert len(set(observed[name])) == 1 and observed[name][0] != "-", observed[name]


def test_persistence_pins_until_timeout(observed: dict[str, Any]) -> None:
    persist = observed["persist"]
    assert len(set(persist)) == 1 and persist[0] != "-", persist
    assert observed["persist_expired"]
    assert observed["persist_after"] not in ("-", observed["persist_first"])


def test_wrr_follows_weights_and_weight_zero_takes_nothing(observed: dict[str, Any]) -> None:
    assert Counter(observed["wrr"]) == {"be0": 6, "be1": 2}, observed["wrr"]


def test_draining_real_server_takes_no_new_connections(observed: dict[str, Any]) -> None:
    assert observed["results"]["drain"] == {"ops": {"update_real_server": 1}, "errors": []}
    assert sorted(observed["drained"]) == ["be1"] * 3 + ["be2"] * 3, observed["drained"]
    table = services(observed["ipvsadm_drained"])
    assert ("10.244.9.2:8080", 0) in table["TCP 10.96.7.10:80 rr"]


def test_restarted_proxier_adopts_without_operations(observed: dict[str, Any]) -> None:
    assert observed["results"]["restart"]["ops"] == {}
    assert services(observed["ipvsadm_after_restart"]) == services(observed["ipvsadm_drained"])


def test_removed_service_and_its_vip_go(observed: dict[str, Any]) -> None:
    assert "10.96.7.12" not in observed["ipvsadm_removed"]
    assert "10.96.7.12/32" not in observed["vips_removed"]
    assert "10.96.7.10/32" in observed["vips_removed"]


def test_foreign_service_survives_every_sync_and_cleanup(observed: dict[str, Any]) -> None:
    for step in ("ipvsadm_cold", "ipvsadm_drained", "ipvsadm_removed", "ipvsadm_cleanup"):
        assert services(observed[step])["TCP 192.0.2.1:80 rr"] == [("192.0.2.9:80", 1)], step
    assert list(services(observed["ipvsadm_cleanup"])) == ["TCP 192.0.2.1:80 rr"]
    assert observed["svcproxy0_after_cleanup"] != 0  # the interface is gone


def test_conformance_cases_pass_on_the_real_kernel(observed: dict[str, Any]) -> None:
    """The cases of ipvs_cases.py (also run on the fake by tests/unit)."""
    from ipvs_cases import CASES

    assert set(observed["conformance"]) == set(CASES)
    failed = {k: v for k, v in observed["conformance"].items() if v != "ok"}
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())


def test_service_without_ready_endpoints_refuses_connections(observed: dict[str, Any]) -> None:
    assert observed["results"]["no_endpoints"]["errors"] == []
    assert observed["no_endpoints"] == ["ECONNREFUSED", "ECONNREFUSED"]
    assert observed["results"]["no_endpoints_gone"]["errors"] == []


def test_hand_decoded_dump_equals_pyroute2s_on_the_real_kernel(observed: dict[str, Any]) -> None:
    assert observed["dump_services"] >= 6  # ours (rr, sh, mh, wrr, UDP persistent) + foreign
    assert observed["dump_equal"]  # real servers from /proc/net/ip_vs
    assert observed["dump_proc_equal"]  # real servers from netlink


def test_steady_full_sync_changes_nothing_in_the_kernel(observed: dict[str, Any]) -> None:
    assert observed["results"]["full_steady"] == {"ops": {}, "errors": []}
    assert observed["full_steady_unchanged"]


def test_change_made_during_a_full_sync_survives_its_write(observed: dict[str, Any]) -> None:
    assert observed["results"]["full_partial"]["errors"] == []
    assert observed["results"]["full_with_change"] == {"ops": {}, "errors": []}
    table = services(observed["ipvsadm_full_with_change"])
    assert table["TCP 10.96.7.14:80 wrr"] == [
        ("10.244.9.2:8080", 1), ("10.244.9.3:8080", 1), ("10.244.9.4:8080", 1)
    ]


def test_a_real_server_switched_to_direct_routing_is_edited_back_to_nat(observed: dict[str, Any]) -> None:
    """``ipvsadm -e -t VIP:8080 -r POD:8080 -g`` on one of ours: the next full sync edits
    it back to Masq (traffic flows again); a foreign service with -g is left alone."""
    line, be0 = "TCP 10.96.7.17:8080 rr", "10.244.9.2:8080"
    assert observed["results"]["drift_add"]["errors"] == []
    assert methods(observed["ipvsadm_drifted"])[line][be0] == "Route"  # the drift was made
    assert observed["results"]["drift_partial"] == {"ops": {}, "errors": []}  # trusts its mirror
    assert observed["results"]["drift_full"]["errors"] == []
    repaired = observed["ipvsadm_repaired"]
    assert methods(repaired)[line] == {f"10.244.9.{i}:8080": "Masq" for i in (2, 3, 4)}
    assert services(repaired)[line] == [(f"10.244.9.{i}:8080", 1) for i in (2, 3, 4)]
    assert methods(repaired)["TCP 192.0.2.2:8080 rr"] == {"192.0.2.9:8080": "Route"}
    assert sorted(observed["drift_traffic"]) == ["be0", "be1", "be2"], observed["drift_traffic"]
    assert observed["results"]["drift_steady"] == {"ops": {}, "errors": []}


def test_service_settings_changed_by_hand_are_repaired_by_a_full_sync(observed: dict[str, Any]) -> None:
    """One-packet scheduling, a /24 persistence netmask and the SIP engine (-o -M --pe) on
    the persistent UDP service, sh-port (-b) on the sh one: one update each puts back
    what svcproxy asked."""
    cold, drifted = set(services(observed["ipvsadm_cold"])), set(methods(observed["ipvsadm_drifted"]))
    repaired = set(services(observed["ipvsadm_repaired"]))
    udp = next(line for line in drifted if line.startswith("UDP 10.96.7.13:53 "))
    assert {"mask", "255.255.255.0", "ops", "pe", "sip"} <= set(udp.split()), udp  # the drift was made
    assert "TCP 10.96.7.11:80 sh (sh-port)" in drifted, drifted
    for line in ("UDP 10.96.7.13:53 rr persistent 3", "TCP 10.96.7.11:80 sh"):
        assert line in cold and line not in drifted and line in repaired, (line, repaired)
    assert observed["results"]["drift_full"]["ops"] == {
        "update_real_server": 1, "update_virtual_server": 2
    }


def test_udp_flow_moves_off_a_removed_real_server_within_a_second(observed: dict[str, Any]) -> None:
    flow = observed["udp_flow"]
    assert len(set(flow["first"])) == 1 and flow["pinned"].startswith("be"), flow
    assert len(flow["late"]) >= 20, flow
    assert set(flow["late"]) <= {"be0", "be1", "be2"} - {flow["pinned"]}, flow
