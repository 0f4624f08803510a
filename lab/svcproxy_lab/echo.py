"""The one echo server: the lab kubelet's for Pods of image ``svcproxy.io/echo``, the
backends of the data-plane tests' netns topology (``topology.py``) and of the data-path benchmark.

Started by ``kubelet.py`` inside the Pod's network namespace as
``python -m svcproxy_lab.echo --name POD --port 80 ...``. On every port it
listens for TCP and UDP. It answers one line, ``<pod-name> <client-ip>:<client-port>``:
to a UDP datagram, to a TCP connection that sends anything but an HTTP
request (or nothing for 0.3 s), and as the body of ``HTTP/1.1 200`` to an
HTTP request. HTTP also serves:

- ``GET /healthz``: 200 when ready, 503 when not (the readiness endpoint);
- ``POST /admin/ready?value=false`` (or ``true``): make this Pod unready/ready;
- the Pod is also unready while the file given by ``--unready-file`` exists.

``--bare`` (the topology's backends) answers only ``<name>``, at once on every TCP
connection and to every UDP datagram, with no HTTP; ``--dual-stack`` also listens on
IPv6 (``::``, IPv6-only sockets beside the IPv4 ones). The first stdout line, once every
port is bound, says it is serving.

``serve_lines`` is the data-path benchmark's variant: TCP only, one answer per request
line on persistent connections, a bare selector loop.

On SIGTERM it keeps serving for ``--drain-seconds`` (the Pod's env
``SVCPROXY_ECHO_DRAIN_SECONDS``, default 0), then exits, so tests can watch a
terminating endpoint drain.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import urllib.parse
from pathlib import Path
from typing import cast

_HTTP_METHODS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ")


class Echo:
    def __init__(self, name: str, unready_file: Path | None, *, bare: bool = False) -> None:
        self.name = name
        self.unready_file = unready_file
        self.admin_ready = True
        self.bare = bare

    @property
    def ready(self) -> bool:
        if self.unready_file is not None and self.unready_file.exists():
            return False
        return self.admin_ready

    def line(self, peer: tuple[str, int]) -> bytes:
        if self.bare:
            return f"{self.name}\n".encode()
        return f"{self.name} {peer[0]}:{peer[1]}\n".encode()

    async def handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        if self.bare:  # answer at once: the topology's clients send nothing
            writer.write(self.line(peer))
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()
            return
        try:
            try:
                head = await asyncio.wait_for(reader.read(4096), timeout=0.3)
            except TimeoutError:
                head = b""
            if head.startswith(_HTTP_METHODS):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < 65536:
                    more = await asyncio.wait_for(reader.read(4096), timeout=5)
                    if not more:
                        break
                    head += more
                writer.write(self.http(head, peer))
            else:
                writer.write(self.line(peer))
            await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away; nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def http(self, head: bytes, peer: tuple[str, int]) -> bytes:
        request_line = head.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = request_line.split()
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("GET", "/")
        url = urllib.parse.urlsplit(target)
        status, body = 200, self.line(peer)
        if url.path == "/healthz":
            status, body = (200, b"ok\n") if self.ready else (503, b"not ready\n")
        elif url.path == "/admin/ready" and method in ("POST", "PUT"):
            value = urllib.parse.parse_qs(url.query).get("value", ["true"])[0].lower()
            self.admin_ready = value not in ("false", "0", "no")
            body = f"ready={str(self.admin_ready).lower()}\n".encode()
        reason = {200: "OK", 503: "Service Unavailable"}[status]
        header = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        return header + (b"" if method == "HEAD" else body)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's UDP transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self.transport is not None:
            host, port = str(addr[0]), int(str(addr[1]))
            self.transport.sendto(self.echo.line((host, port)), addr)


async def serve(args: argparse.Namespace) -> None:
    echo = Echo(args.name, Path(args.unready_file) if args.unready_file else None, bare=args.bare)
    loop = asyncio.get_running_loop()
    servers = []
    families = [("0.0.0.0", socket.AF_INET)] + ([("::", socket.AF_INET6)] if args.dual_stack else [])
    for port in args.port:
        for host, family in families:  # asyncio binds "::" IPv6-only
            servers.append(await asyncio.start_server(echo.handle_tcp, host, port, family=family,
                                                      backlog=1024))
            udp = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET6:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.bind((host, port))
            await loop.create_datagram_endpoint(lambda: _Udp(echo), sock=udp)
    print(f"echo {args.name}: serving TCP and UDP on {args.port}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    if args.drain_seconds > 0:
        print(f"echo {args.name}: SIGTERM, serving {args.drain_seconds} s more", flush=True)
        await asyncio.sleep(args.drain_seconds)
    for server in servers:
        server.close()
    print(f"echo {args.name}: exiting", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svcproxy-echo", description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the Pod's name, sent in every answer")
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--unready-file", help="the Pod is unready while this file exists")
    parser.add_argument("--drain-seconds", type=float, default=0.0)
    parser.add_argument("--bare", action="store_true", help="answer only the name, at once; no HTTP")
    parser.add_argument("--dual-stack", action="store_true", help="also listen on IPv6")
    args = parser.parse_args(argv)
    asyncio.run(serve(args))
    return 0



def serve_lines(name: str, port: int) -> None:
    """The data-path benchmark's backend: every request line gets ``<name> <peer ip:port>``,
    on new and on persistent connections, until stdin closes. One selector loop with no
    task per connection, so the server's own cost stays small beside what is measured."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")  # the harness closes it to stop us
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 1024):
                    return
                continue
            if key.data is None:
                try:
                    conn, peer = lsock.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sel.register(conn, selectors.EVENT_READ, f"{name} {peer[0]}:{peer[1]}\n".encode())
                continue
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
            elif n := data.count(b"\n"):  # one answer per request line, however they arrive
                with contextlib.suppress(OSError):  # the client is gone; its close comes next
                    sock.send(key.data * n)

if __name__ == "__main__":
    sys.exit(main())
