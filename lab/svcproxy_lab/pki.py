"""Certificates, keys and kubeconfigs of a lab, made with the ``cryptography`` package.

Called by ``cluster.py`` before the control plane starts. Everything lives in
``<state>/pki`` and is made once: a later ``lab up`` reuses it, so kubeconfigs
handed out earlier keep working. One CA signs the API server's serving
certificate and every client certificate; the service-account key pair signs
tokens. Kubeconfigs embed their certificates, so they can be copied into a
user-mode-linux guest as they are.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVING_IPS = ("127.0.0.1", "172.29.0.1", "10.0.2.2", "10.96.0.1")
SERVING_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
LOCAL_API = "https://127.0.0.1:6443"
NODE_API = "https://172.29.0.1:6443"
_VALID = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class ClientIdentity:
    """A kubeconfig user: file stem, certificate CN and groups, and the server it talks to."""

    user: str
    common_name: str
    groups: tuple[str, ...]
    server: str


def identities(node_names: list[str]) -> list[ClientIdentity]:
    fixed = [
        ClientIdentity("admin", "svcproxy-lab-admin", ("system:masters",), LOCAL_API),
        # The same admin, for processes inside nodes, where 127.0.0.1 is the node itself.
        ClientIdentity("admin-node", "svcproxy-lab-admin", ("system:masters",), NODE_API),
        ClientIdentity("controller-manager", "system:kube-controller-manager", (), LOCAL_API),
        ClientIdentity("scheduler", "system:kube-scheduler", (), LOCAL_API),
        ClientIdentity("kube-proxy", "system:kube-proxy", ("system:nodes",), NODE_API),
    ]
    nodes = [
        ClientIdentity(n, f"system:node:{n}", ("system:nodes",), NODE_API) for n in node_names
    ]
    return fixed + nodes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _name(common_name: str, groups: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class Pki:
    """The lab's PKI in ``directory``; :meth:`ensure` makes whatever is missing."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_cert = directory / "ca.crt"
        self.ca_key = directory / "ca.key"
        self.serving_cert = directory / "apiserver.crt"
        self.serving_key = directory / "apiserver.key"
        self.sa_key = directory / "sa.key"
        self.sa_pub = directory / "sa.pub"

    def kubeconfig(self, user: str) -> Path:
        return self.dir / f"{user}.kubeconfig"

    def ensure(self, node_names: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            self._make_ca()
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        if not self.serving_cert.exists():
            self._make_serving(ca_cert, ca_key)
        if not self.sa_key.exists():
            key = _key()
            _write(self.sa_key, _key_pem(key), private=True)
            pub = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            _write(self.sa_pub, pub)
        for ident in identities(node_names):
            if not self.kubeconfig(ident.user).exists():
                self._make_kubeconfig(ident, ca_cert, ca_key)

    def _make_ca(self) -> None:
        key = _key()
        name = _name("svcproxy-lab-ca")
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write(self.ca_key, _key_pem(key), private=True)
        _write(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM))

    def _sign(
        self,
        *,
        ca_cert: x509.Certificate,
        ca_key: ec.EllipticCurvePrivateKey,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName] | None = None,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _make_serving(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        key = _key()
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVING_IPS
        ]
        sans += [x509.DNSName(d) for d in SERVING_DNS]
        cert = self._sign(
            ca_cert=ca_cert, ca_key=ca_key, subject=_name("kube-apiserver"), key=key,
            usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans,
        )
        _write(self.serving_key, _key_pem(key), private=True)
        _write(self.serving_cert, cert.public_bytes(serialization.Encoding.PEM))

    def _make_kubeconfig(
        self, ident: ClientIdentity, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
    ) -> None:
        key = _key()
        cert = self._sign(
            ca_cert=ca_cert, ca_key=ca_key, subject=_name(ident.common_name, ident.groups),
            key=key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        config = kubeconfig_document(
            server=ident.server,
            ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_key_pem(key),
            user=ident.user,
        )
        _write(self.kubeconfig(ident.user), yaml.safe_dump(config).encode(), private=True)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig_document(
    *, server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str
) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "svcproxy-lab",
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": _b64(cert_pem),
                    "client-key-data": _b64(key_pem),
                },
            }
        ],
        "contexts": [{"name": "svcproxy-lab", "context": {"cluster": "svcproxy-lab", "user": user}}],
        "current-context": "svcproxy-lab",
    }
