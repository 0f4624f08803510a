"""The topology's client, run in its client netns: N fresh connections, prints who answered each.

``python -m svcproxy_lab.burst VIP PORT COUNT tcp|udp|tcp-error|udp-error`` (see topology.py).
"""

import errno
import socket
import sys

from svcproxy.base import IPFamily

vip, port, count, proto = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if proto == "tcp-error":
    # How one TCP connect ends: "connected", an errno name (ECONNREFUSED), or
    # "TimeoutError" when nothing answered within 10 s.
    try:
        socket.create_connection((vip, port), timeout=10).close()
        print("connected")
    except OSError as err:
        print(errno.errorcode.get(err.errno or 0, type(err).__name__))
    sys.exit(0)
if proto == "udp-error":
    # How one UDP request ends: "answered", ECONNREFUSED when an ICMP port unreachable
    # came back (a connected UDP socket reports it), or "TimeoutError" after 3 s.
    with socket.socket(socket.AF_INET6 if IPFamily.is_v6(vip) else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        try:
            s.connect((vip, port))
            s.send(b"hi\n")
            s.recv(100)
            print("answered")
        except OSError as err:
            print(errno.errorcode.get(err.errno or 0, type(err).__name__))
    sys.exit(0)
names = []
for _ in range(count):
    try:
        if proto == "udp":
            family = socket.AF_INET6 if IPFamily.is_v6(vip) else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(b"hi\n", (vip, port))
                names.append(s.recv(100).decode().strip())
        else:
            with socket.create_connection((vip, port), timeout=2) as s:
                names.append(s.makefile().readline().strip() or "-")
    except OSError:
        names.append("-")
print(" ".join(names))
