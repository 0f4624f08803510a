"""Manifests and traffic for the kind suite: agnhost backends, a client Pod, policies.

Backends run ``agnhost netexec`` (``/hostname`` answers with the Pod's name); the client is an
agnhost Pod whose curl and dig the tests drive with ``kubectl exec``, so every request
starts inside a Pod's network namespace on the cluster's internal network.
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass
from typing import Any

from kindlib import AGNHOST, Kind


def backends(name: str, replicas: int = 3) -> list[dict[str, Any]]:
    """A Deployment of netexec Pods and its Service (port 80 named http -> 8080)."""
    labels = {"app": name}
    pod = {
        "containers": [{
            "name": "netexec", "image": AGNHOST, "imagePullPolicy": "Never",
            "args": ["netexec", "--http-port=8080", "--udp-port=8081"],
            "ports": [{"containerPort": 8080, "name": "http"}],
            "readinessProbe": {"httpGet": {"path": "/hostname", "port": 8080},
                               "periodSeconds": 1},
        }],
        "terminationGracePeriodSeconds": 1,
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
         "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels}, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
         "spec": {"selector": labels,
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}},
    ]


def client(name: str = "client") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": AGNHOST, "imagePullPolicy": "Never",
                                     "args": ["pause"]}],
                     "terminationGracePeriodSeconds": 1}}


def policy(name: str, service: str, mode: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "svcproxy.io/v1alpha1", "kind": "ServiceProxyPolicy",
            "metadata": {"name": name}, "spec": {"services": [service], "mode": mode, **spec}}


def deploy(kind: Kind, ns: str, service: str = "web", replicas: int = 3) -> None:
    """Backends, Service and client Pod, all Ready."""
    kind.apply([*backends(service, replicas), client()], ns)
    kind.kubectl("rollout", "status", "-n", ns, f"deploy/{service}", "--timeout=180s", timeout=200)
    kind.kubectl("wait", "-n", ns, "--for=condition=Ready", "pod/client", "--timeout=120s",
                 timeout=140)


def wait_programmed(kind: Kind, ns: str, name: str, timeout: int = 120) -> None:
    kind.kubectl("wait", "-n", ns, "--for=condition=Programmed", f"spp/{name}",
                 f"--timeout={timeout}s", timeout=timeout + 20)


def burst(kind: Kind, ns: str, url: str, count: int) -> Counter[str]:
    """``count`` requests from the client Pod; answers by backend name, failures as ''."""
    script = (f"for i in $(seq {count}); do a=$(curl -s -m 3 {url}) || a=; "
              "echo \"answer:$a\"; done")
    out = kind.exec(ns, "client", "sh", "-c", script, timeout=count * 4 + 60)
    return Counter(line[len("answer:"):] for line in out.splitlines() if line.startswith("answer:"))


@dataclass
class Steady:
    """Requests from the client Pod every ``gap`` seconds until ``stop()``; counts answers."""

    kind: Kind
    ns: str
    url: str
    gap: float = 0.05
    proc: subprocess.Popen[str] | None = None

    def start(self) -> Steady:
        script = (f"rm -f /tmp/stop; while [ ! -e /tmp/stop ]; do a=$(curl -s -m 3 {self.url}) "
                  f"|| a=; echo \"answer:$a\"; sleep {self.gap}; done")
        self.proc = subprocess.Popen(
            ["kubectl", "--kubeconfig", str(self.kind.kubeconfig), "exec", "-n", self.ns,
             "client", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def stop(self) -> Counter[str]:
        assert self.proc is not None
        self.kind.exec(self.ns, "client", "touch", "/tmp/stop")
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, f"steady traffic's kubectl exec failed: {err}"
        return Counter(line[len("answer:"):] for line in out.splitlines()
                       if line.startswith("answer:"))
