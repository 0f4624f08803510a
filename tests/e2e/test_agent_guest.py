"""The agent core with the real proxiers inside a user-mode-linux guest (real IPVS).

One guest per module runs tests/e2e/test_agent_guest_run.py (all steps in
one Python process: imports are slow in a guest) and the tests assert on its
JSON: traffic answers from a client netns and the kernel read back with
``ipvsadm -Sn`` and ``iptables-save``. No lab is needed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.uml, pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (UML guest, namespaces)")]
SCRIPT = Path(__file__).with_name("test_agent_guest_run.py")
VIP_RR, VIP_IPT, VIP_US, VIP_FB = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    try:
        from svcproxy_lab.uml import UmlError, booted_guest, kernel_dir
        kernel_dir()
    except (ImportError, UmlError) as err:
        pytest.skip(f"no user-mode-linux kernel: {err}")
    with booted_guest("agent-core", tmp_path_factory.mktemp("uml"), mem="512M") as guest:
        proc = guest.run([sys.executable, str(SCRIPT)], timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def test_first_full_sync_programs_every_mode_and_traffic_flows(run: dict[str, Any]) -> None:
    assert run["caps"] == {"ipvs": True, "iptables": True, "userspace": True}
    assert run["first"]["full"] and run["first"]["errors"] == []
    for vip in (VIP_RR, VIP_US):  # ipvs rr and userspace rr: exactly alternating
        assert sorted(run["answers"][vip]) == ["be0", "be0", "be1", "be1"], (vip, run["answers"])
    # iptables mode picks at random: 16 connections reach both (all on one: p = 2^-15).
    assert set(run["answers"][VIP_IPT]) == {"be0", "be1"}
    rr = run["answers"][VIP_RR]
    assert rr[0] != rr[1] and rr[1] != rr[2]  # IPVS rr alternates
    ipvs = run["kernel_first"]["ipvs"]
    assert re.search(rf"-A -t {VIP_RR}:8080 -s rr", ipvs), ipvs
    assert "-A -t 192.0.2.1:80 -s rr" in ipvs  # the foreign service survived
    assert VIP_IPT in run["kernel_first"]["nat"] and VIP_US in run["kernel_first"]["nat"]


def test_live_mode_change_ipvs_to_iptables_loses_no_request(run: dict[str, Any]) -> None:
    assert not run["change"]["full"] and run["change"]["errors"] == []
    assert run["change_failures"] == 0
    assert f"{VIP_RR}:8080" not in run["kernel_changed"]["ipvs"]
    assert VIP_RR in run["kernel_changed"]["nat"]
    assert set(run["answers_changed"]) == {"be0", "be1"}
    assert run["status"]["applied"] == {"guest/rr": "rr-iptables", "guest/ipt": "ipt-iptables",
                                        "guest/us": "us-userspace"}


def test_restarted_agent_adopts_the_kernel_without_operations(run: dict[str, Any]) -> None:
    assert run["restart"]["full"] and run["restart"]["errors"] == []
    # IPVS state is adopted as it is (no operation). The netfilter modes may rewrite their
    # chains atomically (iptables-restore), and userspace opens new listeners since its
    # proxy died with the old process; the rules read back are the same either way.
    assert "ipvs" not in run["restart"]["by_mode"], run["restart"]
    assert run["kernel_restart"]["ipvs"] == run["kernel_changed"]["ipvs"]

    def not_userspace(nat: str) -> list[str]:  # userspace redirects go to the new listeners
        return [line for line in nat.splitlines() if "PORTALS" not in line]

    assert not_userspace(run["kernel_restart"]["nat"]) == not_userspace(run["kernel_changed"]["nat"])


def test_ipvs_turned_off_serves_ipvs_programs_in_iptables_and_says_so(run: dict[str, Any]) -> None:
    assert run["fallback"]["errors"] == []
    assert set(run["fallback_answers"]) == {"be0", "be1"}
    status = run["fallback_status"]
    assert status["capabilities"]["ipvs"] is False
    assert any(m["requested"] == "ipvs" and m["effective"] == "iptables" for m in status["modes"])
    assert status["applied"]["guest/rr2"] == "rr2-ipvs"


def test_cleanup_removes_everything_owned_and_nothing_else(run: dict[str, Any]) -> None:
    assert run["cleanup"] == [[], [], []]
    assert run["kernel_clean"]["nat"] == ""
    assert run["kernel_clean"]["ipvs"].strip() == "-A -t 192.0.2.1:80 -s rr"
