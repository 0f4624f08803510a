"""Echo server for data-plane tests: answers every TCP connection / UDP datagram with its name."""

import asyncio
import socket
import sys


async def main(name: str, ports: list[int]) -> None:
    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name.encode() + b"\n")
        await writer.drain()
        writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.transport.sendto(name.encode() + b"\n", addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    for port in ports:
        # Both families (asyncio binds "::" IPv6-only): IPv6 tests give backends v6 addresses.
        for host, family in (("0.0.0.0", socket.AF_INET), ("::", socket.AF_INET6)):
            await asyncio.start_server(on_tcp, host, port, reuse_address=True, family=family)
            udp = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.bind((host, port))
            await loop.create_datagram_endpoint(Udp, sock=udp)
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main(sys.argv[1], [int(p) for p in sys.argv[2:]]))
