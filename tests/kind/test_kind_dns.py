"""CoreDNS in the kind cluster answers for Services svcproxy proxies, and the kubelet's
Service environment variables name the program's virtual IP."""

from __future__ import annotations

from kindlib import Kind
from workload import burst, client, deploy, policy, wait_programmed


def _dig(kind: Kind, ns: str, *args: str) -> list[str]:
    out = kind.exec(ns, "client", "dig", "+short", "+time=2", "+tries=2", *args)
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_names_resolve_and_reach_the_service_in_each_mode(kind: Kind, namespace: str) -> None:
    deploy(kind, namespace)
    kind.apply([policy("web", "web", "iptables")], namespace)
    wait_programmed(kind, namespace, "web")
    vip = kind.json("get", "svc", "-n", namespace, "web")["spec"]["clusterIP"]
    fqdn = f"web.{namespace}.svc.cluster.local"
    assert _dig(kind, namespace, fqdn, "A") == [vip]
    srv = _dig(kind, namespace, f"_http._tcp.{fqdn}", "SRV")
    assert len(srv) == 1 and srv[0].split()[2:] == ["80", f"{fqdn}."], srv
    # The short name through the Pod's search path (dig ignores it; getent does not).
    short = kind.exec(namespace, "client", "getent", "hosts", "web").split()
    assert short[0] == vip, short
    for mode in ("iptables", "userspace"):
        kind.kubectl("patch", "spp", "-n", namespace, "web", "--type=merge",
                     "-p", f'{{"spec": {{"mode": "{mode}"}}}}')
        kind.wait(f"{mode} program", lambda m=mode: kind.json(
            "get", "pvs", "-n", namespace, "web")["spec"]["mode"] == m)
        wait_programmed(kind, namespace, "web")
        for url in (f"http://{fqdn}/hostname", "http://web/hostname"):
            answers = burst(kind, namespace, url, 10)
            assert answers.get("", 0) == 0 and len(answers) >= 2, (mode, url, answers)


def test_external_name_is_a_cname_and_gets_no_program(kind: Kind, namespace: str) -> None:
    kind.apply([client(),
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
                 "spec": {"type": "ExternalName", "externalName": "web.example.test"}},
                policy("ext", "ext", "iptables")], namespace)
    kind.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/client",
                 "--timeout=120s", timeout=140)
    cname = _dig(kind, namespace, f"ext.{namespace}.svc.cluster.local", "CNAME")
    assert cname == ["web.example.test."]
    kind.wait("the policy's status", lambda: kind.json("get", "spp", "-n", namespace, "ext")
              .get("status"))
    assert kind.kubectl("get", "pvs", "-n", namespace, "-o", "name").strip() == ""


def test_service_environment_variables_name_the_program_vip(kind: Kind, namespace: str) -> None:
    deploy(kind, namespace)  # the client Pod is made with the Service, so it may miss it
    kind.apply([policy("web", "web", "iptables")], namespace)
    wait_programmed(kind, namespace, "web")
    later = client("later")
    kind.apply([later], namespace)
    kind.kubectl("wait", "-n", namespace, "--for=condition=Ready", "pod/later",
                 "--timeout=120s", timeout=140)
    env = dict(line.split("=", 1) for line in
               kind.exec(namespace, "later", "env").splitlines() if "=" in line)
    pvs = kind.json("get", "pvs", "-n", namespace, "web")
    vips = {vs["address"] for vs in pvs["spec"]["virtualServers"]}
    assert env["WEB_SERVICE_HOST"] in vips
    assert env["WEB_SERVICE_PORT"] == "80" and env["WEB_SERVICE_PORT_HTTP"] == "80"
    host = env["WEB_SERVICE_HOST"]
    assert env["WEB_PORT"] == f"tcp://{host}:80"
    assert env["WEB_PORT_80_TCP_ADDR"] == host and env["WEB_PORT_80_TCP_PROTO"] == "tcp"
