"""A throwaway PKI for the TLS tests, made at run time (no key is ever committed).

``make_pki(folder)`` writes PEM files: a CA, a server certificate for 127.0.0.1 / localhost, client certificates
(``ris`` CN=ris.example, ``modality`` CN=ct01.example), one expired, one signed by another CA, and that other CA.
The ``pki`` fixture (session scope) makes one set per test run.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path
    subject: str  # RFC 4514, most specific RDN first


@dataclass(frozen=True)
class PKI:
    ca: Path
    other_ca: Path
    server: Pair
    ris: Pair
    modality: Pair
    expired: Pair
    stranger: Pair  # signed by other_ca
    server_expired: Pair
    folder: Path

    def issue(self, name: str, cn: str, *, server: bool = False, client_too: bool = False, days: int = 30) -> Pair:
        """Another certificate from the test CA (e.g. a renewed server certificate for the reload test); a server one
        with ``client_too`` may also authenticate as a client (both extended key usages)."""
        return _issue(self.folder, name, cn, self._ca_signer, server=server, client_too=client_too, days=days)

    @property
    def _ca_signer(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), None)
        return x509.load_pem_x509_certificate(self.ca.read_bytes()), key  # type: ignore[return-value]


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _ca(folder: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(folder / f"{name}.key", key)
    return cert, key


def _issue(
    folder: Path,
    name: str,
    cn: str,
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool = False,
    client_too: bool = False,
    days: int = 30,
    expired: bool = False,
) -> Pair:
    ca_cert, ca_key = signer
    key = _key()
    now = dt.datetime.now(dt.UTC)
    start, end = (
        (now - dt.timedelta(days=60), now - dt.timedelta(days=1))
        if expired
        else (
            now - dt.timedelta(days=1),
            now + dt.timedelta(days=days),
        )
    )
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "traboule tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                if server and client_too
                else [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return Pair(cert_path, key_path, f"CN={cn},O=traboule tests")


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    return PKI(
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server=_issue(folder, "server", "localhost", ca, server=True),
        ris=_issue(folder, "ris", "ris.example", ca),
        modality=_issue(folder, "modality", "ct01.example", ca),
        expired=_issue(folder, "expired", "old.example", ca, expired=True),
        stranger=_issue(folder, "stranger", "ris.example", other),
        server_expired=_issue(folder, "server-expired", "localhost", ca, server=True, expired=True),
        folder=folder,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))
