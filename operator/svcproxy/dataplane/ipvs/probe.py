"""What the ipvs mode learns from the kernel without netlink: modules, /proc and /sys.

Loads IPVS and scheduler modules with ``modprobe``, tells whether this kernel has IPVS
at all from ``/proc/net/ip_vs`` (``host.create`` asks before importing pyroute2, so
nodes without IPVS do not load it), and reads the real servers of ``/proc/net/ip_vs``
for ``netlink.NetlinkIpvs.dump``. A kernel adapter: no pyroute2; the proxier calls
none of this itself.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from svcproxy.dataplane.ipvs import dump as ipvsdump
from svcproxy.dataplane.table import RealServer, VSKey


def load_module(name: str) -> bool:
    """``modprobe name``; whether it succeeded."""
    return subprocess.run(["modprobe", name], capture_output=True, check=False).returncode == 0


def load_ip_vs() -> None:
    load_module("ip_vs")


def ipvs_missing(proc_net: Path = Path("/proc/net"), load: Callable[[], None] = load_ip_vs) -> str:
    """Why this kernel has no IPVS, found without importing pyroute2; '' when it may have.

    The ip_vs module creates ``/proc/net/ip_vs`` in every network namespace. Checking
    that first spares nodes without IPVS the memory of the netlink library.
    """
    if not proc_net.is_dir():
        return ""  # cannot tell: the netlink probe decides
    if not (proc_net / "ip_vs").exists():
        load()
    if (proc_net / "ip_vs").exists():
        return ""
    return ("IPVS is not in this kernel (no /proc/net/ip_vs after `modprobe ip_vs`): the kernel"
            " lacks CONFIG_IP_VS or the module does not load; ipvs Services fall back to iptables")


def loadable_schedulers(names: Iterable[str], sys_module: Path = Path("/sys/module")) -> frozenset[str]:
    """The schedulers whose module is loaded or loads now (``ip_vs_<name>``)."""
    return frozenset(
        name for name in sorted(names)
        if os.path.isdir(sys_module / f"ip_vs_{name}") or load_module(f"ip_vs_{name}")
    )


def proc_real_servers() -> dict[VSKey, list[RealServer]]:
    """The real servers of /proc/net/ip_vs of this thread's network namespace (the
    worker thread's: /proc/net follows the process's main thread); {} without it."""
    try:
        with open("/proc/thread-self/net/ip_vs", "rb", buffering=0) as f:
            chunks = []
            while chunk := f.read(1 << 20):
                chunks.append(chunk)
    except OSError:
        return {}
    return ipvsdump.proc_real_servers(b"".join(chunks).decode())
