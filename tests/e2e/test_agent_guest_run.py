"""Runs inside a user-mode-linux guest: the agent core with the real proxiers; prints JSON.

Started by tests/e2e/test_agent_guest.py (not a test module itself: its only
code runs under ``__main__``). Builds the netns topology of
svcproxy_lab.topology in the guest, enters the node netns and runs
the agent (:class:`svcproxy.agent.agent.Agent` with the proxiers
``svcproxy agent`` builds) through: a first full sync of ipvs, iptables and
userspace programs; a live mode change ipvs -> iptables under steady
traffic; an agent restart (a new Agent over the same kernel); an agent with
ipvs turned off (the fallback); cleanup. After each step it records traffic
answers and ``ipvsadm -Sn`` / ``iptables-save`` read back independently.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

VIP_RR, VIP_IPT, VIP_US, VIP_FB = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
out: dict[str, Any] = {}


def pvs(name: str, mode: str, vip: str, backends: list[str], scheduler: str = "rr") -> Any:
    from svcproxy.agent.convert import to_program
    from svcproxy.api.program import ProxyVirtualServer

    reals = [{"address": b, "port": 8080} for b in backends]
    return to_program(ProxyVirtualServer.parse({
        "metadata": {"name": name, "namespace": "guest"},
        "spec": {"service": {"name": name}, "policy": {"name": "p"}, "mode": mode,
                 "scheduler": scheduler, "contentHash": f"{name}-{mode}",
                 "virtualServers": [{"address": vip, "port": 8080, "mode": mode,
                                     "scheduler": scheduler, "realServers": reals}]}}))


def build(modes: list[str]) -> Any:
    """Proxiers as ``svcproxy agent`` builds them: before the event loop runs (pyroute2's
    synchronous sockets refuse a running loop)."""
    from svcproxy.agent.main import build_proxiers
    from svcproxy.dataplane.modes import DataplaneConfig

    return build_proxiers(DataplaneConfig(cluster_cidrs=("10.244.0.0/16",)), modes)


def make_agent(built: Any) -> Any:
    from svcproxy.agent.agent import Agent
    from svcproxy.agent.tracker import ChangeTracker

    usable, unusable = built
    return Agent(usable, node_name="guest", tracker=ChangeTracker(min_interval=0.0),
                 unavailable=unusable)


async def sync(agent: Any) -> dict[str, Any]:
    outcome = await agent.run_due()
    assert outcome is not None
    return {"full": outcome.batch.full,
            "ops": sum(r.total_operations for r in outcome.results),
            "by_mode": {r.mode: r.total_operations for r in outcome.results if r.total_operations},
            "errors": [f"{r.mode}: {e}" for r in outcome.results for e in r.errors]}


def use_legacy_iptables() -> None:
    """The UML kernel has x_tables NAT (iptable_nat) but no nf_tables NAT (nft_chain_nat):
    put the -legacy tools first on PATH, as a node with such a kernel would configure."""
    import os
    import tempfile

    bin_dir = Path(tempfile.mkdtemp(prefix="legacy-iptables-"))
    for tool in ("iptables", "iptables-save", "iptables-restore"):
        (bin_dir / tool).symlink_to(f"/usr/sbin/{tool.replace('iptables', 'iptables-legacy', 1)}")
    os.environ["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"


def main() -> None:
    from pyroute2.netns import setns

    from svcproxy_lab.topology import Topology, in_ns

    topo = Topology()
    topo.create(2)
    try:
        in_ns(topo.node, "ipvsadm", "-A", "-t", "192.0.2.1:80", "-s", "rr")
        setns(topo.node)
        every = ["ipvs", "iptables", "userspace"]
        sets = [build(every), build(every), build(["iptables", "userspace"]), build(every)]
        asyncio.run(steps(topo, sets))
    finally:
        topo.destroy()


async def steps(topo: Any, sets: list[Any]) -> None:
    from svcproxy.agent.report import build_status
    from svcproxy_lab.topology import in_ns

    if True:
        node = topo.node
        be = topo.backends

        async def ask(vip: str, n: int = 4) -> list[str]:
            return await asyncio.to_thread(topo.ask, vip, 8080, n)

        def kernel() -> dict[str, str]:
            return {"ipvs": in_ns(node, "ipvsadm", "-Sn").stdout,
                    "nat": "\n".join(sorted(line for line in in_ns(node, "iptables-save", "-t", "nat")
                                            .stdout.splitlines() if "SVCPROXY" in line))}

        programs = [pvs("rr", "ipvs", VIP_RR, be), pvs("ipt", "iptables", VIP_IPT, be),
                    pvs("us", "userspace", VIP_US, be)]
        agent = make_agent(sets[0])
        agent.replace_all(programs)
        out["first"] = await sync(agent)
        out["caps"] = {m: c.available for m, c in agent.router.capabilities.items()}
        out["answers"] = {v: await ask(v, 4 if v != VIP_IPT else 16) for v in (VIP_RR, VIP_IPT, VIP_US)}
        out["kernel_first"] = kernel()

        # A live mode change under steady traffic: ipvs -> iptables.
        failures: list[str] = []
        stop = threading.Event()

        def steady() -> None:
            while not stop.is_set():
                failures.extend(a for a in topo.ask(VIP_RR, 8080, 1) if a == "-")

        worker = threading.Thread(target=steady)
        worker.start()
        await asyncio.sleep(0.5)
        agent.upsert(pvs("rr", "iptables", VIP_RR, be))
        out["change"] = await sync(agent)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.to_thread(worker.join)
        out["change_failures"] = len(failures)
        out["kernel_changed"] = kernel()
        out["answers_changed"] = await ask(VIP_RR, 16)  # iptables mode: random choice
        out["status"] = build_status(agent.snapshot(watch_live=True))
        for proxier in agent.proxiers.values():
            await proxier.close()

        # Restart: a new agent over the same kernel adopts it.
        ipvs_program = pvs("rr2", "ipvs", VIP_FB, be)
        restarted = make_agent(sets[1])
        restarted.replace_all([*programs[1:], pvs("rr", "iptables", VIP_RR, be)])
        out["restart"] = await sync(restarted)
        out["kernel_restart"] = kernel()
        for proxier in restarted.proxiers.values():
            await proxier.close()

        # ipvs turned off on this agent: an ipvs program runs in iptables mode.
        fallback = make_agent(sets[2])
        fallback.replace_all([*programs[1:], pvs("rr", "iptables", VIP_RR, be), ipvs_program])
        out["fallback"] = await sync(fallback)
        out["fallback_answers"] = await ask(VIP_FB, 16)
        out["fallback_status"] = build_status(fallback.snapshot(watch_live=True))
        out["kernel_fallback"] = kernel()
        for proxier in fallback.proxiers.values():
            await proxier.close()

        cleaner = make_agent(sets[3])
        out["cleanup"] = [[f"{r.mode}: {e}" for e in r.errors] for r in await cleaner.cleanup()]
        out["kernel_clean"] = kernel()


if __name__ == "__main__":
    use_legacy_iptables()
    main()
    print(json.dumps(out))
