"""What the agent keeps per Service: one copy of each real server, no per-object dicts.

At 10k Services x 10 endpoints the agent holds 100k real servers; these check
the structure choices that keep that to one copy (see benchmarks/agent_memory.py
for the RSS figures): the ipvs proxier's mirror shares the desired objects
after a full sync that read the kernel back (instead of keeping the kernel's
copies), and table values are slotted.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from svcproxy.dataplane.ipvs.kernel import AbsentIpvs, FakeAddresses, FakeIpvs
from svcproxy.dataplane.ipvs.proxier import IpvsProxier
from svcproxy.dataplane.table import NO_FLAGS, RealServer, VirtualServer, make_table


def service(n: int, reals: int = 3) -> VirtualServer:
    return VirtualServer.create("TCP", f"10.96.0.{n + 1}", 80,
                                [RealServer(f"10.244.1.{i + 2}", 8080) for i in range(reals)],
                                owner=f"ns/svc{n}")


def test_ipvs_mirror_shares_the_desired_objects_after_a_full_sync_reads_the_kernel() -> None:
    kernel, addrs = FakeIpvs(schedulers=frozenset({"rr"})), FakeAddresses()
    proxier = IpvsProxier(kernel, addrs, interface="svcproxy0")
    desired = make_table(service(i) for i in range(4))
    assert asyncio.run(proxier.sync(desired)).ok
    # Drift on one service: the kernel lost a real server; a full sync repairs it.
    drifted = next(iter(desired))
    kernel.table[drifted] = kernel.table[drifted].with_reals(kernel.table[drifted].real_servers[1:])
    again = asyncio.run(proxier.sync(desired))
    assert again.ok and again.total_operations == 1
    # The kernel's read-back copies are equal but not kept: the mirror holds the desired objects.
    assert all(kernel.table[k] is not desired[k] for k in desired)
    assert all(proxier._mirror[k] is desired[k] for k in desired)
    assert proxier.counts().real_servers == 12
    # A partial sync after that still diffs against the right state.
    changed = service(0, reals=2)
    assert asyncio.run(proxier.sync({**desired, changed.key: changed}, only=frozenset({"ns/svc0"}))).ok
    assert len(kernel.table[changed.key].real_servers) == 2


def test_table_values_are_slotted_and_share_the_empty_flag_set() -> None:
    vs = service(0)
    assert not hasattr(vs, "__dict__") and not hasattr(vs.real_servers[0], "__dict__")
    assert vs.flags is NO_FLAGS and VirtualServer("TCP", "10.96.0.9", 80).flags is NO_FLAGS
    assert VirtualServer.create("TCP", "10.96.0.9", 80, flags=["sh-port"]).flags == {"sh-port"}


def test_a_kernel_without_ipvs_is_known_without_the_netlink_library(tmp_path: Path) -> None:
    from svcproxy.dataplane.ipvs.probe import ipvs_missing

    loads: list[str] = []
    reason = ipvs_missing(tmp_path, lambda: loads.append("modprobe"))
    assert loads == ["modprobe"] and "CONFIG_IP_VS" in reason and "fall back to iptables" in reason

    def load() -> None:  # the module loads: its /proc entry appears
        (tmp_path / "ip_vs").write_text("")

    assert ipvs_missing(tmp_path, load) == ""
    assert ipvs_missing(tmp_path / "absent", lambda: None) == ""  # cannot tell: netlink decides
    proxier = IpvsProxier(AbsentIpvs(reason), FakeAddresses())
    assert not proxier.capabilities().available and proxier.capabilities().reason == reason


def test_the_agent_on_a_node_without_ipvs_does_not_import_pyroute2() -> None:
    if Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has IPVS")
    code = ("import sys; from svcproxy.dataplane.modes import build_proxier;"
            " p = build_proxier('ipvs'); assert not p.capabilities().available;"
            " print(sorted(m for m in sys.modules if m.startswith('pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
