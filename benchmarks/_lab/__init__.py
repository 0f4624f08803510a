"""Shared harness of the lab benchmarks (programming_latency, policy_apply, footprint).

``stats`` summarises samples; ``kernel_watch`` is the per-node reader of the kernel's NAT
state (run inside each node's network namespace); ``harness`` brings a lab up, writes the
benchmark's Services and EndpointSlices, drives the readers and samples processes.
Imported by the scripts in ``benchmarks/`` (which put this folder's parent on sys.path).
"""
