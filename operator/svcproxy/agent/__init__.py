"""The node agent (control half): watch ProxyVirtualServers, route them to proxiers, report.

Layout (imports go downwards; only ``watch``, ``kube`` and ``main`` do I/O):

* ``main``     ``svcproxy agent``: options, the asyncio loops, /healthz and /metrics.
* ``watch``    list + watch of ProxyVirtualServers.
* ``apiclient`` the small Kubernetes API client (kubeconfig, in-cluster, requests, watch).
* ``kube``     the ProxyNode writer (create, then merge-patch status).
* ``agent``    desired state, partial/full syncs, make-before-break, errors.
* ``tracker``  coalescing change tracker with bounded sync rate; pure.
* ``routing``  which mode each virtual server runs in (fallback); pure.
* ``convert``  ProxyVirtualServer -> data-plane virtual servers; pure.
* ``report``   ProxyNode status and its merge patch; pure.
* ``metrics``, ``logs``.

The kernel half is :mod:`svcproxy.dataplane`.
"""
