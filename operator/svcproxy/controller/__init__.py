"""The operator: kopf handlers, the coalescing reconciler, and the plan/status commands.

``main`` runs ``svcproxy operator``; ``handlers`` are the kopf registrations,
each delegating to plain functions; ``cache`` holds what the watches saw;
``reconciler`` plans a namespace with :mod:`svcproxy.compile` and writes the
result through ``client``. ``plan`` and ``statuscmd`` are read-only commands.
"""
