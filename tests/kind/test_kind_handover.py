"""Beside kube-proxy in nftables mode: svcproxy takes a Service over and gives it back
under steady traffic with no failed request."""

from __future__ import annotations

from kindlib import Kind
from workload import Steady, burst, deploy, policy, wait_programmed

LABEL = "service.kubernetes.io/service-proxy-name"


def test_take_over_and_give_back_under_steady_traffic(kind: Kind, namespace: str) -> None:
    proxy = kind.json("get", "cm", "-n", "kube-system", "kube-proxy")["data"]["config.conf"]
    assert 'mode: nftables' in proxy or 'mode: "nftables"' in proxy
    deploy(kind, namespace)
    # kube-proxy programs a new Service on its own schedule: wait until it answers, so the
    # steady traffic below starts from a Service that works before svcproxy touches it.
    kind.wait("kube-proxy serving the new Service", lambda: burst(
        kind, namespace, "http://web/hostname", 5).get("", 0) == 0)
    steady = Steady(kind, namespace, "http://web/hostname").start()
    kind.apply([policy("web", "web", "iptables")], namespace)
    wait_programmed(kind, namespace, "web")
    kind.wait("the handover label", lambda: kind.json("get", "svc", "-n", namespace, "web")
              ["metadata"].get("labels", {}).get(LABEL) == "svcproxy")
    burst(kind, namespace, "http://web/hostname", 20)
    kind.kubectl("delete", "spp", "-n", namespace, "web")
    kind.wait("the label removed", lambda: LABEL not in kind.json(
        "get", "svc", "-n", namespace, "web")["metadata"].get("labels", {}))
    kind.wait("the program withdrawn", lambda: kind.kubectl(
        "get", "pvs", "-n", namespace, "-o", "name").strip() == "")
    burst(kind, namespace, "http://web/hostname", 20)
    answers = steady.stop()
    assert sum(answers.values()) >= 50, answers
    assert answers.get("", 0) == 0, f"requests lost in the handover: {answers}"
