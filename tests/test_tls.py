"""`traboule.tls`: the settings as read from the configuration, subjects and the allow-list, the contexts' profile,
and certificates reloaded (in-memory handshakes between real OpenSSL objects)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from tests.tls_pki import PKI, make_pki
from traboule.adapters.fhir_client import FHIRClient, FHIRServerError
from traboule.app import config
from traboule.app.tls_reload import check_certificates
from traboule.errors import ConfigError
from traboule.tls import (
    CertificateReloader,
    TLSSettings,
    certificate_subject,
    client_context,
    normalise_subject,
    parse_subject,
    server_context,
    subject_allowed,
    subject_of,
    subject_of_name,
)

SPECIAL = ',+"\\<>;='


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def escape(value: str) -> str:
    """A value as written in a subject: special characters escaped, and a leading or trailing blank or leading #."""
    chars = ["\\" + c if c in SPECIAL else c for c in value]
    if chars and chars[0] in (" ", "#"):
        chars[0] = "\\" + chars[0]
    if chars and chars[-1] == " ":
        chars[-1] = "\\ "
    return "".join(chars)


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
    if other != cn:
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
        ({"client_certs": "required"}, "needs the client_ca_file (or ca_file) that signs them"),
        ({"key_password": 1234}, "tls.key_password must be a string$"),  # its value never shown
        ({"allowed_subjects": ["ris.example"], "client_certs": "required", "ca_file": "CA"}, "has no '='"),
        ({"cert_file": "/nowhere/c.pem", "key_file": "/nowhere/k.pem"}, "tls.cert_file /nowhere/c.pem cannot be read"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(pki: PKI, value: Any, error: str) -> None:
    if isinstance(value, dict) and value.get("cert_file") == "CERT":
        value = {"cert_file": str(pki.server.cert)}
    if isinstance(value, dict) and value.get("ca_file") == "CA":
        value = {**value, "ca_file": str(pki.ca)}
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


def test_the_rdn_structure_is_kept() -> None:
    """``+`` joins the attributes of one RDN, ``,`` separates RDNs; an escaped blank belongs to its value."""
    assert parse_subject("CN=ris.example+O=CHU") == ((("CN", "ris.example"), ("O", "CHU")),)
    assert parse_subject(" cn = ris.example ,  o=CHU ") == ((("CN", "ris.example"),), (("O", "CHU"),))
    assert normalise_subject("O=CHU+CN=ris.example") == "CN=ris.example+O=CHU"  # the order inside an RDN is none
    assert normalise_subject("CN=\\ ris.example\\ ") == "CN=\\ ris.example\\ " != normalise_subject("CN=ris.example")
    assert normalise_subject("CN=\\C3\\A9cho,commonName=a,2.5.4.10=b,E=x@y") == "CN=écho,CN=a,O=b,EMAILADDRESS=x@y"
    for broken in ("ris.example", "CN=a,", "CN=a\\q", "CN=\\C3", "=a"):
        with pytest.raises(ValueError):
            parse_subject(broken)
    assert not subject_allowed("CN=ris.example+O=CHU", ["CN=ris.example,O=CHU"])
    assert not subject_allowed("CN=ris.example,O=CHU", ["CN=ris.example+O=CHU"])
    assert subject_allowed("O=CHU+CN=ris.example", ["CN=ris.example+O=CHU"])
    assert not subject_allowed(subject_of(peercert(("commonName", " ris.example "))), ["CN=ris.example"])
    assert subject_allowed(subject_of(peercert(("commonName", " ris.example "))), ["CN=\\ ris.example\\ "])
    # The common name rule: a subject with exactly one common name, that one.
    assert subject_allowed("CN=ris.example,O=CHU", ["CN=ris.example"])
    assert not subject_allowed("CN=ris.example,CN=evil", ["CN=ris.example"])
    assert not subject_allowed("CN=ris.example+CN=evil,O=CHU", ["CN=ris.example"])
    assert not subject_allowed("CN=ris.example+O=CHU", ["CN=ris.example+UID=x"])
    cert = {"subject": ((("countryName", "FR"),), (("commonName", "ris.example"), ("organizationName", "CHU")))}
    assert subject_of(cert) == "CN=ris.example+O=CHU,C=FR"


KINDS = {"CN": "commonName", "O": "organizationName", "OU": "organizationalUnitName", "EMAILADDRESS": "emailAddress"}
tricky = st.lists(st.sampled_from(["a", "b", " ", ",", "+", "\\", "=", "#", "é", "CN=a"]), min_size=1, max_size=6).map(
    "".join
)
attributes = st.lists(st.tuples(st.sampled_from(sorted(KINDS)), tricky), min_size=1, max_size=2)
subjects = st.lists(attributes, min_size=1, max_size=3)


def written(subject: list[list[tuple[str, str]]], pad: str) -> str:
    """A subject as someone writes it in the configuration: escaped values, ``pad`` blanks around separators."""
    join = f"{pad},{pad}"
    return join.join(f"{pad}+{pad}".join(f"{kind}{pad}={pad}{escape(value)}" for kind, value in rdn) for rdn in subject)


def presented(subject: list[list[tuple[str, str]]]) -> str:
    """The subject of a certificate holding it, as the listeners read it (``getpeercert()``, least specific first)."""
    return subject_of({"subject": tuple(tuple((KINDS[k], v) for k, v in rdn) for rdn in reversed(subject))})


def same(a: list[list[tuple[str, str]]], b: list[list[tuple[str, str]]]) -> bool:
    return [sorted(rdn) for rdn in a] == [sorted(rdn) for rdn in b]


@given(subject=subjects, entry=subjects, pad=st.sampled_from(["", " ", "  "]))
def test_an_entry_admits_only_the_subject_it_equals_or_the_one_common_name(
    subject: list[list[tuple[str, str]]], entry: list[list[tuple[str, str]]], pad: str
) -> None:
    """Extra RDNs, multi-valued RDNs, escaped commas and blanks: an entry admits the subject it equals (the same
    RDNs in order, each with the same attributes), or, being a single ``CN``, a subject with exactly that one CN."""
    names = [value for rdn in subject for kind, value in rdn if kind == "CN"]
    cn_rule = len(entry) == 1 and len(entry[0]) == 1 and entry[0][0][0] == "CN" and names == [entry[0][0][1]]
    expected = same(subject, entry) or cn_rule
    assert subject_allowed(presented(subject), [written(entry, pad)]) is expected
    assert subject_allowed(written(subject, pad), [written(entry, pad)]) is expected
    assert normalise_subject(written(subject, pad)) == presented(subject)
    # The same RDNs but one more, or two of them made one multi-valued RDN, are another subject.
    more = [*subject, [("OU", "x")]]
    merged = [subject[0] + subject[1], *subject[2:]] if len(subject) > 1 else None
    for other in (more, merged):
        if other is not None:
            one_cn = [value for rdn in other for kind, value in rdn if kind == "CN"] == [subject[0][0][1]]
            single_cn_entry = len(subject) == 1 and len(subject[0]) == 1 and subject[0][0][0] == "CN"
            assert subject_allowed(presented(other), [written(subject, pad)]) is (single_cn_entry and one_cn)


def issue(
    pki: PKI, folder: Path, name: str, subject: x509.Name, *, server_names: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A certificate of the test CA with this subject (a client one; a server one for ``server_names``)."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.folder / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in server_names]), False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLObject:
    """A handshake between two SSL objects over memory BIOs; the server's side (its ``getpeercert()``)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return server


def test_the_subject_read_from_a_certificate_file_is_the_one_the_peer_shows(tmp_path: Path, pki: PKI) -> None:
    """`certificate_subject` / `subject_of_name` (cryptography) and `subject_of` (``getpeercert()``) agree, with a
    multi-valued RDN, an e-mail address, escaped characters and blanks."""
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CHU, Lyon+Nord")]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, " ris.example "),
                    x509.NameAttribute(NameOID.EMAIL_ADDRESS, "pacs@chu.example"),
                ]
            ),
        ]
    )
    cert, key = issue(pki, tmp_path, "multi", name)
    expected = "CN=\\ ris.example\\ +EMAILADDRESS=pacs@chu.example,O=CHU\\, Lyon\\+Nord,C=FR"
    assert certificate_subject(str(cert)) == subject_of_name(name) == expected
    assert normalise_subject(name.rfc4514_string()) == expected  # cryptography's own string: the same subject
    listener = TLSSettings(
        enabled=True,
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        client_ca_file=str(pki.ca),
        client_certs="required",
    )
    client = TLSSettings(enabled=True, ca_file=str(pki.ca), cert_file=str(cert), key_file=str(key))
    server = handshake(server_context(listener), client_context(client))
    assert subject_of(server.getpeercert()) == expected
    assert not subject_allowed(expected, ["CN=ris.example"])  # its common name has blanks
    assert subject_allowed(expected, ["CN=\\ ris.example\\ +E=pacs@chu.example, O=CHU\\, Lyon\\+Nord, C=FR"])


def test_a_listener_trusts_its_client_ca_file_and_a_client_never_does(tmp_path: Path, pki: PKI) -> None:
    """``client_ca_file``: the CA of a listener's client certificates (``ca_file`` when absent); a client trusts
    its ``ca_file`` for the server (the system's CAs when empty), never a ``client_ca_file``."""
    listener = TLSSettings(
        enabled=True,
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        ca_file=str(pki.other_ca),
        client_ca_file=str(pki.ca),
        client_certs="required",
    )
    assert listener.files() == (str(pki.server.cert), str(pki.server.key), str(pki.ca))
    ris = TLSSettings(enabled=True, ca_file=str(pki.ca), cert_file=str(pki.ris.cert), key_file=str(pki.ris.key))
    stranger = TLSSettings(
        enabled=True, ca_file=str(pki.ca), cert_file=str(pki.stranger.cert), key_file=str(pki.stranger.key)
    )
    assert subject_of(handshake(server_context(listener), client_context(ris)).getpeercert()) == pki.ris.subject
    with pytest.raises(ssl.SSLCertVerificationError):  # the listener refuses it: not of its client CA
        handshake(server_context(listener), client_context(stranger))
    # ca_file alone: the listener's client CA too (one site CA for both).
    alone = replace(listener, ca_file=str(pki.ca), client_ca_file="")
    assert subject_of(handshake(server_context(alone), client_context(ris)).getpeercert()) == pki.ris.subject
    # A client with only a client_ca_file trusts the system's CAs, not that one: the test server is refused.
    only_listener_ca = client_context(TLSSettings(enabled=True, client_ca_file=str(pki.ca)))
    plain = TLSSettings(enabled=True, cert_file=str(pki.server.cert), key_file=str(pki.server.key))
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server_context(plain), only_listener_ca)
    handshake(server_context(plain), client_context(TLSSettings(enabled=True, ca_file=str(pki.ca))))


def test_tls_defaults_of_the_configuration_file_for_listeners_and_clients(tmp_path: Path, pki: PKI) -> None:
    """``[tls] client_ca_file`` reaches the listeners only; ``[tls] ca_file`` is the clients' trust (and the
    listeners' client CA when they have no client_ca_file); ``ca_file = ""`` on a destination: the system's CAs;
    ``[tls] verify`` is refused (per destination only)."""
    path = tmp_path / "traboule.toml"
    path.write_text(
        f'[tls]\ncert_file = "{pki.server.cert}"\nkey_file = "{pki.server.key}"\nclient_ca_file = "{pki.ca}"\n'
        f'[http]\ntls = {{ client_certs = "required" }}\n'
    )
    cfg = config.load(str(path), env={})
    assert cfg.http_tls.client_cas == str(pki.ca)
    assert config.destination_tls({}, "destination", cfg.tls).ca_file == ""  # the system's CAs
    path.write_text(f'[tls]\nca_file = "{pki.ca}"\n')
    cfg = config.load(str(path), env={})
    assert config.destination_tls({}, "destination", cfg.tls).ca_file == str(pki.ca)
    assert config.destination_tls({"tls": {"ca_file": ""}}, "destination", cfg.tls).ca_file == ""
    path.write_text("[tls]\nverify = false\n")
    with pytest.raises(ConfigError, match=r"\[tls\] verify is not a default"):
        config.load(str(path), env={})
    with structlog.testing.capture_logs() as logs:
        off = config.destination_tls({"tls": {"verify": False, "server_name": "dmp.example"}}, "destination", cfg.tls)
        client_context(off)
        client_context(replace(off, verify=True))
    assert [(e["event"], e["log_level"], e["server_name"]) for e in logs] == [
        ("tls.verify_off", "warning", "dmp.example")
    ]


async def test_an_http_client_sends_and_checks_its_server_name(tmp_path: Path, pki: PKI) -> None:
    """``server_name`` of a destination: the name the FHIR client sends (SNI) and checks in the server's
    certificate, connecting to an address the certificate does not name."""
    cert, key = issue(pki, tmp_path, "fhir", x509.Name([]), server_names=("fhir.example",))
    seen: list[str | None] = []
    served = server_context(TLSSettings(enabled=True, cert_file=str(cert), key_file=str(key)))
    served.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]
    body = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ssl.SSLError):
            await reader.readuntil(b"\r\n\r\n")
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=served)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/fhir"
    try:
        named = TLSSettings(enabled=True, ca_file=str(pki.ca), server_name="fhir.example")
        async with FHIRClient(url, timeout=5.0, tls=named) as client:
            assert (await client.search("Patient", {"identifier": "x|y"}))["total"] == 0
            assert (await client.search("Patient", {"identifier": "x|z"}))["total"] == 0
        assert seen[0] == "fhir.example"
        for tls in (TLSSettings(enabled=True, ca_file=str(pki.ca)), replace(named, server_name="other.example")):
            async with FHIRClient(url, timeout=5.0, tls=tls) as client:
                with pytest.raises(FHIRServerError, match=r"CERTIFICATE_VERIFY_FAILED|ConnectError"):
                    await client.search("Patient", {"identifier": "x|y"})
    finally:
        server.close()


def test_a_revoked_client_certificate_is_refused_with_a_crl_file(tmp_path: Path, pki: PKI) -> None:
    """``crl_file`` (listener): a client certificate the CA revoked gets no session; another one still does."""
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.folder / "ca.key").read_bytes(), None)
    revoked = x509.load_pem_x509_certificate(pki.modality.cert.read_bytes())
    now = dt.datetime.now(dt.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + dt.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(revoked.serial_number).revocation_date(now).build()
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    crl_file = tmp_path / "ca.crl.pem"
    crl_file.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    listener = TLSSettings.from_config(
        {"client_certs": "required", "crl_file": str(crl_file)},
        "x",
        TLSSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key), ca_file=str(pki.ca)),
    )
    assert str(crl_file) in listener.files()  # re-read by the reloader when renewed

    def client(pair: Any) -> ssl.SSLContext:
        return client_context(
            TLSSettings(enabled=True, ca_file=str(pki.ca), cert_file=str(pair.cert), key_file=str(pair.key))
        )

    assert subject_of(handshake(server_context(listener), client(pki.ris)).getpeercert()) == pki.ris.subject
    with pytest.raises(ssl.SSLError, match="revoked"):
        handshake(server_context(listener), client(pki.modality))
    assert subject_of(handshake(server_context(replace(listener, crl_file="")), client(pki.modality)).getpeercert())
