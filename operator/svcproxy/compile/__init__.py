"""The compile step: policies, Services and EndpointSlices -> ProxyVirtualServer programs.

Pure functions only (no Kubernetes client, no sockets; import-linter checks):
:mod:`program` compiles one Service, :mod:`conflicts` settles which policy
selects and wins a Service, :mod:`planner` plans one namespace (programs,
handover steps, policy statuses). Called by the operator
(``svcproxy.controller``) and by ``svcproxy plan``.
"""
