"""What every DICOM SCP of the engine shares: one pynetdicom AE built once, a non-blocking server, TCP_NODELAY
on each association, pynetdicom's identifier logging switched off (it would print patient data), and the limits
that keep one hostile, broken or merely silent peer from locking the others out (`SCPLimits`).

Subclasses name their presentation contexts and event handlers; the lifecycle is here.

What bounds a connection in pynetdicom 3 (read in its dul.py, association.py, acse.py, transport.py): every
accepted TCP connection gets an Association thread and a DUL thread at once, and counts toward
``maximum_associations`` (checked when its A-ASSOCIATE-RQ arrives: "local limit exceeded") even before it sends
anything. A connection that never sends its A-ASSOCIATE-RQ is closed when the ARTIM timer (PS3.8 9.1.5, set to
``acse_timeout``) expires; an established one that goes quiet, after ``network_timeout``. A PDU that stops halfway
is not covered by either: the DUL thread blocks in ``recv`` with no timeout, for ever, so the socket gets one here
(``acse_timeout`` until the association is accepted, ``network_timeout`` after).

DICOM TLS (PS3.15 Annex B, the BCP 195 profile): given a server ``ssl.SSLContext`` (`traboule.tls.server_context`),
the listener speaks TLS only. pynetdicom's own server does the handshake in its accepting thread, with no time bound:
one peer that connects and stays silent would stop every other connection. Here the accepting thread only wraps the
socket; the handshake runs in the connection's own thread, bounded by ``tls_handshake_timeout``. A client
certificate subject outside ``allowed_subjects`` is refused before any DICOM byte is read; a calling AE title bound
to a subject by ``ae_certificates`` is answered A-ASSOCIATE-RJ (permanent, calling AE title not recognised) when the
certificate shown is not that subject's. Each refusal is logged; those for the client certificate (none returned, not
verified, subject not allowed, AE title bound to another) are handed to ``on_peer_refused`` too. A peer address
opening connections faster than ``max_handshakes_per_second`` (after a ``handshake_burst``) has the next ones closed
on accept, before their handshake and their thread.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, fields
from typing import Any

import structlog
from pydicom import config as pydicom_config
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from traboule.adapters.mllp import NO_CERTIFICATE, NO_CERTIFICATE_REASONS, SUBJECT_NOT_ALLOWED, AcceptRate
from traboule.errors import ConfigError
from traboule.tls import TLSSettings, normalise_subject, subject_allowed, subject_of

# pynetdicom's DUL thread polls its socket and queues every `_run_loop_delay` seconds (1 ms) when idle: measured
# 0.15 of a core for 12 connections that never send anything, 1.2 cores (of this machine's 2) for 64. Polling every
# 10 ms until the A-ASSOCIATE-RQ arrives: 0.035 and 0.12. The price is paid once per association, about 20 ms to
# read the request (echoscu 68 -> 88 ms median); from then on the default is restored, since the A-ASSOCIATE-AC
# and each C-FIND response PDU go through that loop.
_POLL_BEFORE_ASSOCIATION = 0.01
_POLL_ASSOCIATED = 0.001  # pynetdicom's DULServiceProvider default
_REFUSAL_LOG_INTERVAL = 10.0  # seconds: one log line per refused peer per interval, however hard it tries


@dataclass(frozen=True)
class SCPLimits:
    """What one DICOM SCP grants its callers; the settings of its ``mwl-scp`` / ``mpps-scp`` entry.

    Defaults are sized for a department of about a hundred modalities, of which a few dozen may query at once.
    """

    max_associations: int = 64  # open associations (and connections not yet associated): "local limit exceeded"
    max_associations_per_peer: int = 32  # open connections from one IP address: more are closed at once
    acse_timeout: float = 30.0  # seconds to send the A-ASSOCIATE-RQ (ARTIM) or answer an A-RELEASE
    dimse_timeout: float = 30.0  # seconds to wait for a DIMSE message
    network_timeout: float = 30.0  # seconds an association may stay silent, or a PDU stall mid-way
    max_message_bytes: int = 4 * 1024 * 1024  # one DIMSE message (command + data set), all its PDUs together
    tls_handshake_timeout: float = 10.0  # seconds a TLS peer has to complete its handshake
    # TLS: connections taken on from one IP address a second, and at once after a quiet spell; more are closed on
    # accept, before their handshake (each costs CPU and a thread before the peer's certificate is known).
    max_handshakes_per_second: float = 20.0
    handshake_burst: int = 40

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], where: str) -> SCPLimits:
        """The limits set in a channel's SCP entry (the others keep their default); ValueError names a bad one."""
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name not in entry:
                continue
            raw, kind = entry[spec.name], type(spec.default)
            try:
                number = 0 if isinstance(raw, bool) else kind(raw)
            except (TypeError, ValueError):
                number = 0
            if number <= 0:
                raise ValueError(f"{where}: {spec.name} must be a positive {kind.__name__}, not {raw!r}")
            values[spec.name] = number
        return cls(**values)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association: its calling AE title (empty before its A-ASSOCIATE-RQ), IP
    address and TLS client certificate subject (RFC 4514, "" without TLS or without a certificate)."""

    ae_title: str
    address: str
    cert_subject: str = ""


def peer_of(assoc: Any) -> Peer:
    """The peer of a pynetdicom association (acceptor side)."""
    primitive = getattr(assoc.requestor, "primitive", None)
    calling = getattr(primitive, "calling_ae_title", None) or assoc.requestor.ae_title or ""
    if isinstance(calling, bytes):
        calling = calling.decode("ascii", "replace")
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    address = ""
    with suppress(Exception):
        address = str(assoc.requestor.address or "")
    return Peer(str(calling).strip(), address, getattr(sock, "traboule_subject", ""))


PeerRefused = Callable[[Peer, str], None]  # (the peer, a fixed reason text)


@dataclass(frozen=True)
class SCPSecurity:
    """The TLS of one SCP entry: ``tls = true | { ... }`` (`traboule.tls.TLSSettings`, over the ``[tls]``
    defaults) and ``ae_certificates = { CT01 = "CN=ct01.example" }`` (a calling AE title → the subject its client
    certificate must have; AE titles not listed are not bound)."""

    tls: TLSSettings = field(default_factory=TLSSettings)
    ae_certificates: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], where: str, base: TLSSettings | None = None) -> SCPSecurity:
        tls = TLSSettings.from_config(entry.get("tls"), where, base)
        tls.check_server(where)
        raw = entry.get("ae_certificates", {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f'{where}: ae_certificates must be a table {{ CT01 = "CN=ct01.example" }}')
        bound: dict[str, str] = {}
        for ae_title, subject in raw.items():
            if not isinstance(ae_title, str) or not 0 < len(ae_title.strip()) <= 16:
                raise ConfigError(f"{where}: ae_certificates: {ae_title!r} is not an AE title (1 to 16 characters)")
            if not isinstance(subject, str) or "=" not in subject:
                raise ConfigError(f"{where}: ae_certificates.{ae_title} must be a subject (CN=...), not {subject!r}")
            bound[ae_title.strip()] = normalise_subject(subject)
        if bound and (not tls.enabled or tls.client_certs == "none"):
            raise ConfigError(f'{where}: ae_certificates needs tls with client_certs = "required" (or "optional")')
        return cls(tls, bound)


class _GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, plus a cap on the connections open from one IP address, and the TLS handshake
    moved out of the accepting thread.

    The cap is checked at accept time (before any thread is started for the connection) and counted on the sockets
    themselves: one closed by any path, or collected, stops counting, so no path can leak a slot.
    """

    def __init__(
        self,
        *args: Any,
        per_peer: int = 0,
        on_refused: Callable[[str, str, int], None],
        rate: AcceptRate | None = None,
        handshake_timeout: float = 10.0,
        allowed_subjects: Sequence[str] = (),
        on_handshake_refused: Callable[[Peer, str, BaseException | None], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.per_peer = per_peer
        self.on_refused = on_refused
        self.rate = rate
        self.handshake_timeout = handshake_timeout
        self.allowed_subjects = tuple(allowed_subjects)
        self.on_handshake_refused = on_handshake_refused
        self._open: dict[str, weakref.WeakSet[socket.socket]] = {}
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            # No handshake here (see the module's docstring): process_request_thread does it.
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, client_address: Any) -> bool:
        host = str(client_address[0] if isinstance(client_address, tuple) else client_address)
        try:
            sock.settimeout(self.handshake_timeout)
            sock.do_handshake()
            subject = subject_of(sock.getpeercert())
        except ssl.SSLCertVerificationError as exc:
            self._refuse(Peer("", host), f"client certificate refused: {exc.verify_message or 'not verified'}", exc)
            return False
        except ssl.SSLError as exc:
            reason = NO_CERTIFICATE if exc.reason in NO_CERTIFICATE_REASONS else "TLS handshake failed"
            self._refuse(Peer("", host), reason, exc)
            return False
        except (OSError, ValueError) as exc:  # not TLS, a protocol error, silence past the timeout, a reset
            self._refuse(Peer("", host), "TLS handshake failed", exc)
            return False
        sock.traboule_subject = subject  # type: ignore[attr-defined]
        if not subject_allowed(subject, self.allowed_subjects):
            self._refuse(Peer("", host, subject), SUBJECT_NOT_ALLOWED, None)
            return False
        return True

    def _refuse(self, peer: Peer, reason: str, exc: BaseException | None) -> None:
        if self.on_handshake_refused is not None:
            with suppress(Exception):
                self.on_handshake_refused(peer, reason, exc)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Called by the accepting thread only: no lock needed.
        host = str(client_address[0] if isinstance(client_address, tuple) else client_address)
        if self.rate is not None and (limit := self.rate.take(host, time.monotonic())):
            self.on_refused(host, limit, -1)
            return False  # socketserver closes the connection
        peer = self._open.setdefault(host, weakref.WeakSet())
        open_now = sum(1 for sock in list(peer) if sock.fileno() != -1)
        if self.per_peer and open_now >= self.per_peer:
            self.on_refused(host, "max_associations_per_peer", open_now)
            return False
        peer.add(request)
        if len(self._open) > 1024:
            for gone in [h for h, socks in self._open.items() if all(s.fileno() == -1 for s in list(socks))]:
                del self._open[gone]
        return True


class DicomServer:
    """Base of the SCPs: ``start()`` / ``stop()``; any calling AE title, the called AE title must be ``ae_title``.

    With ``ssl_context`` the listener speaks TLS only; ``allowed_subjects`` (client certificate subjects admitted,
    empty: any the context accepts) and ``ae_certificates`` (calling AE title → the subject it must show) are
    checked as the module says; ``on_peer_refused(peer, reason)`` hears of each certificate refused.
    """

    contexts: tuple[str, ...] = ()  # abstract syntaxes served
    name = "dicom"  # prefix of the log events

    def __init__(
        self,
        *,
        ae_title: str,
        host: str,
        port: int,
        limits: SCPLimits | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allowed_subjects: Sequence[str] = (),
        ae_certificates: Mapping[str, str] | None = None,
        on_peer_refused: PeerRefused | None = None,
    ) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.limits = limits or SCPLimits()
        self.ssl_context = ssl_context
        self.allowed_subjects = tuple(allowed_subjects)
        self.ae_certificates = {k.strip(): v for k, v in (ae_certificates or {}).items()}
        self.on_peer_refused = on_peer_refused
        self._server: _GuardedServer | None = None
        self._ae = self._build_ae()
        self._log = structlog.get_logger(f"traboule.adapters.{self.name}").bind(ae_title=ae_title)
        self._refusals: dict[str, tuple[float, int]] = {}  # peer -> (last log time, refused since)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # a wrong called AE is rejected ("called AE title not recognised")
        ae.maximum_associations = self.limits.max_associations
        ae.acse_timeout = self.limits.acse_timeout
        ae.dimse_timeout = self.limits.dimse_timeout
        # An idle association is aborted after this; a modality that keeps one open between requests opens a
        # new one (Orthanc's DicomScpTimeout has the same 30 s default).
        ae.network_timeout = self.limits.network_timeout
        for context in self.contexts:
            ae.add_supported_context(context)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom event handlers of this SCP (besides the connection ones)."""
        raise NotImplementedError

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (non-blocking); with port 0 the chosen port is written back to ``self.port``."""
        if self._server is not None:
            return
        # Process-wide pynetdicom switches: identifiers would be logged (patient data) and decoded a second
        # time only for that log line.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # pydicom warns (and logs) for every received value that does not fit its VR, quoting it: a query of
        # thousands of such values made as many log lines. The matcher judges the values; pydicom stays quiet.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_DIMSE_RECV, self._on_message),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            *self.handlers(),
        ]
        # AE.start_server(block=False), with our server class.
        try:
            server = self._ae.make_server(
                (self.host, self.port),
                evt_handlers=handlers,
                server_class=_GuardedServer,
                ssl_context=self.ssl_context,
                per_peer=self.limits.max_associations_per_peer,
                on_refused=self._on_refused,
                rate=(
                    AcceptRate(self.limits.max_handshakes_per_second, self.limits.handshake_burst)
                    if self.ssl_context is not None
                    else None
                ),
                handshake_timeout=self.limits.tls_handshake_timeout,
                allowed_subjects=self.allowed_subjects,
                on_handshake_refused=self._on_handshake_refused,
            )
        except OSError as exc:  # socketserver's message does not say where
            where = f"{self.host}:{self.port}"
            raise OSError(exc.errno, f"{self.name} SCP cannot listen on {where}: {exc.strerror}") from exc
        self._ae._servers.append(server)  # as start_server does: the server's shutdown() removes itself from it
        threading.Thread(target=make_target(server.serve_forever), name=f"{self.name}-acceptor", daemon=True).start()
        self._server = server
        self.port = int(server.server_address[1])
        self._log.info(
            f"{self.name}.listening",
            host=self.host,
            port=self.port,
            tls=self.ssl_context is not None,
            **({"ae_certificates": sorted(self.ae_certificates)} if self.ae_certificates else {}),
            **_limits_fields(self.limits),
        )

    def stop(self) -> None:
        """Stop listening and end open associations."""
        if self._server is None:
            return
        server, self._server = self._server, None
        active = server.active_associations
        server.shutdown()  # stops accepting; open associations would otherwise live until network_timeout
        for assoc in active:
            assoc.abort()
        self._log.info(f"{self.name}.stopped")

    def _on_connection(self, event: evt.Event) -> None:
        # pynetdicom leaves Nagle's algorithm on: each small response PDU then waits for the peer's delayed
        # ACK, measured at +40 ms per C-FIND here (88 ms -> 48 ms for an in-process SCU, which keeps Nagle
        # on its side). Fired before the association starts, so every PDU goes out at once.
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            with suppress(OSError):
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # Accepted sockets are blocking: a peer that stops mid-PDU, or stops reading our responses,
                # would hold the DUL thread (and its association slot) for ever. A timeout turns either into
                # a closed connection (pynetdicom's Evt17): the A-ASSOCIATE-RQ within acse_timeout, as ARTIM.
                sock.socket.settimeout(self.limits.acse_timeout)
        event.assoc.dul._run_loop_delay = _POLL_BEFORE_ASSOCIATION
        if sock is not None:
            _bound_reads(sock, self.limits.max_message_bytes)

    def _on_closed(self, event: evt.Event) -> None:
        # A peer that connects and closes before its A-ASSOCIATE-RQ: pynetdicom's DUL goes back to idle (AA-5)
        # without telling the association thread, which waits out acse_timeout still counted as an association
        # ("local limit exceeded" for everyone after a burst of connect-and-close). Wake it now: an empty
        # primitive is what its timeout gives, and it ends the thread the same way.
        assoc = event.assoc
        if not getattr(assoc, "traboule_requested", False) and assoc.is_acceptor:
            with suppress(Exception):
                assoc.dul.to_user_queue.put(None)

    def _on_requested(self, event: evt.Event) -> None:
        event.assoc.traboule_requested = True
        if self.ae_certificates and self._refuse_unbound(event.assoc):
            return
        # The A-ASSOCIATE-RQ is in: from its answer on, every PDU goes through the DUL loop at full speed.
        event.assoc.dul._run_loop_delay = _POLL_ASSOCIATED
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            with suppress(OSError):
                sock.socket.settimeout(self.limits.network_timeout)  # then no PDU may stall longer than this

    def _on_message(self, event: evt.Event) -> None:
        # A whole DIMSE message is in: the next one may use the whole budget again.
        sock = event.assoc.dul.socket
        if sock is not None:
            sock.traboule_pending = 0  # type: ignore[attr-defined]

    def _refuse_unbound(self, assoc: Any) -> bool:
        """Reject the association (A-ASSOCIATE-RJ, permanent, calling AE title not recognised) when its calling AE
        title is bound to a certificate subject the peer did not show; True when rejected."""
        peer = peer_of(assoc)
        required = self.ae_certificates.get(peer.ae_title)
        if required is None or subject_allowed(peer.cert_subject, (required,)):
            return False
        # As pynetdicom rejects one itself: the A-ASSOCIATE-RJ is sent, then the association ends once the peer
        # closes the connection (or ARTIM, acse_timeout, expires).
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        self._log.warning(
            f"{self.name}.certificate_refused",
            calling_aet=peer.ae_title,
            peer=peer.address,
            subject=peer.cert_subject or None,
            reason="calling AE title bound to another certificate",
        )
        self._notify_refused(peer, "calling AE title not bound to the client certificate")
        assoc.kill()
        return True

    def _on_handshake_refused(self, peer: Peer, reason: str, exc: BaseException | None) -> None:
        # Called in the connection's thread. A certificate refused is audited; a handshake that failed otherwise
        # (plain TCP, a port scan, a load balancer's TCP check) is only logged, at most once per peer per interval.
        certificate = (
            exc is None
            or isinstance(exc, ssl.SSLCertVerificationError)
            or (isinstance(exc, ssl.SSLError) and exc.reason in NO_CERTIFICATE_REASONS)
        )
        if certificate:
            self._notify_refused(peer, reason)
        refused = self._throttle(("tls-certificate:" if certificate else "tls:") + peer.address)
        if refused is None:
            return
        self._log.warning(
            f"{self.name}.tls_refused",
            peer=peer.address,
            reason=reason,
            **({"subject": peer.cert_subject} if peer.cert_subject else {}),
            **({"error": type(exc).__name__} if exc is not None and not certificate else {}),
            refused=refused,
        )

    def _notify_refused(self, peer: Peer, reason: str) -> None:
        if self.on_peer_refused is not None:
            try:
                self.on_peer_refused(peer, reason)
            except Exception as exc:
                self._log.error(f"{self.name}.refusal_hook_failed", error=type(exc).__name__)

    def _throttle(self, key: str) -> int | None:
        """None when ``key`` was logged less than an interval ago; else the refusals since (this one included)."""
        now = time.monotonic()
        if len(self._refusals) > 1024:  # many addresses (an IPv6 range): forget the old ones
            self._refusals.clear()
        last, refused = self._refusals.get(key, (float("-inf"), 0))
        refused += 1
        if now - last < _REFUSAL_LOG_INTERVAL:
            self._refusals[key] = (last, refused)
            return None
        self._refusals[key] = (now, 0)
        return refused

    def _on_refused(self, host: str, limit: str, open_now: int) -> None:
        refused = self._throttle(f"{limit}:{host}")
        if refused is None:
            return
        self._log.warning(
            f"{self.name}.connection_refused",
            peer=host,
            reason=limit,
            limit=getattr(self.limits, limit),
            **({"open_connections": open_now} if open_now >= 0 else {}),
            refused=refused,
        )


def _bound_reads(sock: Any, limit: int) -> None:
    """Make the association's socket refuse to read more than ``limit`` bytes for one DIMSE message.

    pynetdicom reads a PDU whole, trusting the length in its header (up to 4 GiB, whatever the maximum length we
    announced), and gathers a message's P-DATA fragments in memory without bound: one peer could take the
    process's memory. An OSError here is what a broken connection raises: pynetdicom closes the association
    (Evt17) before reading a byte of the oversized PDU.
    """
    read = sock.recv
    sock.traboule_pending = 0

    def bounded(nr_bytes: int) -> bytearray:
        sock.traboule_pending += nr_bytes
        if sock.traboule_pending > limit:
            raise OSError(f"more than {limit} bytes for one DIMSE message")
        return read(nr_bytes)

    sock.recv = bounded


def _limits_fields(limits: SCPLimits) -> dict[str, Any]:
    return {spec.name: getattr(limits, spec.name) for spec in fields(limits)}
