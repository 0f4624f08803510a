"""Pod networking inside a lab node: one namespace, veth, address and route per Pod.

Called by ``kubelet.py``, which runs in the node's network namespace (a netns
node) or a guest's root namespace (a UML node), so every ``ip`` command here
acts on that node. The node's side of each Pod veth carries the gateway
address ``10.244.i.1/32``; the Pod gets ``10.244.i.x/32`` with routes for the
lab's CIDRs via the gateway and no default route. Addresses come from
:class:`Ipam`, kept in the kubelet's state folder so a restart keeps them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

LAB_ROUTES = ("10.244.0.0/16", "10.96.0.0/16", "172.29.0.0/24")
FIRST_HOST, LAST_HOST = 2, 250  # .1 is the gateway, .251-.254 the client namespace


class PodNetError(RuntimeError):
    """Setting up a Pod's network failed; the message names the command."""


def _ip(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise PodNetError(f"ip {' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


def netns_name(node_index: int, uid: str) -> str:
    return f"svcp-p{node_index}-{uid}"


def veth_name(uid: str) -> str:
    return "pv" + hashlib.sha1(uid.encode()).hexdigest()[:11]  # 13 characters


def gateway(pod_cidr: str) -> str:
    return str(ipaddress.ip_network(pod_cidr)[1])


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


class Ipam:
    """Pod addresses of one node, persisted in ``path`` as ``{"pods": {uid: ip}, "last": n}``.

    Allocation goes round the range after the last address handed out, like
    host-local IPAM, so a deleted Pod's address is not at once reused by the
    next Pod (its conntrack entries and endpoints would be mistaken for it).
    """

    def __init__(self, path: Path, pod_cidr: str) -> None:
        self.path = path
        self.network = ipaddress.ip_network(pod_cidr)

    def _load(self) -> tuple[dict[str, str], int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}, FIRST_HOST - 1
        return dict(data.get("pods", {})), int(data.get("last", FIRST_HOST - 1))

    def _save(self, pods: dict[str, str], last: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pods": pods, "last": last}, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def allocate(self, uid: str) -> str:
        pods, last = self._load()
        if uid in pods:
            return pods[uid]
        used = set(pods.values())
        size = LAST_HOST - FIRST_HOST + 1
        for step in range(1, size + 1):
            host = FIRST_HOST + (last - FIRST_HOST + step) % size
            ip = str(self.network[host])
            if ip not in used:
                pods[uid] = ip
                self._save(pods, host)
                return ip
        raise PodNetError(f"no free Pod address left in {self.network} (.{FIRST_HOST}-.{LAST_HOST})")

    def release(self, uid: str) -> None:
        pods, last = self._load()
        if pods.pop(uid, None) is not None:
            self._save(pods, last)

    def owners(self) -> dict[str, str]:
        return self._load()[0]


def setup(node_index: int, pod_cidr: str, uid: str, ip: str) -> str:
    """Create (or complete) the Pod's namespace and wiring; return the namespace name."""
    ns = netns_name(node_index, uid)
    veth = veth_name(uid)
    gw = gateway(pod_cidr)
    if not netns_exists(ns):
        _ip(["netns", "add", ns])
    if _ip(["-n", ns, "link", "show", "eth0"], check=False).returncode != 0:
        _ip(["link", "del", veth], check=False)
        _ip(["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    if gw not in _ip(["-br", "addr", "show", "dev", veth]).stdout:
        _ip(["addr", "add", f"{gw}/32", "dev", veth])
    _ip(["link", "set", veth, "up"])
    _ip(["route", "replace", f"{ip}/32", "dev", veth, "scope", "link", "src", gw])
    _ip(["-n", ns, "link", "set", "lo", "up"])
    if ip not in _ip(["-n", ns, "-br", "addr", "show", "dev", "eth0"]).stdout:
        _ip(["-n", ns, "addr", "add", f"{ip}/32", "dev", "eth0"])
    _ip(["-n", ns, "link", "set", "eth0", "up"])
    _ip(["-n", ns, "route", "replace", gw, "dev", "eth0", "scope", "link"])
    for cidr in LAB_ROUTES:
        _ip(["-n", ns, "route", "replace", cidr, "via", gw, "dev", "eth0", "src", ip])
    return ns


def teardown(node_index: int, uid: str) -> None:
    """Kill what still runs in the Pod's namespace and delete it (its veth goes with it)."""
    ns = netns_name(node_index, uid)
    if netns_exists(ns):
        pids = _ip(["netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        _ip(["netns", "del", ns], check=False)
    _ip(["link", "del", veth_name(uid)], check=False)


def enter(ns: str) -> list[str]:
    """Prefix that runs a command in the Pod's network namespace."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]
