"""The agent's Kubernetes side against a real API server, with in-memory proxiers.

The agent's watch, list and ProxyNode writer run in this process (no root,
no kernel: the proxiers are the unit tests' in-memory ones), against the
lab's API server or any cluster named by SVCPROXY_E2E_KUBECONFIG. Checked on
the real ProxyNode: applied hashes follow the ProxyVirtualServers (changes
and deletions, the latter sent as merge-patch nulls), an ipvs program on a
node without IPVS is reported as running in iptables mode, a deleted
ProxyNode comes back, and a restarted agent drops owners deleted while it
was down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from conftest import REPO, Lab

from svcproxy.agent.agent import Agent
from svcproxy.agent.main import AgentProcess, _load_config
from svcproxy.agent.tracker import ChangeTracker
from svcproxy.dataplane.capabilities import ModeCapabilities
from tests.unit.test_agent_fake import FakeKernel, FakeProxier

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def crds(lab: Lab) -> Iterator[None]:
    lab.kubectl("apply", "-f", str(REPO / "crds"))
    lab.wait_until("the ProxyNode CRD to be served",
                   lambda: lab.kubectl("get", "proxynodes", check=False) is not None
                   and lab.kubectl("api-resources", "--api-group=svcproxy.io", check=False)
                   .count("svcproxy.io") >= 3)
    yield


class Running:
    def __init__(self, lab: Lab, node: str, kernel: FakeKernel) -> None:
        self.lab, self.node, self.kernel = lab, node, kernel
        self.task: asyncio.Task[None] | None = None
        self.proc: AgentProcess | None = None

    async def start(self) -> None:
        proxiers = {m: FakeProxier(m, self.kernel) for m in ("iptables", "userspace")}
        agent = Agent(proxiers, node_name=self.node, tracker=ChangeTracker(min_interval=0.05),
                      unavailable={"ipvs": ModeCapabilities("ipvs", False, reason="no IPVS in this kernel")})
        args = argparse.Namespace(node_name=self.node, health_port=0, metrics_port=0,
                                  bind_address="127.0.0.1")
        api = await _load_config(str(self.lab.kubeconfig))
        self.proc = AgentProcess(args, agent, api)
        proc = self.proc

        async def main() -> None:
            try:
                await asyncio.gather(proc.watch.run(), proc.sync_loop(), proc.report_loop())
            finally:
                await api.close()

        self.task = asyncio.create_task(main())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def agent(lab: Lab, crds: None) -> AsyncIterator[Running]:
    node = f"e2e-agent-{uuid.uuid4().hex[:6]}"
    running = Running(lab, node, FakeKernel())
    await running.start()
    yield running
    await running.stop()
    lab.kubectl("delete", "proxynode", node, "--ignore-not-found", check=False)


def pvs(name: str, mode: str, content_hash: str, vip: str = "10.96.240.1") -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ProxyVirtualServer",
            "metadata": {"name": name},
            "spec": {"service": {"name": name}, "policy": {"name": "e2e"}, "mode": mode,
                     "scheduler": "rr", "contentHash": content_hash,
                     "virtualServers": [{"address": vip, "port": 80, "mode": mode, "scheduler": "rr",
                                         "realServers": [{"address": "10.244.1.7", "port": 80}]}]}}


def status(lab: Lab, node: str) -> dict[str, Any]:
    out = lab.kubectl("get", "proxynode", node, "-o", "json", check=False)
    return dict((json.loads(out).get("status") or {}) if out else {})


async def until(what: str, check: Any, timeout: float = 30) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while loop.time() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.2)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


async def test_applied_hashes_follow_programs_and_deletions_are_nulled(
    lab: Lab, namespace: str, agent: Running
) -> None:
    owner = f"{namespace}/web"
    await asyncio.to_thread(lab.apply, pvs("web", "iptables", "h-1"), namespace)
    await until("h-1 applied", lambda: status(lab, agent.node).get("applied", {}).get(owner) == "h-1")
    await asyncio.to_thread(lab.apply, pvs("web", "iptables", "h-2", vip="10.96.240.2"), namespace)
    await until("h-2 applied", lambda: status(lab, agent.node).get("applied", {}).get(owner) == "h-2")
    assert {k.address for k in agent.kernel.table("iptables")} >= {"10.96.240.2"}
    assert "10.96.240.1" not in {k.address for k in agent.kernel.table("iptables")}
    await asyncio.to_thread(lab.kubectl, "delete", "pvs", "web", "-n", namespace)
    await until("the owner gone from applied",
                lambda: owner not in status(lab, agent.node).get("applied", {"x": 1}))
    st = status(lab, agent.node)
    assert st["nodeName"] == agent.node and st["conditions"][0]["type"] == "Ready"


async def test_ipvs_program_reported_as_running_in_iptables(
    lab: Lab, namespace: str, agent: Running
) -> None:
    await asyncio.to_thread(lab.apply, pvs("fast", "ipvs", "ipvs-1", vip="10.96.240.3"), namespace)
    st = await until("the fallback reported",
                     lambda: (s := status(lab, agent.node)).get("applied", {}).get(f"{namespace}/fast")
                     and s)
    assert st["capabilities"]["ipvs"] is False
    assert {"requested": "ipvs", "effective": "iptables", "reason": "no IPVS in this kernel"} in st["modes"]
    assert "iptables(ipvs)" in st["modesSummary"].split(",")  # other tests' programs may show too


async def test_deleted_proxynode_comes_back_and_restart_nulls_owners_gone_meanwhile(
    lab: Lab, namespace: str, agent: Running
) -> None:
    owner = f"{namespace}/keep"
    await asyncio.to_thread(lab.apply, pvs("keep", "userspace", "k-1", vip="10.96.240.4"), namespace)
    await until("k-1 applied", lambda: status(lab, agent.node).get("applied", {}).get(owner) == "k-1")
    await asyncio.to_thread(lab.kubectl, "delete", "proxynode", agent.node)
    await asyncio.to_thread(lab.apply, pvs("keep", "userspace", "k-2", vip="10.96.240.4"), namespace)
    await until("the ProxyNode recreated with k-2",
                lambda: status(lab, agent.node).get("applied", {}).get(owner) == "k-2")
    await agent.stop()
    await asyncio.to_thread(lab.kubectl, "delete", "pvs", "keep", "-n", namespace)
    await agent.start()  # same node name, same (fake) kernel
    await until("the restarted agent to null the deleted owner",
                lambda: (s := status(lab, agent.node)).get("lastSyncTime")
                and owner not in s.get("applied", {}))
    assert agent.kernel.table("userspace") == {}
