"""The pure parts of benchmarks/node_join.py: when a join counts as done, and where its Pods go."""

from __future__ import annotations

from benchmarks import node_join as nj


def test_a_join_is_done_when_every_program_is_applied_at_its_hash() -> None:
    want = {"bench/svc-0": "h0", "bench/svc-1": "h1"}
    assert nj.missing(want, None) == 2  # no ProxyNode yet
    assert nj.missing(want, {"metadata": {}}) == 2  # made, nothing reported yet
    assert nj.missing(want, {"status": {"applied": {"bench/svc-0": "h0", "bench/svc-1": "old"}}}) == 1
    extra = {"bench/svc-0": "h0", "bench/svc-1": "h1", "other/x": "y"}
    assert nj.missing(want, {"status": {"applied": extra}}) == 0


def test_programmed_is_for_the_generation_the_count_and_the_condition() -> None:
    def policy(gen: int, observed: int, count: str, cond: str) -> dict[str, object]:
        return {"metadata": {"generation": gen},
                "status": {"observedGeneration": observed, "programmed": count,
                           "conditions": [{"type": "Programmed", "status": cond}]}}

    assert nj.programmed(policy(2, 2, "3/3", "True"), "3/3")
    assert not nj.programmed(policy(2, 1, "3/3", "True"), "3/3")  # an older generation's
    assert not nj.programmed(policy(2, 2, "2/3", "False"), "3/3")
    assert not nj.programmed(policy(2, 2, "3/3", "False"), "3/3")
    assert not nj.programmed(None, "3/3")


def test_the_echo_pods_stay_off_the_joining_node() -> None:
    spec = nj.deployment(4, "node-3")["spec"]
    assert spec["replicas"] == 4
    terms = spec["template"]["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-3"]}]}]
