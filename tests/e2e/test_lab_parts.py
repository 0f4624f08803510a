"""The lab's pure parts, without root or a cluster: PKI, Pod address book, probes, echo HTTP.

These run first and fast, so a broken certificate or allocator shows up as
itself rather than as a lab that never becomes Ready.
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from svcproxy_lab.echo import Echo
from svcproxy_lab.kubelet import is_echo, parse_probe
from svcproxy_lab.pki import Pki
from svcproxy_lab.podnet import Ipam, PodNetError, netns_name, veth_name


def _user_cert(kubeconfig: Path) -> x509.Certificate:
    doc = yaml.safe_load(kubeconfig.read_text())
    data = base64.b64decode(doc["users"][0]["user"]["client-certificate-data"])
    return x509.load_pem_x509_certificate(data)


def test_pki_serving_cert_sans_and_client_identities(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure(["node-1", "node-2"])
    serving = x509.load_pem_x509_certificate(pki.serving_cert.read_bytes())
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "172.29.0.1", "10.0.2.2", "10.96.0.1"}
    assert {"localhost", "kubernetes.default.svc"} <= set(sans.get_values_for_type(x509.DNSName))
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    serving.verify_directly_issued_by(ca)

    node = _user_cert(pki.kubeconfig("node-2"))
    node.verify_directly_issued_by(ca)
    cn = node.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = [a.value for a in node.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    assert (cn, orgs) == ("system:node:node-2", ["system:nodes"])
    usage = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    proxy = _user_cert(pki.kubeconfig("kube-proxy"))
    assert proxy.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:kube-proxy"
    servers = {u: yaml.safe_load(pki.kubeconfig(u).read_text())["clusters"][0]["cluster"]["server"]
               for u in ("admin", "node-1", "admin-node")}
    assert servers == {"admin": "https://127.0.0.1:6443", "node-1": "https://172.29.0.1:6443",
                       "admin-node": "https://172.29.0.1:6443"}

    # A second ensure keeps what exists (kubeconfigs handed out stay valid) and adds nodes.
    before = pki.kubeconfig("node-1").read_bytes()
    pki.ensure(["node-1", "node-2", "node-3"])
    assert pki.kubeconfig("node-1").read_bytes() == before
    assert pki.kubeconfig("node-3").exists()


def test_ipam_keeps_addresses_across_restarts_and_skips_gateway_and_client(
    tmp_path: Path,
) -> None:
    ipam = Ipam(tmp_path / "ipam.json", "10.244.2.0/24")
    first = [ipam.allocate(f"uid-{i}") for i in range(249)]
    assert first[0] == "10.244.2.2"
    assert len(set(first)) == 249
    hosts = {int(ipaddress.ip_address(ip).packed[3]) for ip in first}
    assert hosts == set(range(2, 251))  # never .1 (gateway) nor .254 (client namespace)
    again = Ipam(tmp_path / "ipam.json", "10.244.2.0/24")  # a restarted kubelet
    assert again.allocate("uid-7") == first[7]
    again.release("uid-7")
    assert again.allocate("uid-new") == first[7]  # the only free address
    with pytest.raises(PodNetError):
        again.allocate("one-too-many")


def test_ipam_does_not_hand_a_released_address_out_at_once(tmp_path: Path) -> None:
    ipam = Ipam(tmp_path / "ipam.json", "10.244.1.0/24")
    a = ipam.allocate("a")
    ipam.release("a")
    b = ipam.allocate("b")
    assert (a, b) == ("10.244.1.2", "10.244.1.3")
    assert Ipam(tmp_path / "ipam.json", "10.244.1.0/24").allocate("c") == "10.244.1.4"


def test_names_fit_linux_limits() -> None:
    uid = "0b59ebb4-2253-4b02-b992-773534ec9e9c"
    assert len(veth_name(uid)) <= 15
    assert netns_name(12, uid) == f"svcp-p12-{uid}"


def test_readiness_probe_parsing_resolves_named_ports() -> None:
    pod = {"spec": {"containers": [{
        "name": "c", "image": "svcproxy.io/echo:1",
        "ports": [{"name": "web", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "web"},
                           "periodSeconds": 2, "failureThreshold": 5},
    }]}}
    probe = parse_probe(pod)
    assert probe is not None
    assert (probe.kind, probe.port, probe.path, probe.period, probe.failure_threshold) == (
        "http", 8080, "/healthz", 2.0, 5)
    assert is_echo("svcproxy.io/echo:1") and is_echo("svcproxy.io/echo")
    assert not is_echo("svcproxy.io/echoes") and not is_echo("nginx")


def test_echo_http_answers_and_readiness_switches(tmp_path: Path) -> None:
    marker = tmp_path / "unready"
    echo = Echo("web-1", marker)
    peer = ("10.244.1.254", 40000)
    ok = echo.http(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", peer)
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
    assert ok.endswith(b"\r\n\r\nweb-1 10.244.1.254:40000\n")
    assert echo.http(b"GET /healthz HTTP/1.1\r\n\r\n", peer).startswith(b"HTTP/1.1 200")
    echo.http(b"POST /admin/ready?value=false HTTP/1.1\r\n\r\n", peer)
    assert echo.http(b"GET /healthz HTTP/1.1\r\n\r\n", peer).startswith(b"HTTP/1.1 503")
    echo.http(b"POST /admin/ready?value=true HTTP/1.1\r\n\r\n", peer)
    assert echo.ready
    marker.touch()
    assert echo.http(b"GET /healthz HTTP/1.1\r\n\r\n", peer).startswith(b"HTTP/1.1 503")
