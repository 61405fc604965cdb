"""The control plane's keys and certificates (a CA, servers' and clients' certificates, the service-account key pair)
and the kubeconfigs made from them, as kubeadm lays them out but in one directory."""
from __future__ import annotations

import base64
import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""
    cert: Path
    key: Path


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      *(x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in organizations)])


class Authority:
    """A CA in `directory`: issues ECDSA P-256 certificates (fast to make), each written as <name>.crt/.key."""

    def __init__(self, directory: Path, common_name: str = "cxygpt-dev-ca"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pair = self._write("ca", self.cert, self.key)

    def _write(self, name: str, cert: x509.Certificate, key) -> Pair:
        pair = Pair(self.directory / f"{name}.crt", self.directory / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(_pem_key(key))
        pair.key.chmod(0o600)
        return pair

    def issue(self, name: str, common_name: str, *, organizations: tuple[str, ...] = (), hosts: tuple[str, ...] = (),
              client: bool = False, server: bool = False) -> Pair:
        """A certificate for `common_name` (a user for the API server: groups are `organizations`); `hosts` are its
        DNS names and IP addresses as a server."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [*([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []),
                  *([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])]
        builder = (x509.CertificateBuilder().subject_name(_name(common_name, organizations))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if hosts:
            names = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return self._write(name, builder.sign(self.key, hashes.SHA256()), key)


def service_account_keys(directory: Path) -> Pair:
    """The key pair that signs service-account tokens (sa.key) and verifies them (sa.pub)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pair = Pair(Path(directory) / "sa.pub", Path(directory) / "sa.key")
    pair.cert.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    pair.key.write_bytes(_pem_key(key))
    pair.key.chmod(0o600)
    return pair


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, ca: Path, *, user: str, client: Pair | None = None,
                     token: str | None = None) -> Path:
    """A kubeconfig with everything embedded (it stays valid wherever it is copied): the server, its CA, and a
    client certificate or a bearer token."""
    credentials = ({"client-certificate-data": _b64(client.cert), "client-key-data": _b64(client.key)} if client
                   else {"token": token})
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "cxygpt-dev",
              "clusters": [{"name": "cxygpt-dev", "cluster": {"server": server,
                                                              "certificate-authority-data": _b64(ca)}}],
              "users": [{"name": user, "user": credentials}],
              "contexts": [{"name": "cxygpt-dev", "context": {"cluster": "cxygpt-dev", "user": user}}]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
