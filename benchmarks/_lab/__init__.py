"""Shared harness of the lab benchmarks (programming_latency, policy_apply, footprint).

``kernel_watch`` is the per-node reader of the kernel's NAT
state (run inside each node's network namespace); ``harness`` brings a lab up, writes the
benchmark's Services and EndpointSlices, drives the readers and samples processes.
Imported as ``benchmarks._lab``; the statistics live in ``svcproxy_lab.stats``.
"""
