"""A one-shot test client: send one TCP/UDP/HTTP request and print the answer.

Run by ``traffic.py`` inside a client network namespace (never in the root
namespace: network safety rule) as
``python -m svcproxy_lab.probe [--proto tcp|udp|http] [--path /] IP PORT``.
Exit status 0 with the answer on stdout, 1 with the error on stderr; with
``--count N`` it sends N requests and prints one JSON line (see :func:`burst`),
from each ``--source ADDR`` in turn when given (one of the client namespace's
addresses, see ``network.client_addresses``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys


def ask(ip: str, port: int, proto: str, timeout: float, *, path: str = "/",
        method: str = "GET", source: str | None = None) -> str:
    bind = (source, 0) if source else None
    if proto == "udp":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            if bind:
                sock.bind(bind)
            sock.sendto(b"hello\n", (ip, port))
            data, _ = sock.recvfrom(65535)
            return data.decode()
    if proto == "http":
        conn = http.client.HTTPConnection(ip, port, timeout=timeout, source_address=bind)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return f"{resp.status} {resp.read().decode()}"
        finally:
            conn.close()
    with socket.create_connection((ip, port), timeout=timeout, source_address=bind) as sock:
        sock.sendall(b"hello\n")  # anything but HTTP gets the echo line at once
        chunks = []
        while True:
            chunk = sock.recv(65535)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()


def burst(args: argparse.Namespace) -> int:
    """Many requests from one process: starting a client per request costs more than the
    request itself (especially inside a user-mode-linux guest)."""
    answers: list[str | None] = []
    errors: list[str] = []
    by_source: dict[str, list[str | None]] = {}
    for source in args.source or [None]:
        mine = by_source.setdefault(source or "", [])
        for _ in range(args.count):
            try:
                words = ask(args.ip, args.port, args.proto, args.timeout, path=args.path,
                            method=args.method, source=source).split()
                mine.append(words[1] if words and words[0].isdigit() else words[0])
            except (OSError, http.client.HTTPException, IndexError) as exc:
                mine.append(None)
                if len(errors) < 5:
                    errors.append(f"{source or 'default source'}: {type(exc).__name__}: {exc}")
        answers += mine
    out: dict[str, object] = {"answers": answers, "errors": errors}
    if args.source:
        out["sources"] = by_source
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svcproxy-probe", description=__doc__.splitlines()[0])
    parser.add_argument("ip")
    parser.add_argument("port", type=int)
    parser.add_argument("--proto", choices=("tcp", "udp", "http"), default="tcp")
    parser.add_argument("--path", default="/")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--count", type=int, default=0,
                        help="send this many requests (a new connection each) and print JSON: "
                             "the answering Pod of each, or null where it failed")
    parser.add_argument("--source", action="append",
                        help="with --count: send from this local address (repeat for several, "
                             "each sends --count requests in turn)")
    args = parser.parse_args(argv)
    if args.count:
        return burst(args)
    try:
        sys.stdout.write(ask(args.ip, args.port, args.proto, args.timeout, path=args.path,
                             method=args.method))
    except (OSError, http.client.HTTPException) as exc:
        print(f"{args.proto} {args.ip}:{args.port}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
