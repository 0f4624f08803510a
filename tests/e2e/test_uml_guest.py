"""A user-mode-linux guest (svcproxy_lab.uml) on its own, without the lab.

Boots one guest and checks what the rest of the project relies on: the command
channel (exit status, output, stdin, concurrency, long-lived processes), the
IPVS modules of the UML kernel, and real traffic through an IPVS virtual
service (NAT) programmed with pyroute2 inside the guest, from a client
namespace to echo servers in two real-server namespaces, read back with
ipvsadm. All traffic stays inside the guest's own namespaces.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from svcproxy_lab.uml import (
    UmlGuest,
    booted_guest,
    kernel_dir,
    kernel_paths,
    kernel_schedulers,
    probed_schedulers,
    scheduler_probe,
    umid_pids,
)

pytestmark = [
    pytest.mark.uml,
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="user-mode-linux guests with taps need root"),
]

PY = sys.executable
SCHEDULERS = {"rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "mh", "fo", "ovf"}
VIP = "10.250.100.1"

# Two real servers and a client, each a namespace wired to the guest's root
# namespace by a veth; the guest routes between them. No default routes.
TOPOLOGY = r"""
set -e
sysctl -q -w net.ipv4.ip_forward=1
ip link add svcproxy0 type dummy
ip addr add {vip}/32 dev svcproxy0
ip link set svcproxy0 up
for n in 1 2 3; do
  ns=ns$n
  ip netns add $ns
  ip link add h$n type veth peer name eth0 netns $ns
  ip addr add 10.250.$n.1/24 dev h$n
  ip link set h$n up
  ip -n $ns link set lo up
  ip -n $ns addr add 10.250.$n.2/24 dev eth0
  ip -n $ns link set eth0 up
  ip -n $ns route add 10.250.0.0/16 via 10.250.$n.1
done
"""

ECHO = r"""
import socket, sys
name = sys.argv[1]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(64)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{name} {peer[0]}\n".encode())
    c.close()
"""

PROGRAM = r"""
import socket
from pyroute2 import IPVS, IPVSDest, IPVSService
ipvs = IPVS()
svc = IPVSService(addr="{vip}", port=80, protocol=socket.IPPROTO_TCP,
                  sched_name="rr", flags={{"flags": 0, "mask": 0xFFFF}}, timeout=0,
                  netmask="255.255.255.255")
ipvs.service("add", service=svc)
for rs in ("10.250.1.2", "10.250.2.2"):
    # fwd_method 0 = NAT (masquerade); pyroute2's default 3 is direct routing.
    ipvs.dest("add", service=svc, dest=IPVSDest(addr=rs, port=8080, fwd_method=0, weight=1))
ipvs.close()
"""

CLIENT = r"""
import socket
for _ in range(6):
    c = socket.create_connection(("{vip}", 80), timeout=5)
    print(c.recv(100).decode().strip(), flush=True)
    c.close()
"""


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UmlGuest]:
    with booted_guest("solo", tmp_path_factory.mktemp("uml")) as g:
        yield g


def run_ok(guest: UmlGuest, argv: list[str], **kwargs: object) -> str:
    proc = guest.run(argv, **kwargs)  # type: ignore[arg-type]
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}: {proc.stderr.decode()}"
    return proc.stdout.decode()


def test_command_channel_returns_status_output_and_stdin(guest: UmlGuest) -> None:
    proc = guest.run(["sh", "-c", "cat; echo to-err >&2; exit 7"], input=b"from-host")
    assert (proc.returncode, proc.stdout, proc.stderr) == (7, b"from-host", b"to-err\n")
    assert guest.run(["/no/such/program"]).returncode == 127
    with pytest.raises(subprocess.TimeoutExpired):
        guest.run(["sleep", "30"], timeout=1)


def test_command_channel_runs_calls_concurrently(guest: UmlGuest) -> None:
    # Eight sleepers that each wait for a file the ninth call creates: they can
    # only all finish if the guest runs them at the same time.
    flag = "/tmp/concurrency-flag"
    waiter = ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; echo done"]
    with ThreadPoolExecutor(9) as pool:
        waiting = [pool.submit(guest.run, waiter, timeout=60) for _ in range(8)]
        assert guest.run(["touch", flag]).returncode == 0
        assert [f.result().stdout for f in waiting] == [b"done\n"] * 8


def test_guest_root_is_read_only_with_kernel_mounts_and_no_default_route(guest: UmlGuest) -> None:
    mounts = run_ok(guest, ["cat", "/proc/mounts"])
    for fstype, target in [("hostfs", "/"), ("proc", "/proc"), ("tmpfs", "/run"),
                           ("tmpfs", "/tmp"), ("cgroup2", "/sys/fs/cgroup"),
                           ("hostfs", "/usr/lib/modules"), ("hostfs", str(guest.dir))]:
        assert re.search(rf"^\S+ {re.escape(target)} {fstype} ", mounts, re.M), (target, mounts)
    assert re.search(r"^/dev/root / hostfs ro,", mounts, re.M)
    assert run_ok(guest, ["ip", "route", "show", "default"]) == ""
    assert guest.run(["touch", "/usr/svcproxy-must-not-exist"]).returncode != 0


def test_long_lived_process_logs_to_state_dir_and_stops(guest: UmlGuest) -> None:
    guest.start_process("ticker", ["sh", "-c", "echo started; exec sleep 1000"])
    log = guest.process_log("ticker")
    assert guest.run(["sh", "-c", f"while ! grep -q started {log}; do sleep 0.05; done"],
                     timeout=30).returncode == 0
    assert guest.process_exit_status("ticker") is None
    guest.stop_process("ticker")
    assert guest.process_exit_status("ticker") == -15  # SIGTERM
    assert "sleep 1000" not in run_ok(guest, ["ps", "-eo", "args"])


def test_every_ipvs_scheduler_module_loads_and_schedules(guest: UmlGuest) -> None:
    _, modules = kernel_paths(kernel_dir())
    present = kernel_schedulers(modules)
    assert present >= SCHEDULERS, f"the UML kernel lacks {SCHEDULERS - present}"
    table = run_ok(guest, ["sh", "-c", scheduler_probe(sorted(present))])
    assert probed_schedulers(table) == present, table


def test_ipvs_nat_service_carries_traffic_between_guest_namespaces(guest: UmlGuest) -> None:
    run_ok(guest, ["modprobe", "ip_vs"])
    run_ok(guest, ["sh", "-c", TOPOLOGY.format(vip=VIP)])
    try:
        for n in (1, 2):
            guest.start_process(f"echo{n}", ["ip", "netns", "exec", f"ns{n}", PY, "-c", ECHO,
                                             f"rs{n}"])
        for n in (1, 2):
            log = guest.process_log(f"echo{n}")
            run_ok(guest, ["sh", "-c", f"while ! grep -q listening {log}; do sleep 0.05; done"],
                   timeout=60)
        run_ok(guest, [PY, "-c", PROGRAM.format(vip=VIP)], timeout=120)
        answers = run_ok(guest, ["ip", "netns", "exec", "ns3", PY, "-c", CLIENT.format(vip=VIP)],
                         timeout=120).splitlines()
        # rr alternates; each real server saw the client's own address (NAT, not SNAT).
        assert sorted(answers) == sorted(["rs1 10.250.3.2", "rs2 10.250.3.2"] * 3), answers
        table = run_ok(guest, ["ipvsadm", "-Ln"])
        assert re.search(rf"TCP\s+{VIP}:80 rr", table), table
        for rs in ("10.250.1.2", "10.250.2.2"):
            assert re.search(rf"-> {re.escape(rs)}:8080\s+Masq\s+1\s+", table), table
        # The connection table shows the six connections (stats counters are
        # only folded in by the kernel's 2 s estimator, so they are not read).
        conns = run_ok(guest, ["ipvsadm", "-Lnc"])
        seen = re.findall(rf"TCP\s+\S+\s+\S+\s+10\.250\.3\.2:\d+\s+{VIP}:80\s+"
                          rf"(10\.250\.[12]\.2):8080", conns)
        assert sorted(seen) == ["10.250.1.2"] * 3 + ["10.250.2.2"] * 3, conns
    finally:
        for n in (1, 2):
            guest.stop_process(f"echo{n}")
        guest.run(["ipvsadm", "-C"])


def test_destroy_leaves_no_process_tap_or_run_dir(tmp_path: Path) -> None:
    guest = UmlGuest("gone", tmp_path, tap="svcp-utest0", bridge=None)
    subprocess.run(["ip", "tuntap", "add", "dev", "svcp-utest0", "mode", "tap"], check=True)
    try:
        guest.boot(60)
        assert umid_pids(guest.umid)
        assert "eth0" in guest.run(["ip", "-br", "link"]).stdout.decode()
        # A crash: the host kills the kernel's main process without a poweroff.
        pid = int(guest.pid_file.read_text())
        os.kill(pid, 9)
    finally:
        guest.destroy()
        subprocess.run(["ip", "link", "del", "svcp-utest0"], check=False)
    guest.destroy()  # twice is fine
    assert umid_pids(guest.umid) == []
    assert not guest.is_running()
    assert not Path("/run/svcproxy-uml", guest.umid).exists()


def test_destroy_removes_the_tap_it_made(tmp_path: Path) -> None:
    subprocess.run(["ip", "link", "add", "svcp-utbr", "type", "bridge"], check=True)
    try:
        guest = UmlGuest("tapped", tmp_path, tap="svcp-utest1", bridge="svcp-utbr",
                         address="10.252.0.2/24")
        guest.boot(60)
        addrs = guest.run(["ip", "-br", "addr", "show", "dev", "eth0"]).stdout.decode()
        assert "10.252.0.2/24" in addrs
        master = subprocess.run(["ip", "-br", "link", "show", "master", "svcp-utbr"],
                                capture_output=True, text=True, check=True).stdout
        assert "svcp-utest1" in master
        guest.shutdown()
        assert umid_pids(guest.umid) == []
        assert subprocess.run(["ip", "link", "show", "dev", "svcp-utest1"],
                              capture_output=True, check=False).returncode != 0
    finally:
        subprocess.run(["ip", "link", "del", "svcp-utest1"], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", "svcp-utbr"], check=False)
