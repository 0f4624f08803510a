"""svcproxy's benchmarks: scripts that print JSON figures, run from the repo root as
``python -m benchmarks.NAME`` (see README.md).

``_report`` (output), ``_sync`` (the full-sync loop), ``_source`` (``--src``: which
svcproxy to measure), ``_operator_api`` and ``_lab/`` (lab harness and kernel readers) are
shared helpers; the lab's echo server, netns topology and statistics come from
``svcproxy_lab``.
"""
