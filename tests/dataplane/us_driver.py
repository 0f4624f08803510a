"""Runs a UserspaceProxier inside the node netns for tests; JSON commands on stdin.

Each line: {"op": "sync", "table": [virtual server dicts], "only": [owners] | null},
{"op": "sync_full", "table": [...]} (the agent's periodic full sync, with a stand-in for
the partial syncs it lets run beside its read: it only notes that it ran while the read
was going on) or {"op": "cleanup"}; answers one JSON line with the operations and errors.
"""

import asyncio
import json
import sys

from svcproxy.dataplane.table import RealServer, VirtualServer, make_table
from svcproxy.dataplane.userspace.proxier import UserspaceProxier


def parse(d: dict) -> VirtualServer:
    reals = [RealServer(*r) for r in d.pop("reals")]
    return VirtualServer.create(d.pop("protocol"), d.pop("address"), d.pop("port"), reals, **d)


async def main() -> None:
    proxier = UserspaceProxier()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        beside = []
        if cmd["op"] == "sync":
            table = make_table(parse(d) for d in cmd["table"])
            only = frozenset(cmd["only"]) if cmd.get("only") is not None else None
            result = await proxier.sync(table, only)
        elif cmd["op"] == "sync_full":

            async def between(reading: asyncio.Future, beside: list = beside) -> frozenset:
                beside.append(not reading.done())
                await reading
                return frozenset()

            table = make_table(parse(d) for d in cmd["table"])
            result = await proxier.sync_full(table, between)
        else:
            result = await proxier.cleanup()
        counts = proxier.counts()
        print(json.dumps({"operations": dict(result.operations),
                          "errors": [str(e) for e in result.errors],
                          "counts": [counts.virtual_servers, counts.real_servers],
                          "beside": beside}), flush=True)


asyncio.run(main())
