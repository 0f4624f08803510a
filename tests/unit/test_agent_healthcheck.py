"""The health-check node port server: kube-proxy's answer (status, headers, body) as
pure functions, then real sockets on loopback: open, count change, close, conflicts."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket

from svcproxy.agent.agent import Agent
from svcproxy.agent.convert import DesiredProgram
from svcproxy.agent.healthcheck import Check, HealthServer, answer, response
from svcproxy.agent.main import AgentProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_answer_has_kube_proxys_fields_and_status() -> None:
    status, body = answer(Check("ns/web", 32100, 2), True)
    assert status == 200
    assert json.loads(body) == {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 2,
                                "serviceProxyHealthy": True}
    assert body.decode().splitlines()[:3] == ["{", '\t"service": {', '\t\t"namespace": "ns",']
    assert answer(Check("ns/web", 32100, 0), True)[0] == 503
    assert answer(Check("ns/web", 32100, 2), False)[0] == 503  # the agent itself is unhealthy
    head = response(503, b"{}").decode()
    assert head.startswith("HTTP/1.1 503 Service Unavailable\r\n")
    assert "\r\nX-Content-Type-Options: nosniff\r\n" in head
    assert "\r\nContent-Type: application/json\r\n" in head
    assert head.endswith("\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")


async def _get(port: int, path: str = "/") -> tuple[int, dict[str, str], dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_real_sockets_follow_the_wanted_checks() -> None:
    async def run() -> None:
        healthy = [True]
        server = HealthServer(host="127.0.0.1", healthy=lambda: healthy[0])
        port, other = free_port(), free_port()
        await server.update({"ns/web": (port, 1)})
        status, headers, body = await _get(port, "/anything")
        assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
        assert body == {"service": {"namespace": "ns", "name": "web"}, "localEndpoints": 1,
                        "serviceProxyHealthy": True}
        listener = server.servers[port]
        await server.update({"ns/web": (port, 0)})  # count change: same listener
        assert server.servers[port] is listener
        assert (await _get(port))[0] == 503
        await server.update({"ns/web": (port, 3)})
        healthy[0] = False
        assert (await _get(port))[0:3:2] == (503, {"service": {"namespace": "ns", "name": "web"},
                                                   "localEndpoints": 3, "serviceProxyHealthy": False})
        # Two owners, one port: the first by name keeps it; the other is an error.
        await server.update({"ns/web": (port, 1), "ns/zzz": (port, 1), "ns/b": (other, 0)})
        assert server.checks[port].owner == "ns/web" and "already ns/web's" in server.errors["ns/zzz"]
        assert (await _get(other))[0] == 503
        await server.update({"ns/b": (other, 0)})
        try:
            await _get(port)
            raise AssertionError("the closed port still answers")
        except ConnectionRefusedError:
            pass
        await server.close()
        assert server.servers == {}

    asyncio.run(run())


def test_a_port_in_use_is_an_error_not_a_crash() -> None:
    async def run() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            server = HealthServer(host="127.0.0.1")
            await server.update({"ns/web": (port, 1)})
            assert port not in server.servers and "cannot listen" in server.errors["ns/web"]
            await server.close()

    asyncio.run(run())


def test_the_agent_offers_checks_of_the_programs_it_serves() -> None:
    agent = Agent({}, node_name="node-1")
    agent.upsert(DesiredProgram("ns/web", "h1", {}, health_check_port=32100, local_endpoints=2))
    agent.upsert(DesiredProgram("ns/plain", "h2", {}))
    agent.upsert(DesiredProgram("ns/bad", "h3", {}, "cannot program", health_check_port=32101))
    assert agent.health_checks() == {"ns/web": (32100, 2)}


def test_the_agent_process_follows_syncs_with_its_listeners() -> None:
    async def run() -> None:
        port = free_port()
        agent = Agent({}, node_name="node-1")
        args = argparse.Namespace(node_name="node-1")
        proc = AgentProcess(args, agent, api=None)  # type: ignore[arg-type]  # no API call is made here
        assert proc.watch.node_name == "node-1"  # the PVS watch picks this node's endpoints
        proc.health.host = "127.0.0.1"
        task = asyncio.create_task(proc.health_loop())
        agent.upsert(DesiredProgram("ns/web", "h1", {}, health_check_port=port, local_endpoints=1))
        assert agent.on_synced is not None
        agent.on_synced(None)  # type: ignore[arg-type]
        for _ in range(100):
            if port in proc.health.servers:
                break
            await asyncio.sleep(0.01)
        # Before the first full sync the agent is not healthy: 503 even with an endpoint.
        status, _, body = await _get(port)
        assert status == 503 and body["serviceProxyHealthy"] is False and body["localEndpoints"] == 1
        agent.delete("ns/web")
        agent.on_synced(None)  # type: ignore[arg-type]
        for _ in range(100):
            if not proc.health.servers:
                break
            await asyncio.sleep(0.01)
        assert proc.health.servers == {}
        task.cancel()
        await proc.health.close()

    asyncio.run(run())
