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
from typing import Any

from traboule.errors import ConfigError

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
    certificate for mutual TLS). ``ca_file``: the CAs trusted for the peer's certificate (a client: the system's
    CAs when empty; a listener: those that sign client certificates). ``client_certs`` (listener): ``none``,
    ``optional`` or ``required``. ``allowed_subjects`` (listener): client certificate subjects admitted, as RFC 4514
    strings (``CN=ris.example,O=CHU``) or ``CN=...`` alone; empty: any certificate the CA signed. ``server_name``
    (client): the name checked in the server's certificate when it is not the host connected to. ``verify``
    (client): false only for tests against a self-signed peer, never in production.
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    key_password: str = field(default="", repr=False)
    ca_file: str = ""
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
                values[key] = tuple(normalise_subject(s) for s in raw)
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
        if self.client_certs != "none" and not self.ca_file:
            raise ConfigError(f"{where}: tls.client_certs = {self.client_certs!r} needs the ca_file that signs them")
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{where}: tls.{key} {path} cannot be read")

    def check_server(self, where: str) -> None:
        """A listener with TLS needs its certificate."""
        if self.enabled and not self.cert_file:
            raise ConfigError(f"{where}: a TLS listener needs tls.cert_file and tls.key_file")

    def files(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.ca_file) if p)


def _harden(ctx: ssl.SSLContext, settings: TLSSettings) -> ssl.SSLContext:
    ctx.minimum_version = VERSIONS[settings.min_version]
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


def _load(ctx: ssl.SSLContext, settings: TLSSettings) -> None:
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file or None, settings.key_password or None)
    if settings.ca_file:
        ctx.load_verify_locations(cafile=settings.ca_file)


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
    """The context of a TLS client (the server's certificate checked against ``ca_file`` or the system's CAs)."""
    ctx = _harden(ssl.create_default_context(cafile=settings.ca_file or None), settings)
    if settings.cert_file:
        ctx.load_cert_chain(settings.cert_file, settings.key_file or None, settings.key_password or None)
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def normalise_subject(subject: str) -> str:
    """A subject as compared: RDNs split on unescaped commas, each ``TYPE=value`` with the type upper-cased and
    blanks around separators removed, in the order given (RFC 4514 writes the most specific RDN first)."""
    return ",".join(_rdns(subject))


def _rdns(subject: str) -> list[str]:
    """The normalised ``TYPE=value`` parts of a subject, split on unescaped commas and plus signs (an escaped one,
    ``\\,``, belongs to its value)."""
    parts, current, escaped = [], [], False
    for char in subject:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char in ",+":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    normal = []
    for part in parts:
        name, _, value = part.strip().partition("=")
        normal.append(f"{name.strip().upper()}={value.strip()}")
    return normal


def subject_of(peer_cert: Mapping[str, Any] | None) -> str:
    """The subject of a certificate as ``ssl.SSLSocket.getpeercert()`` gives it, in RFC 4514 order (most specific
    RDN first), normalised; "" when there is none."""
    if not peer_cert:
        return ""
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "EMAILADDRESS",
             "domainComponent": "DC", "serialNumber": "SERIALNUMBER"}  # fmt: skip
    rdns: Sequence[Sequence[tuple[str, str]]] = peer_cert.get("subject", ())
    parts = []
    for rdn in reversed(rdns):
        for name, value in rdn:
            escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
            parts.append(f"{names.get(name, name)}={escaped}")
    return normalise_subject(",".join(parts))


def subject_allowed(subject: str, allowed: Sequence[str]) -> bool:
    """Whether a peer certificate's subject is admitted: any when ``allowed`` is empty; otherwise equal to an entry,
    or, for an entry of one ``CN=...`` RDN, a subject whose common name is that one."""
    if not allowed:
        return True
    if not subject:
        return False
    rdns = _rdns(subject)
    for entry in allowed:
        wanted = _rdns(entry)
        if wanted == rdns or (len(wanted) == 1 and wanted[0].startswith("CN=") and wanted[0] in rdns):
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
