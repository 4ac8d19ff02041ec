"""`traboule.tls`: the settings as read from the configuration, subjects and the allow-list, the contexts' profile,
and certificates reloaded (in-memory handshakes between real OpenSSL objects)."""

from __future__ import annotations

import contextlib
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from tests.tls_pki import PKI, make_pki
from traboule.app import config
from traboule.app.tls_reload import check_certificates
from traboule.errors import ConfigError
from traboule.tls import (
    CertificateReloader,
    TLSSettings,
    client_context,
    normalise_subject,
    server_context,
    subject_allowed,
    subject_of,
)

SPECIAL = ',+"\\<>;='


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def escape(value: str) -> str:
    return "".join("\\" + c if c in SPECIAL else c for c in value)


def peercert(*rdns: tuple[str, str]) -> dict[str, Any]:
    """What ``getpeercert()`` gives: the RDNs from the least specific (C, O) to the most (CN)."""
    return {"subject": tuple(((name, value),) for name, value in rdns)}


def test_subjects_are_normalised_and_read_most_specific_first() -> None:
    assert normalise_subject(" cn = ris.example ,  o=CHU Lyon ") == "CN=ris.example,O=CHU Lyon"
    assert normalise_subject("CN=Dupont\\, Jean,O=CHU") == "CN=Dupont\\, Jean,O=CHU"  # an escaped comma stays
    cert = peercert(("countryName", "FR"), ("organizationName", "CHU, Lyon"), ("commonName", "ris.example"))
    assert subject_of(cert) == "CN=ris.example,O=CHU\\, Lyon,C=FR"
    assert subject_of(None) == subject_of({}) == ""


def test_the_allow_list() -> None:
    subject = "CN=ris.example,O=traboule tests"
    assert subject_allowed(subject, [])  # no list: whatever the CA signed
    assert subject_allowed(subject, ["cn=ris.example"])  # a common name alone
    assert subject_allowed(subject, ["CN=ris.example, O=traboule tests"])  # the whole subject
    assert not subject_allowed(subject, ["CN=ris"])
    assert not subject_allowed(subject, ["O=traboule tests"])  # only a CN entry stands for a subject holding it
    assert not subject_allowed(subject, ["CN=ris.example,O=other"])
    assert not subject_allowed("", ["CN=ris.example"])  # no certificate
    assert not subject_allowed("CN=evil,O=x\\,CN=ris.example", ["CN=ris.example"])  # an escaped comma is no RDN


values = st.text(st.characters(blacklist_categories=["Cc", "Cs"]), min_size=1, max_size=30).filter(str.strip)


@given(cn=values, organisation=values, other=values)
def test_a_certificate_is_admitted_by_its_common_name_or_subject_and_by_nothing_else(
    cn: str, organisation: str, other: str
) -> None:
    subject = subject_of(peercert(("organizationName", organisation), ("commonName", cn)))
    assert normalise_subject(subject) == subject
    assert subject_allowed(subject, [f"CN={escape(cn)}"])
    assert subject_allowed(subject, [f"CN={escape(cn)},O={escape(organisation)}"])
    if other.strip() != cn.strip():
        assert not subject_allowed(subject, [f"CN={escape(other)}"])
        assert not subject_allowed(subject, [f"CN={escape(other)},O={escape(organisation)}"])


def test_settings_from_the_configuration(pki: PKI) -> None:
    base = TLSSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), ca_file=str(pki.ca))
    assert TLSSettings.from_config(None, "x", base).enabled is False
    assert TLSSettings.from_config(False, "x", base).enabled is False
    on = TLSSettings.from_config(True, "x", base)
    assert on.enabled and on.cert_file == base.cert_file
    table = TLSSettings.from_config(
        {"client_certs": "required", "allowed_subjects": ["cn = ris.example"], "min_version": "1.3"}, "x", base
    )
    assert table.enabled and table.ca_file == str(pki.ca) and table.allowed_subjects == ("CN=ris.example",)
    assert server_context(table).minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("yes", "tls must be true, false or a table"),
        ({"cert": "a.pem"}, "unknown tls setting 'cert'"),
        ({"verify": "no"}, "tls.verify must be true or false"),
        ({"client_certs": "always"}, "tls.client_certs must be one of none, optional, required"),
        ({"min_version": "1.1"}, 'tls.min_version must be "1.2" or "1.3"'),
        ({"cert_file": "CERT"}, "needs both cert_file and key_file"),
        ({"allowed_subjects": ["CN=a"]}, 'allowed_subjects needs client_certs = "required"'),
        ({"allowed_subjects": "CN=a", "client_certs": "required"}, "must be a list of subjects"),
        ({"client_certs": "required"}, "needs the ca_file that signs them"),
        ({"cert_file": "/nowhere/c.pem", "key_file": "/nowhere/k.pem"}, "tls.cert_file /nowhere/c.pem cannot be read"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(pki: PKI, value: Any, error: str) -> None:
    if isinstance(value, dict) and value.get("cert_file") == "CERT":
        value = {"cert_file": str(pki.server.cert)}
    with pytest.raises(ConfigError, match="^channel x: source: .*" + error.replace("(", r"\(").replace(")", r"\)")):
        TLSSettings.from_config(value, "channel x: source", TLSSettings())
    with pytest.raises(ConfigError, match=r"a TLS listener needs tls\.cert_file"):
        TLSSettings.from_config(True, "x").check_server("x")


def test_the_tls_table_of_the_configuration_file(tmp_path: Path, pki: PKI) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text(f'[tls]\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\nreload_interval = "5m"\n')
    cfg = config.load(str(path), env={})
    assert cfg.tls.cert_file == str(pki.server.cert) and not cfg.tls.enabled  # defaults, not TLS by themselves
    assert cfg.tls_reload_interval == 300
    assert config.load(None, env={}).tls_reload_interval == 60
    path.write_text("[tls]\nreload_interval = 0\n")
    with pytest.raises(ConfigError, match="reload_interval must be above 0"):
        config.load(str(path), env={})


def test_contexts_follow_bcp_195(pki: PKI) -> None:
    settings = TLSSettings(enabled=True, cert_file=str(pki.server.cert), key_file=str(pki.server.key))
    for ctx in (server_context(settings), client_context(TLSSettings(enabled=True, ca_file=str(pki.ca)))):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        suites = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert suites and all(("GCM" in s or "CHACHA20" in s) and "DHE" in s for s in suites), suites
    assert client_context(TLSSettings(enabled=True, ca_file=str(pki.ca))).verify_mode == ssl.CERT_REQUIRED


def served(ctx: ssl.SSLContext, pki: PKI) -> bytes:
    """The certificate a server context presents: a handshake between two SSL objects over memory BIOs."""
    client_ctx = client_context(TLSSettings(enabled=True, ca_file=str(pki.ca)))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cert = client.getpeercert(binary_form=True)
    assert cert is not None
    return cert


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_the_reloader_keeps_the_old_certificate_until_a_matching_pair_is_there(tmp_path: Path, pki: PKI) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    settings = TLSSettings(enabled=True, cert_file=str(cert), key_file=str(key))
    ctx = server_context(settings)
    reloaders = {"orders": CertificateReloader(ctx, settings)}
    assert reloaders["orders"].check() is None  # nothing changed
    renewed = pki.issue("renewed-unit", "localhost", server=True)
    with structlog.testing.capture_logs() as logs:
        shutil.copy(renewed.key, key)  # the key first: it does not match the certificate still there
        check_certificates(reloaders)
        assert served(ctx, pki) == der(pki.server.cert)
        shutil.copy(renewed.cert, cert)
        check_certificates(reloaders)
        assert served(ctx, pki) == der(renewed.cert)
        check_certificates(reloaders)  # no change since: nothing logged
    assert [(e["event"], e["listener"]) for e in logs] == [("tls.reload_failed", "orders"), ("tls.reloaded", "orders")]
    assert "SSLError" in logs[0]["error"] and logs[1]["files"] == [str(cert), str(key)]
    cert.write_text("half written")
    assert "SSLError" in (reloaders["orders"].check() or "")
    assert served(ctx, pki) == der(renewed.cert)
