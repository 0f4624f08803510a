"""The local Kubernetes lab behind ``svcproxy lab``, the demo and the e2e tests.

Real upstream control plane (``controlplane.py``, certificates in ``pki.py``),
nodes behind one small interface (``node.py``: network namespaces here,
user-mode-linux guests in ``uml.py``), the lab kubelet (``kubelet.py``,
``podnet.py``, ``echo.py``), host plumbing (``network.py``), orchestration
(``cluster.py``), the command line (``cli.py``) and test traffic from client
namespaces (``traffic.py``, ``probe.py``). Shared with the tests and the benchmarks: the
one echo server (``echo.py``), the data-plane tests' netns topology (``topology.py``,
``burst.py``) and the statistics (``stats.py``); the demo is ``demo.py``. See docs/lab.md.
"""
