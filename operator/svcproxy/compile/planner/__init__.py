"""The namespace planner: one namespace's objects -> what the operator writes (pure).

:func:`plan_namespace` reads a :class:`NamespaceView` and returns a
:class:`NamespacePlan` (programs to write or delete, Services to label or
unlabel, policy statuses, Events). :mod:`.plan` holds the pass, :mod:`.memo`
what a pass keeps for the next one (:class:`PlanMemo`, one per namespace, held
by the caller), :mod:`.status` the policy status rows. Called by the operator's
reconciler and by ``svcproxy plan``.
"""

from svcproxy.compile.planner.memo import MAX_PROGRAM_BYTES, PlanMemo
from svcproxy.compile.planner.plan import Event, NamespacePlan, NamespaceView, plan_namespace, program_summary

__all__ = [
    "MAX_PROGRAM_BYTES",
    "Event",
    "NamespacePlan",
    "NamespaceView",
    "PlanMemo",
    "plan_namespace",
    "program_summary",
]
