"""Certificates and keys for one control plane, made fresh at each start (ECDSA: milliseconds).

One CA signs the apiserver's serving certificate (for 127.0.0.1 and the in-cluster names) and a
client certificate per component; the RBAC bootstrap policy knows the components by these names
(Kueue's by the ClusterRoleBinding the harness makes for it). `issue_serving()` signs more serving
certificates later, for 127.0.0.1 (Kueue's webhook server). A separate key pair signs
service-account tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Client identities: file stem -> (common name, organisation). system:masters bypasses RBAC.
CLIENTS = {
    "admin": ("idpo-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "node-agent": ("idpo-node-agent", "system:masters"),  # manages several Nodes and the PVs
    "kubelet-client": ("kube-apiserver-kubelet-client", None),  # the apiserver, calling the node agent
    "kueue": ("kueue-controller-manager", None),  # bound to Kueue's own ClusterRoles (kueuesetup.py)
}
SERVING_NAMES = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str, org: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        parts.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(parts)


@dataclass
class Pair:
    cert: Path
    key: Path


class PKI:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = _key()
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        self._not_before, self._not_after = now, now + dt.timedelta(days=7)
        ca_cert = (
            self._builder(_name("idpo-test-ca"), self._ca_key.public_key())
            .issuer_name(_name("idpo-test-ca"))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(CA_USAGE, critical=True)
            .sign(self._ca_key, hashes.SHA256())
        )
        self._ca_cert = ca_cert
        self.ca = self._write("ca", ca_cert, self._ca_key).cert
        self.serving = self._issue("apiserver", _name("kube-apiserver"), server=True)
        self.kubelet_serving = self._issue("kubelet", _name("idpo-node-agent"), server=True)
        self.clients = {stem: self._issue(stem, _name(cn, org)) for stem, (cn, org) in CLIENTS.items()}
        sa_key = _key()
        self.sa_key = folder / "sa.key"
        self.sa_key.write_bytes(_pem_key(sa_key))
        self.sa_pub = folder / "sa.pub"
        self.sa_pub.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def issue_serving(self, stem: str, common_name: str) -> Pair:
        """A serving certificate for 127.0.0.1 (and localhost), signed by the plane's CA."""
        return self._issue(stem, _name(common_name), server=True)

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
        )

    def _issue(self, stem: str, subject: x509.Name, server: bool = False) -> Pair:
        key = _key()
        builder = self._builder(subject, key.public_key()).issuer_name(self._ca_cert.subject)
        if server:
            sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            sans += [x509.DNSName(n) for n in SERVING_NAMES]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return self._write(stem, builder.sign(self._ca_key, hashes.SHA256()), key)

    def _write(self, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pair:
        pair = Pair(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(_pem_key(key))
        pair.key.chmod(0o600)
        return pair

    def kubeconfig(self, server: str, user: str, *, token: str | None = None) -> dict[str, Any]:
        """A kubeconfig for `server`: with a client certificate of CLIENTS, or with a bearer token."""

        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        credentials: dict[str, str]
        if token is not None:
            credentials = {"token": token}
        else:
            pair = self.clients[user]
            credentials = {"client-certificate-data": b64(pair.cert), "client-key-data": b64(pair.key)}
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "idpo-local", "cluster": {"server": server, "certificate-authority-data": b64(self.ca)}}
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": "idpo-local", "context": {"cluster": "idpo-local", "user": user}}],
            "current-context": "idpo-local",
        }


def write_kubeconfig(path: Path, config: dict[str, Any]) -> Path:
    """Written whole or not at all: a reader polling for the file never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
