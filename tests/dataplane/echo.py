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
        await asyncio.start_server(on_tcp, "0.0.0.0", port, reuse_address=True)
        await loop.create_datagram_endpoint(Udp, local_addr=("0.0.0.0", port),
                                            family=socket.AF_INET)
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main(sys.argv[1], [int(p) for p in sys.argv[2:]]))
