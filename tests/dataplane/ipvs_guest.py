"""Runs inside a user-mode-linux guest: programs IPVS with the ipvs proxier, sends traffic, reports.

Started once per test module by tests/dataplane/test_ipvs.py (Python imports
are slow in a guest). Builds the netns topology of svcproxy_lab.topology inside the
guest, enters the node netns, runs every case and prints one JSON object:
who answered each client connection, and ``ipvsadm -Ln`` text read back
independently after each step. The pytest side asserts on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from pyroute2.netns import setns

from svcproxy.dataplane.modes import DataplaneConfig, build_proxier
from svcproxy.dataplane.table import RealServer, VirtualServer, make_table, owned_by
from svcproxy_lab.topology import Topology, in_ns

out: dict[str, Any] = {"errors": []}


def ipvsadm(topo: Topology) -> str:
    return in_ns(topo.node, "ipvsadm", "-Ln").stdout


def record(name: str, result: Any) -> None:
    out.setdefault("results", {})[name] = {
        "ops": dict(result.operations),
        "errors": [f"{type(e).__name__}: {e}" for e in result.errors],
    }


def conformance() -> None:
    """The cases of ipvs_cases.py, each in a fresh netns of the guest, on the real kernel."""
    import traceback

    from ipvs_cases import CASES, Kit

    from svcproxy.dataplane.ipvs.addresses import NetlinkAddresses
    from svcproxy.dataplane.ipvs.netlink import NetlinkIpvs

    results: dict[str, str] = {}
    subprocess.run(["modprobe", "ipv6"], check=False)  # a module in the UML kernel: IPv6 cases
    for i, (name, case) in enumerate(sorted(CASES.items())):
        ns = f"conf{i}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        # IPVS refuses (EINVAL) a real server the netns has no route to: give it one.
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "add", "pods", "type", "dummy")
        in_ns(ns, "ip", "addr", "add", "10.244.0.1/16", "dev", "pods")
        in_ns(ns, "ip", "addr", "add", "fd01::1/64", "dev", "pods", "nodad")
        in_ns(ns, "ip", "link", "set", "pods", "up")
        try:
            setns(ns)
            case(Kit(NetlinkIpvs(), NetlinkAddresses()))
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-1500:]
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    out["conformance"] = results


def main() -> None:
    conformance()
    topo = Topology()
    topo.create(3)
    try:
        run(topo)
    finally:
        topo.destroy()
    print(json.dumps(out))


def run(topo: Topology) -> None:
    be = topo.backends
    # A foreign IPVS service, created before the agent ever runs.
    in_ns(topo.node, "ipvsadm", "-A", "-t", "192.0.2.1:80", "-s", "rr")
    in_ns(topo.node, "ipvsadm", "-a", "-t", "192.0.2.1:80", "-r", "192.0.2.9:80", "-m")
    setns(topo.node)
    proxier = build_proxier("ipvs", DataplaneConfig(cluster_cidrs=("10.244.0.0/16",)))
    out["capabilities"] = {
        "available": proxier.capabilities().available,
        "schedulers": sorted(proxier.capabilities().schedulers),
    }

    def vs(ip: str, sched: str, *, weights: tuple[int, ...] = (1, 1, 1), persistence: int = 0,
           owner: str = "", protocol: str = "TCP", port: int = 80) -> VirtualServer:
        reals = [RealServer(a, 8080, w) for a, w in zip(be, weights, strict=True)]
        return VirtualServer.create(protocol, ip, port, reals, scheduler=sched,  # type: ignore[arg-type]
                                    persistence=persistence, owner=owner or f"ns/{sched}-{ip}")

    services = [
        vs("10.96.7.10", "rr"),
        vs("10.96.7.11", "sh"),
        vs("10.96.7.12", "mh"),
        # UDP: its IPVS connections expire after the (settable) UDP timeout, while a TCP
        # connection lingers 2 minutes in TIME_WAIT and keeps the persistence template.
        vs("10.96.7.13", "rr", persistence=3, protocol="UDP", port=53),
        vs("10.96.7.14", "wrr", weights=(3, 1, 0)),
    ]
    table = make_table(services)
    in_ns(topo.node, "ipvsadm", "--set", "900", "120", "2")
    sync = lambda t, only=None: proxier.sync_blocking(t, only)  # type: ignore[attr-defined]  # noqa: E731
    record("cold", sync(table))
    out["ipvsadm_cold"] = ipvsadm(topo)
    out["ipvsadm_cold_nosort"] = in_ns(topo.node, "ipvsadm", "-Ln", "--nosort", check=False).stdout
    out["rr"] = topo.ask("10.96.7.10", 80, 6)
    out["sh"] = topo.ask("10.96.7.11", 80, 10)
    out["mh"] = topo.ask("10.96.7.12", 80, 10)
    out["persist"] = topo.ask("10.96.7.13", 53, 6, udp=True)
    out["wrr"] = topo.ask("10.96.7.14", 80, 8)
    # Persistence pins until the template times out: 3 s after its last connection is
    # gone. Short IPVS connection timeouts, then poll the connection table (not the
    # service: a connection would renew the template) until the template is gone.
    first = out["persist"][0]
    out["persist_expired"] = poll(
        lambda: "10.96.7.13" not in in_ns(topo.node, "ipvsadm", "-Lnc").stdout, timeout=60
    )
    out["persist_after"] = topo.ask("10.96.7.13", 53, 1, udp=True)[0]
    out["persist_first"] = first
    # Drain be0 of the rr service with a partial sync: no new connections go there.
    drained = vs("10.96.7.10", "rr", weights=(0, 1, 1), owner=services[0].owner)
    table[drained.key] = drained
    record("drain", sync(owned_by(table, {drained.owner}), frozenset({drained.owner})))
    out["drained"] = topo.ask("10.96.7.10", 80, 6)
    out["ipvsadm_drained"] = ipvsadm(topo)
    # Services with no ready endpoint (all draining; none at all): IPVS itself answers a
    # new connection with ICMP port unreachable (ip_vs_leave), so a client is refused
    # at once instead of hanging. Added and withdrawn by partial syncs.
    empty = [vs("10.96.7.15", "rr", weights=(0, 0, 0), owner="ns/drained"),
             VirtualServer.create("TCP", "10.96.7.16", 80, [], owner="ns/none")]
    owners = frozenset(v.owner for v in empty)
    record("no_endpoints", sync(make_table(empty), owners))
    out["no_endpoints"] = [topo.connect_error(v.address, 80) for v in empty]
    record("no_endpoints_gone", sync({}, owners))
    full_sync_steps(topo, proxier, table, vs("10.96.7.14", "wrr", weights=(1, 1, 1),
                                             owner=services[4].owner))
    # ipvsadm -g/-i keep the service's port for the real server: one with equal ports.
    drift_steps(topo, proxier, table, vs("10.96.7.17", "rr", port=8080))
    udp_flow_steps(topo, proxier, vs("10.96.7.18", "rr", protocol="UDP", port=53, owner="ns/flow"))
    # A second, restarted proxier adopts everything: a full sync does nothing.
    again = build_proxier("ipvs", DataplaneConfig(cluster_cidrs=("10.244.0.0/16",)))
    record("restart", again.sync_blocking(table))  # type: ignore[attr-defined]
    out["ipvsadm_after_restart"] = ipvsadm(topo)
    # Remove one service by a full sync without it; then clean up everything.
    del table[services[2].key]
    record("remove", again.sync_blocking(table))  # type: ignore[attr-defined]
    out["ipvsadm_removed"] = ipvsadm(topo)
    out["vips_removed"] = in_ns(topo.node, "ip", "-4", "-o", "addr", "show", "svcproxy0").stdout
    record("cleanup", again.cleanup_blocking())  # type: ignore[attr-defined]
    out["ipvsadm_cleanup"] = ipvsadm(topo)
    out["svcproxy0_after_cleanup"] = subprocess.run(
        ["ip", "link", "show", "svcproxy0"], capture_output=True, text=True, check=False
    ).returncode


def udp_flow_steps(topo: Topology, proxier: Any, udp: VirtualServer) -> None:
    """A UDP flow from one source port, pinned to a backend; that backend is removed
    (a partial sync): who answered from 1 s after the sync began (conntrack cleanup,
    IPVS expire_nodest_conn)."""
    only = frozenset({udp.owner})
    proxier.sync_blocking(make_table([udp]), only)
    flow = subprocess.Popen(["ip", "netns", "exec", topo.client, sys.executable, "-m",
                             "svcproxy_lab.udpflow", udp.address, "53", "5"],
                            stdout=subprocess.PIPE, text=True)
    assert flow.stdout is not None
    flow.stdout.readline()
    first = [flow.stdout.readline().split()[1] for _ in range(10)]
    pinned = first[-1]
    index = int(pinned[2:]) if pinned.startswith("be") else 0
    removed_at = time.time()
    gone = udp.with_reals([r for r in udp.real_servers if r.address != topo.backends[index]])
    record("udp_flow", proxier.sync_blocking(make_table([gone]), only))
    answers = [line.split() for line in flow.stdout]
    flow.wait()
    out["udp_flow"] = {"first": first, "pinned": pinned,
                       "late": [n for t, n in answers if float(t) > removed_at + 1.0],
                       "deleted": getattr(proxier.conntrack, "deleted", None),
                       "netlink": getattr(proxier.conntrack, "netlink", None)}
    proxier.sync_blocking({}, only)


def full_sync_steps(topo: Topology, proxier: Any, table: dict[Any, VirtualServer],
                    changed: VirtualServer) -> None:
    """The periodic full sync's shape (sync_full): the hand decoder reads what pyroute2
    reads; a steady full sync writes nothing; a partial sync run while it reads the
    kernel survives its write. ``table``: the desired table as the full sync begins."""
    import asyncio

    from ipvs_reference import dump as reference_dump

    kernel = proxier._kernel
    out["dump_equal"] = kernel.dump() == reference_dump(kernel)  # foreign service included
    kernel.use_proc = False  # real servers over netlink too, not from /proc/net/ip_vs
    out["dump_proc_equal"] = kernel.dump() == reference_dump(kernel)
    kernel.use_proc = True
    out["dump_services"] = len(kernel.dump())
    before = in_ns(topo.node, "ipvsadm", "-Sn").stdout

    async def idle(until: asyncio.Future[Any]) -> frozenset[str]:
        await until
        return frozenset()

    record("full_steady", asyncio.run(proxier.sync_full(table, idle)))
    out["full_steady_unchanged"] = in_ns(topo.node, "ipvsadm", "-Sn").stdout == before
    owner = frozenset({changed.owner})

    async def change(until: asyncio.Future[Any]) -> frozenset[str]:
        record("full_partial", await proxier.sync(make_table([changed]), owner))
        out["full_partial_before_read_done"] = not until.done()
        await until
        return owner

    record("full_with_change", asyncio.run(proxier.sync_full(table, change)))
    out["ipvsadm_full_with_change"] = ipvsadm(topo)
    # Back as it was, for the steps after this one.
    record("full_restore", proxier.sync_blocking(owned_by(table, owner), owner))


def drift_steps(topo: Topology, proxier: Any, table: dict[Any, VirtualServer],
                ours: VirtualServer) -> None:
    """Drift made by hand with ipvsadm: one of our real servers switched to direct routing
    (traffic to it would break), one-packet scheduling, a /24 persistence netmask and the
    SIP persistence engine on the persistent UDP service, sh-port on the sh service. A partial sync (it diffs
    against its mirror) does not see it; one full sync repairs all of it; a foreign
    service with direct routing is left alone. ``ours`` is added first and withdrawn
    (and the foreign one deleted) at the end: later steps compare with earlier tables."""
    import asyncio

    node, be0 = topo.node, topo.backends[0]
    owner = frozenset({ours.owner})
    table[ours.key] = ours
    record("drift_add", proxier.sync_blocking(owned_by(table, owner), owner))
    in_ns(node, "ipvsadm", "-A", "-t", "192.0.2.2:8080", "-s", "rr")
    in_ns(node, "ipvsadm", "-a", "-t", "192.0.2.2:8080", "-r", "192.0.2.9:8080", "-g")
    in_ns(node, "ipvsadm", "-e", "-t", "10.96.7.17:8080", "-r", f"{be0}:8080", "-g")
    in_ns(node, "modprobe", "ip_vs_pe_sip", check=False)  # the kernel would request it too
    in_ns(node, "ipvsadm", "-E", "-u", "10.96.7.13:53", "-s", "rr", "-p", "3",
          "-M", "255.255.255.0", "-o", "--pe", "sip")
    in_ns(node, "ipvsadm", "-E", "-t", "10.96.7.11:80", "-s", "sh", "-b", "sh-port")
    out["ipvsadm_drifted"] = ipvsadm(topo)
    everyone = frozenset(v.owner for v in table.values())
    record("drift_partial", proxier.sync_blocking(table, everyone))

    async def idle(until: asyncio.Future[Any]) -> frozenset[str]:
        await until
        return frozenset()

    record("drift_full", asyncio.run(proxier.sync_full(table, idle)))
    out["ipvsadm_repaired"] = ipvsadm(topo)
    record("drift_steady", asyncio.run(proxier.sync_full(table, idle)))
    out["drift_traffic"] = topo.ask("10.96.7.17", 8080, 3)
    del table[ours.key]
    record("drift_remove", proxier.sync_blocking({}, owner))
    in_ns(node, "ipvsadm", "-D", "-t", "192.0.2.2:8080")


def poll(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


if __name__ == "__main__":
    main()
