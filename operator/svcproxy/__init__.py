"""svcproxy: per-Service proxy policy for Kubernetes.

A ServiceProxyPolicy picks Services and sets their proxy mode (ipvs, iptables,
userspace), IPVS scheduler and session affinity. The operator (``controller``)
compiles each selected Service into a ProxyVirtualServer (``compile``); the
agent on every node diffs those programs against the kernel and applies the
difference (``agent`` -> ``dataplane``), then reports in a ProxyNode.
"""

__version__ = "0.1.0"
