"""A long-lived UDP flow, run in a client netns: one socket, one fixed source port.

``python -m svcproxy_lab.udpflow VIP PORT SECONDS [INTERVAL]`` sends a datagram every
INTERVAL seconds (default 0.05) for SECONDS and prints ``<wall clock> <name>`` for each
answer as it comes (``-`` when none came within the interval), flushed line by line, so a
test sees which backend its conntrack entry pins the flow to, and when that changes.
"""

import socket
import sys
import time

from svcproxy.base import IPFamily

vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
family = socket.AF_INET6 if IPFamily.is_v6(vip) else socket.AF_INET
with socket.socket(family, socket.SOCK_DGRAM) as s:
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # one port for the whole run
    s.settimeout(interval)
    print(f"port {s.getsockname()[1]}", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sent = time.monotonic()
        s.sendto(b"hi\n", (vip, port))
        try:
            name = s.recv(100).decode().strip() or "-"
        except OSError:  # timeout, or ICMP unreachable
            name = "-"
        print(f"{time.time():.3f} {name}", flush=True)
        time.sleep(max(0.0, interval - (time.monotonic() - sent)))
