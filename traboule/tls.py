"""TLS for every listener and client of the engine: one settings type, one place that builds the contexts.

Every TLS connection of the engine (MLLP listener and sender, the DICOM SCPs, HTTPS, the outbound HTTP clients,
syslog to the audit repository) is configured by a :class:`TLSSettings` and gets its ``ssl.SSLContext`` from
:func:`server_context` or :func:`client_context`, so that the protocol profile is the same everywhere: TLS 1.2 or
later (1.3 on demand), the cipher suites of BCP 195 (RFC 9325: ECDHE or DHE key exchange with an AEAD cipher, as the
DICOM PS3.15 Annex B "BCP 195" profile asks), no compression, no renegotiation.

A listener may ask for client certificates (mutual TLS) signed by its CA, and then admit only the subjects of an
allow-list (:func:`subject_allowed`, checked by the adapter after the handshake). The certificate and key are
re-read without a restart by :class:`CertificateReloader` (the same context object is updated: new connections get
the new certificate, open ones keep theirs).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from traboule.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

log = structlog.get_logger("traboule.tls")

# BCP 195 (RFC 9325 section 4.2): forward secrecy and AEAD only. TLS 1.3 suites are not set by this string (OpenSSL
# enables its AEAD ones).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
CLIENT_CERTS = ("none", "optional", "required")
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_KEYS = {
    "enabled",
    "cert_file",
    "key_file",
    "key_password",
    "ca_file",
    "client_ca_file",
    "crl_file",
    "client_certs",
    "allowed_subjects",
    "min_version",
    "server_name",
    "verify",
}


@dataclass(frozen=True)
class TLSSettings:
    """How one listener or client uses TLS.

    ``cert_file`` / ``key_file`` (PEM): the certificate presented (a listener's server certificate; a client's
    certificate for mutual TLS). ``ca_file`` (client): the CAs trusted for the server's certificate, the system's
    CAs when empty. ``client_ca_file`` (listener): the CAs that sign client certificates; when empty a listener
    takes ``ca_file`` for them (one site CA for both). A client never uses ``client_ca_file``. ``crl_file``
    (listener): PEM CRLs of those CAs, a client certificate they revoke is refused (each CA of client certificates
    needs its CRL then, and an expired CRL refuses every client). ``client_certs``
    (listener): ``none``, ``optional`` or ``required``. ``allowed_subjects`` (listener): client certificate
    subjects admitted, as RFC 4514 strings (``CN=ris.example,O=CHU``) or ``CN=...`` alone; empty: any certificate
    the CA signed. ``server_name`` (client): the name sent (SNI) and checked in the server's certificate when it is
    not the host connected to. ``verify`` (client, per destination only): false only for tests against a
    self-signed peer, never in production.
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    key_password: str = field(default="", repr=False)
    ca_file: str = ""
    client_ca_file: str = ""
    crl_file: str = ""
    client_certs: str = "none"
    allowed_subjects: tuple[str, ...] = ()
    min_version: str = "1.2"
    server_name: str = ""
    verify: bool = True

    @classmethod
    def from_config(cls, value: Any, where: str, base: TLSSettings | None = None) -> TLSSettings:
        """Read a ``tls`` setting: ``true`` (the ``[tls]`` defaults, ``base``), ``false`` / absent, or a table whose
        keys override the defaults. ``where`` names the setting in errors."""
        base = base or cls()
        if value is None or value is False:
            return replace(base, enabled=False)
        if value is True:
            return replace(base, enabled=True)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: tls must be true, false or a table, not {value!r}")
        unknown = sorted(set(value) - _KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown tls setting {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
        values: dict[str, Any] = {"enabled": True}
        for key, raw in value.items():
            if key in ("enabled", "verify"):
                if not isinstance(raw, bool):
                    raise ConfigError(f"{where}: tls.{key} must be true or false, not {raw!r}")
                values[key] = raw
            elif key == "allowed_subjects":
                if not isinstance(raw, list) or not all(isinstance(s, str) and s.strip() for s in raw):
                    raise ConfigError(f"{where}: tls.allowed_subjects must be a list of subjects (CN=...)")
                try:
                    values[key] = tuple(normalise_subject(s) for s in raw)
                except ConfigError as exc:
                    raise ConfigError(f"{where}: tls.allowed_subjects: {exc}") from None
            elif key == "key_password" and not isinstance(raw, str):
                raise ConfigError(f"{where}: tls.key_password must be a string")  # its value is never shown
            elif not isinstance(raw, str):
                raise ConfigError(f"{where}: tls.{key} must be a string, not {raw!r}")
            else:
                values[key] = raw
        settings = replace(base, **values)
        settings.check(where)
        return settings

    def check(self, where: str) -> None:
        """Refuse settings that cannot work (a missing file, an unknown version) at start-up, naming them."""
        if self.client_certs not in CLIENT_CERTS:
            raise ConfigError(f"{where}: tls.client_certs must be one of {', '.join(CLIENT_CERTS)}")
        if self.min_version not in VERSIONS:
            raise ConfigError(f'{where}: tls.min_version must be "1.2" or "1.3", not {self.min_version!r}')
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{where}: tls needs both cert_file and key_file (or neither)")
        if self.allowed_subjects and self.client_certs == "none":
            raise ConfigError(f'{where}: tls.allowed_subjects needs client_certs = "required"')
        if self.client_certs != "none" and not self.client_cas:
            needs = "needs the client_ca_file (or ca_file) that signs them"
            raise ConfigError(f"{where}: tls.client_certs = {self.client_certs!r} {needs}")
        for key in ("cert_file", "key_file", "ca_file", "client_ca_file", "crl_file"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{where}: tls.{key} {path} cannot be read")

    def check_server(self, where: str) -> None:
        """A listener with TLS needs its certificate."""
        if self.enabled and not self.cert_file:
            raise ConfigError(f"{where}: a TLS listener needs tls.cert_file and tls.key_file")

    @property
    def client_cas(self) -> str:
        """A listener's CAs of client certificates: ``client_ca_file``, else ``ca_file``."""
        return self.client_ca_file or self.ca_file

    def files(self) -> tuple[str, ...]:
        """The files a listener's context is made of (watched by :class:`CertificateReloader`)."""
        return tuple(p for p in (self.cert_file, self.key_file, self.client_cas, self.crl_file) if p)


def _harden(ctx: ssl.SSLContext, settings: TLSSettings) -> ssl.SSLContext:
    ctx.minimum_version = VERSIONS[settings.min_version]
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load(ctx: ssl.SSLContext, settings: TLSSettings) -> None:
    """A listener's certificate, the CAs of its client certificates and their CRLs."""
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file or None, settings.key_password or None)
    if settings.client_cas:
        ctx.load_verify_locations(cafile=settings.client_cas)
    if settings.crl_file:  # a renewed CRL loaded next to the previous one: OpenSSL takes the latest issued
        ctx.load_verify_locations(cafile=settings.crl_file)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context of a TLS listener (a server certificate; client certificates as ``client_certs`` says)."""
    settings.check_server("tls")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), settings)
    _load(ctx, settings)
    ctx.verify_mode = {
        "none": ssl.CERT_NONE,
        "optional": ssl.CERT_OPTIONAL,
        "required": ssl.CERT_REQUIRED,
    }[settings.client_certs]
    return ctx


def client_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context of a TLS client (the server's certificate checked against ``ca_file`` or the system's CAs;
    ``client_ca_file`` is a listener's and never trusted here). ``verify = false`` is logged (``tls.verify_off``)."""
    ctx = _harden(ssl.create_default_context(cafile=settings.ca_file or None), settings)
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file or None, settings.key_password or None)
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("tls.verify_off", server_name=settings.server_name)
    return ctx


def http_client_options(settings: TLSSettings) -> dict[str, Any]:
    """The ``httpx.AsyncClient`` arguments of a destination's TLS: ``verify`` (:func:`client_context`) and, with
    ``server_name``, a request hook that makes each request send that name (SNI, httpcore's ``sni_hostname``
    extension), which the server's certificate is then checked against. The client's requests all go to the one
    destination: the name is the same for each."""
    options: dict[str, Any] = {"verify": client_context(settings)}
    if settings.server_name:
        name = settings.server_name

        async def sni(request: Any) -> None:
            request.extensions["sni_hostname"] = name

        options["event_hooks"] = {"request": [sni]}
    return options


# Attribute types: (the name written in a subject, OpenSSL's long name as ``getpeercert()`` gives it, the OID).
_ATTRIBUTES = (
    ("CN", "commonName", "2.5.4.3"),
    ("SN", "surname", "2.5.4.4"),
    ("SERIALNUMBER", "serialNumber", "2.5.4.5"),
    ("C", "countryName", "2.5.4.6"),
    ("L", "localityName", "2.5.4.7"),
    ("ST", "stateOrProvinceName", "2.5.4.8"),
    ("STREET", "streetAddress", "2.5.4.9"),
    ("O", "organizationName", "2.5.4.10"),
    ("OU", "organizationalUnitName", "2.5.4.11"),
    ("TITLE", "title", "2.5.4.12"),
    ("GIVENNAME", "givenName", "2.5.4.42"),
    ("ORGANIZATIONIDENTIFIER", "organizationIdentifier", "2.5.4.97"),
    ("DC", "domainComponent", "0.9.2342.19200300.100.1.25"),
    ("UID", "userId", "0.9.2342.19200300.100.1.1"),
    ("EMAILADDRESS", "emailAddress", "1.2.840.113549.1.9.1"),
)
_BY_OID = {oid: name for name, _, oid in _ATTRIBUTES}
_BY_NAME = {
    **{alias.upper(): name for name, long, _ in _ATTRIBUTES for alias in (name, long)},
    "E": "EMAILADDRESS",
    "EMAIL": "EMAILADDRESS",
    "USERID": "UID",
}
_SPECIAL = ',+"\\<>;='
_HEX = "0123456789abcdefABCDEF"

# A subject as compared: its RDNs most specific first (RFC 4514 order), each a sorted tuple of (TYPE, value) pairs
# (a multi-valued RDN has several; the order inside one does not matter).
RDN = tuple[tuple[str, str], ...]
Subject = tuple[RDN, ...]


def _type_of(written: str) -> str:
    """The type of an attribute as compared: its short name (``CN``, ``EMAILADDRESS``), or its dotted OID."""
    name = written.strip()
    if name.upper().startswith("OID."):
        name = name[4:]
    if name and all(part.isdigit() for part in name.split(".")):
        return _BY_OID.get(name, name)
    if not name or not all(c.isalnum() or c == "-" for c in name):
        raise ConfigError(f"{written.strip()!r} is not an attribute type")
    return _BY_NAME.get(name.upper(), name.upper())


def _type_of_openssl(long_name: str) -> str:
    """The type of a ``getpeercert()`` attribute, given by OpenSSL's long name (or its OID when OpenSSL has none)."""
    known = _BY_NAME.get(long_name.upper())
    if known is not None:
        return known
    try:
        return _type_of(ssl._ASN1Object.fromname(long_name).oid)
    except ValueError:  # OpenSSL does not know it: its name, kept to characters a type may have
        return "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in long_name).upper() or "-"


def parse_subject(subject: str) -> Subject:
    """A subject written as in RFC 4514 (``CN=ris.example,O=CHU\\, Lyon``): RDNs split on unescaped commas, the
    attributes of a multi-valued RDN on unescaped plus signs, types case-insensitive (``cn``, ``commonName``,
    ``2.5.4.3`` are ``CN``), the blanks around separators dropped but an escaped one (``\\ ``) kept, ``\\XX`` hex
    escapes read as UTF-8. `ConfigError` (a ``ValueError``) naming it for what is not a subject."""
    try:
        return _parse(subject)
    except ConfigError as exc:
        raise ConfigError(f"subject {subject!r}: {exc}") from None


def _parse(subject: str) -> Subject:
    rdns: list[RDN] = []
    rdn: list[tuple[str, str]] = []
    name: str | None = None
    value: list[tuple[bytes, bool]] = []  # each character's UTF-8 and whether it was escaped
    text = ""
    i = 0

    def attribute() -> None:
        if name is None:
            raise ConfigError(f"{text.strip()!r} has no '='")
        while value and value[0] == (b" ", False):
            value.pop(0)
        while value and value[-1] == (b" ", False):
            value.pop()
        try:
            decoded = b"".join(part for part, _ in value).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("a hex escape is not UTF-8") from None
        rdn.append((_type_of(name), decoded))

    while i < len(subject):
        char = subject[i]
        if name is None:
            if char == "=":
                name, text = text, text + char
            elif char in ",+":
                raise ConfigError(f"{text.strip()!r} has no '='")
            else:
                text += char
            i += 1
            continue
        if char == "\\":
            pair = subject[i + 1 : i + 3]
            if len(pair) == 2 and all(c in _HEX for c in pair):
                value.append((bytes.fromhex(pair), True))
                i += 3
            elif i + 1 < len(subject) and subject[i + 1] in _SPECIAL + " #":
                value.append((subject[i + 1].encode(), True))
                i += 2
            else:
                raise ConfigError("a backslash escapes nothing it may")
            continue
        if char in ",+":
            attribute()
            if char == ",":
                rdns.append(tuple(sorted(rdn)))
                rdn = []
            name, text, value = None, "", []
        else:
            value.append((char.encode("utf-8"), False))
        i += 1
    attribute()
    rdns.append(tuple(sorted(rdn)))
    return tuple(rdns)


def _escape(value: str) -> str:
    chars = ["\\" + c if c in _SPECIAL else "\\00" if c == "\0" else c for c in value]
    if chars and chars[0] in (" ", "#"):
        chars[0] = "\\" + chars[0]
    if chars and chars[-1] == " ":
        chars[-1] = "\\ "
    return "".join(chars)


def format_subject(subject: Subject) -> str:
    """The one string of a subject (its normal form): ``TYPE=value`` with RFC 4514 escapes (a leading or trailing
    blank escaped), attributes of a multi-valued RDN sorted and joined by ``+``, RDNs by ``,``."""
    return ",".join("+".join(f"{kind}={_escape(value)}" for kind, value in rdn) for rdn in subject)


def normalise_subject(subject: str) -> str:
    """A subject in its normal form (:func:`format_subject` of :func:`parse_subject`): two subjects are the same
    when their normal forms are equal. `ConfigError` for what is not a subject."""
    return format_subject(parse_subject(subject))


def subject_of(peer_cert: Mapping[str, Any] | None) -> str:
    """The subject of a certificate as ``ssl.SSLSocket.getpeercert()`` gives it (RDNs least specific first, each a
    tuple of (long name, value) pairs), in normal form (most specific first); "" when there is none."""
    if not peer_cert:
        return ""
    rdns: Sequence[Sequence[tuple[str, str]]] = peer_cert.get("subject", ())
    subject = tuple(tuple(sorted((_type_of_openssl(kind), value) for kind, value in rdn)) for rdn in reversed(rdns))
    return format_subject(subject)


def subject_of_name(name: x509.Name) -> str:
    """The subject of a certificate as ``cryptography`` reads it (``certificate.subject``), in the normal form of
    :func:`subject_of`."""
    subject = tuple(
        tuple(
            sorted(
                (
                    _BY_OID.get(attribute.oid.dotted_string, attribute.oid.dotted_string),
                    attribute.value if isinstance(attribute.value, str) else attribute.value.hex(),
                )
                for attribute in rdn
            )
        )
        for rdn in reversed(name.rdns)
    )
    return format_subject(subject)


def certificate_subject(cert_file: str) -> str:
    """The subject of the (first) certificate of a PEM file, in the normal form of :func:`subject_of`."""
    from cryptography import x509

    with open(cert_file, "rb") as fh:
        return subject_of_name(x509.load_pem_x509_certificate(fh.read()).subject)


def subject_allowed(subject: str, allowed: Sequence[str]) -> bool:
    """Whether a peer certificate's subject is admitted: any when ``allowed`` is empty; otherwise equal to an entry
    (the same RDNs in the same order, each with the same attributes), or, for an entry of one ``CN=...`` attribute
    alone, a subject holding exactly one common name, that one."""
    if not allowed:
        return True
    if not subject:
        return False
    try:
        rdns = parse_subject(subject)
    except ValueError:
        return False
    names = [value for rdn in rdns for kind, value in rdn if kind == "CN"]
    for entry in allowed:
        try:
            wanted = parse_subject(entry)
        except ValueError:
            continue
        if wanted == rdns:
            return True
        if len(wanted) == 1 and len(wanted[0]) == 1 and wanted[0][0][0] == "CN" and names == [wanted[0][0][1]]:
            return True
    return False


class CertificateReloader:
    """Re-reads a context's certificate, key and CAs when their files change (``check()``, called periodically by
    the engine). The same context object is updated, so a listener started with it serves the new certificate to
    its next connections. A change that cannot be loaded (a key that does not match, a half-written file) keeps the
    previous certificate and is reported by ``check()``'s return value."""

    def __init__(self, ctx: ssl.SSLContext, settings: TLSSettings) -> None:
        self.ctx = ctx
        self.settings = settings
        self._seen = self._stamp()

    def _stamp(self) -> tuple[tuple[float, int], ...]:
        stamps = []
        for path in self.settings.files():
            try:
                st = Path(path).stat()
                stamps.append((st.st_mtime, st.st_size))
            except OSError:
                stamps.append((0.0, -1))
        return tuple(stamps)

    def check(self) -> str | None:
        """Reload when a file changed: returns ``"reloaded"``, an error text, or None (nothing changed)."""
        stamp = self._stamp()
        if stamp == self._seen:
            return None
        try:
            # Into a scratch context first: a key that does not match would leave the served one half-replaced.
            _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), self.settings)
            _load(self.ctx, self.settings)
        except (OSError, ssl.SSLError) as exc:
            return f"{type(exc).__name__}: {exc}"
        self._seen = stamp
        return "reloaded"


# The TLS client certificate subject of the connection being served ("" without TLS or without a certificate): set by
# a listener in the task that serves the connection, read by whatever that connection's handler calls (the audit
# trail names the peer by it).
peer_subject: ContextVar[str] = ContextVar("peer_subject", default="")
