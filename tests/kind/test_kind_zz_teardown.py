"""``hack/kind.sh down`` leaves the machine as it was before ``up``: no link, network
namespace, route, netfilter rule, container, volume or Docker network left behind.

Runs last in the kind suite (the name sorts last); where the session found the cluster
already running it has no "before" to compare with, and makes one: down, record, up, down.
"""

from __future__ import annotations

import subprocess

from kindlib import REPO, Kind, machine_state


def _kind_sh(*args: str) -> None:
    subprocess.run(["bash", str(REPO / "hack/kind.sh"), *args], check=True,
                   stdout=subprocess.DEVNULL)


def test_down_leaves_the_machine_as_it_was(kind: Kind) -> None:
    before = kind.before
    if before is None:
        _kind_sh("down")
        before = machine_state()
        _kind_sh("up")
    assert machine_state() != before  # the cluster is there: the comparison can fail
    _kind_sh("down")
    after = machine_state()
    # Only what is new counts: other work on the machine (a lab, a benchmark) may have
    # removed its own namespaces or rules meanwhile, and that is not kind.sh's doing.
    left = {what: sorted(set(after[what]) - set(before[what])) for what in before}
    assert not any(left.values()), f"left behind by kind.sh up/down: {left}"
    assert not kind.kubeconfig.exists()
