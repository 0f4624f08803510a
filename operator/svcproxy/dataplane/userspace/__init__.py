"""The ``userspace`` mode: the agent proxies TCP and UDP itself (balancer + proxier)."""
