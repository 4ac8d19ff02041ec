"""MLLP (HL7 v2 over TCP, minimal lower layer protocol): a listener, a client and a sender. Framing only.

A frame is ``0x0B message 0x1C 0x0D``. The listener hands each message's bytes to a handler and writes back the
bytes the handler returns (the ACK), one message at a time per connection as HL7 original mode requires; many
connections are served at once. The client returns each answer's bytes; the sender keeps a connection, reopens it
and has each answer judged by a callable (`traboule.formats.hl7.read_ack` by default). No HL7 is read here.

The listener holds what hostile or broken peers send within limits: connections in all and per peer address,
bytes buffered across all connections, a deadline per frame (slow senders), per idle connection and per reply a
peer does not read. A full listener makes room by closing an idle connection rather than refusing a newcomer.
Bytes outside a frame, frames cut short or left unfinished, and messages it cannot hold, go to ``on_refused`` (the
channel journals them) rather than being dropped silently.

Framing (HL7 MLLP release 2): a frame is ``0x0B content 0x1C 0x0D``, its content encoded so as to hold neither
0x0B nor 0x1C (HL7 escapes control characters in text). So a 0x0B inside a frame is the start of a new frame
(the bytes before it, a frame cut short, are refused unanswered: ``frame_interrupted``), and a 0x1C not followed by
0x0D is an error, never guessed past (``bad_end_block``, see ``_Connection._parse``).

TLS (``traboule.tls``): a listener given a server context speaks TLS only. It accepts connections itself and hands
each to the loop with the context (``connect_accepted_socket``), which completes the handshake before the connection
exists for the limits above; handshakes under way have a budget of their own (``max_connections`` in all,
``max_connections_per_peer`` per address) and each is bounded by ``ssl_handshake_timeout``, so silent peers hold no
slot for long; they have a rate too (``max_handshakes_per_second`` per address, ``max_handshakes_per_second_total``
in all), since each costs the loop CPU before the peer's certificate is known. A handshake that fails (a plain TCP
peer, an old protocol version, a cipher outside BCP 195, a client certificate the CA did not sign or that expired) or
a client certificate subject outside ``allowed_subjects`` closes the connection (``connection.tls_refused``: peer,
reason, and the subject only when refused for it); one refused for its client certificate (none, not verified,
subject not allowed) goes to ``on_tls_refused`` as well (the channel audits it). The served connection's client
certificate subject is in ``traboule.tls.peer_subject`` while its handler runs. The client and
the sender take a client context (the server's certificate checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal, cast

import structlog

from traboule.errors import NotAccepted
from traboule.formats.hl7 import AckReading, read_ack
from traboule.tls import TLSSettings, client_context, peer_subject, server_context, subject_allowed, subject_of

START, END = b"\x0b", b"\x1c\x0d"
SB, EB, CR = 0x0B, 0x1C, 0x0D  # the framing bytes as ints (what indexing bytes gives)
log = structlog.get_logger("traboule.mllp")

MessageHandler = Callable[[bytes, str], Awaitable[bytes]]  # (message bytes, peer "host:port") -> reply bytes
OversizeHandler = Callable[[bytes, str], Awaitable[bytes]]  # (first bytes of the message, peer) -> reply

# Why bytes were not handed to the message handler:
#   no_start_block      bytes without a start block, ended by an end block (the sender awaits an answer) or over
#                       MAX_UNFRAMED (then the connection is closed: answered, as it may be a message sent unframed)
#   outside_frame       bytes outside any frame, not ended by an end block (before a start block, at the close):
#                       nobody awaits an answer to them, and one would be read as the answer to the next message
#   overloaded          the start of a message the listener cannot hold (max_buffered_bytes): answered, closed
#   frame_timeout       the start of a message not complete within frame_timeout: answered, closed
#   frame_interrupted   a frame cut short by a start block (0x0B) before its end block: the bytes before it, not
#                       answered (the frame that starts there gets the answer); the connection goes on
#   partial_frame       the start of a frame whose connection closed before its end block: nobody to answer
#   bad_end_block       a frame with an end block byte 0x1C not followed by 0x0D (see _parse): answered; closed
#                       when where the frame ended had to be assumed (nothing came after the 0x1C for END_WAIT)
Refusal = Literal[
    "no_start_block",
    "outside_frame",
    "overloaded",
    "frame_timeout",
    "frame_interrupted",
    "partial_frame",
    "bad_end_block",
]
RefusalHandler = Callable[[bytes, str, Refusal], Awaitable[bytes | None]]  # (bytes, peer, why) -> reply or None
TLSRefusalHandler = Callable[[str, str, str], None]  # (peer IP address, certificate subject or "", fixed reason)
AckJudge = Callable[[bytes, bytes], AckReading]  # (message sent, answer) -> how the receiver answered

BETWEEN_FRAMES = b"\r\n\x00\t "  # what senders put between frames (a line break after the end block is common)
HEAD = 64 * 1024  # the first bytes of a refused message handed to the callbacks: enough for its MSH
MAX_UNFRAMED = 64 * 1024  # bytes in a row outside any frame before closing: a sender speaking MLLP never needs it
MAX_UNFRAMED_RUNS = 16  # out-of-frame sequences in a row (no message between) before closing: bounds the journal
LINGER = 2.0  # seconds a refused peer still sending is read (and ignored) for, so that it gets to read our answer
# Seconds a frame whose last byte is a lone 0x1C (or that holds a stray one) may wait for more bytes before it is
# refused (bad_end_block): a sender waiting for the answer to a frame it ended without 0x0D gets an AR now, not after
# frame_timeout. Above Nagle + delayed ACK (up to 200 ms on Windows), which can hold a 0x0D written on its own.
END_WAIT = 1.0
EVICTION_LOG_BURST = 10  # connection.evicted lines per EVICTION_LOG_WINDOW seconds; the rest counted in the next line
EVICTION_LOG_WINDOW = 60.0
MAX_SUBJECT_LOGGED = 256  # characters of a refused client certificate's subject written to the log
# The reasons given to on_tls_refused besides "client certificate refused: <OpenSSL's verification error>".
NO_CERTIFICATE = "no client certificate"
SUBJECT_NOT_ALLOWED = "client certificate subject not allowed"
NO_CERTIFICATE_REASONS = ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE_RETURNED")  # OpenSSL's, for the first


class _Throttle:
    """At most ``burst`` log lines per ``window`` seconds; `allow` gives the count left out since the previous
    line when one may be written now, None when not."""

    def __init__(self, burst: int, window: float) -> None:
        self.burst, self.window = burst, window
        self._since = float("-inf")
        self._logged = self._unlogged = 0

    def allow(self, now: float) -> int | None:
        if now - self._since >= self.window:
            self._since, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            unlogged, self._unlogged = self._unlogged, 0
            return unlogged
        self._unlogged += 1
        return None


class AcceptRate:
    """Token buckets bounding how fast connections are taken on: ``per_address`` a second from one address (up to
    ``burst`` at once after a quiet spell) and, when ``total`` is set, ``total`` a second from all addresses (up to
    one second's worth at once). `take` spends a token of both, or names the limit that refuses (a refused attempt
    spends nothing, so a peer that paces itself always gets in). Memory is bounded: past ``max_addresses`` buckets,
    the full ones are forgotten (a full bucket is a new one) and then the least recently used, down to half.
    Not thread-safe: one caller (an event loop, an accepting thread)."""

    def __init__(self, per_address: float, burst: float, total: float = 0.0, max_addresses: int = 4096) -> None:
        self.per_address, self.burst, self.total = per_address, max(1.0, burst), total
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted), least recent first
        self._all, self._all_since = total, float("-inf")

    def take(self, address: str, now: float) -> str:
        """Empty when admitted; else the limit: ``max_handshakes_per_second`` or ``..._per_second_total``."""
        tokens, since = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - since) * self.per_address)
        refused = ""
        if tokens < 1:
            refused = "max_handshakes_per_second"
        elif self.total > 0:
            self._all = min(self.total, self._all + (now - self._all_since) * self.total)
            self._all_since = now
            if self._all < 1:
                refused = "max_handshakes_per_second_total"
            else:
                self._all -= 1
        self._buckets[address] = (tokens if refused else tokens - 1, now)  # the most recent last
        if len(self._buckets) > self.max_addresses:
            self._forget(now)
        return refused

    def _forget(self, now: float) -> None:
        rate, burst = self.per_address, self.burst
        full = [a for a, (tokens, since) in self._buckets.items() if tokens + (now - since) * rate >= burst]
        for address in full:
            del self._buckets[address]
        for address in list(self._buckets)[: max(0, len(self._buckets) - self.max_addresses // 2)]:
            del self._buckets[address]

    def __len__(self) -> int:
        return len(self._buckets)


_CLOSE = "close"  # a queue item that only ends the connection
_GO_ON = ("no_start_block", "outside_frame", "frame_interrupted", "bad_end_block")  # the connection goes on after them


def frame(message: bytes) -> bytes:
    return START + message + END


class MLLPListener:
    """Accepts MLLP connections and answers each framed message with the handler's reply.

    Limits (the defaults suit a hospital RIS: a handful of connections, messages up to a few MiB):

    * ``max_connections`` in all, ``max_connections_per_peer`` per peer address. At either limit a newcomer is
      admitted by closing an idle connection (no frame begun, nothing queued or being answered; see ``_evict``):
      idle connections cannot lock a RIS out. Only when none may be closed is the newcomer closed at once (logged).
      ``evict_idle_after``: seconds a connection must have been idle to be closed so (unless its peer holds more
      connections than the newcomer's would).
    * ``max_buffered_bytes``: the bytes held across all connections (unfinished frames, messages waiting for or in
      their handler). A connection whose read would go above it is closed, its message refused (``overloaded``).
    * ``max_message_size``: a larger message is refused (``on_oversize``) and its connection closed (the stream
      cannot be resynced).
    * ``frame_timeout``: seconds from a frame's first byte to its end block (a sender trickling bytes is refused);
      ``idle_timeout``: seconds without a message between two; ``write_timeout``: seconds a reply may wait for a
      peer that does not read it. Each closes the connection.
    * ``ssl`` (a server context, `traboule.tls.server_context`): TLS only; ``ssl_handshake_timeout``: seconds a
      handshake may take; ``allowed_subjects``: the client certificate subjects admitted (empty: any the context
      accepts). ``tls``: the settings the context was made from (for `traboule.tls.CertificateReloader`).
    * ``max_handshakes_per_second`` (with a ``handshake_burst``) per peer address and
      ``max_handshakes_per_second_total`` in all: how fast TLS connections are taken on (`AcceptRate`). A handshake
      costs the loop about a millisecond and a half of CPU, paid before the peer's certificate is known; beyond the
      rate a newcomer is closed at once, before its handshake (``connection.tls_refused``).
    * ``on_tls_refused(address, subject, reason)``: hears of each connection refused for its client certificate (none
      returned, not verified, subject not allowed), not of other failed handshakes (plain TCP, a port scan), nor of
      those refused by a limit. ``reason`` is one of fixed texts (see ``_handshake``); ``subject`` is "" but for a
      subject not allowed.
    """

    LIMITS = {  # the settings above, as a channel's source table spells them, and their type
        "max_message_size": int,
        "idle_timeout": float,
        "frame_timeout": float,
        "write_timeout": float,
        "max_connections": int,
        "max_connections_per_peer": int,
        "max_buffered_bytes": int,
        "evict_idle_after": float,
        "ssl_handshake_timeout": float,
        "max_handshakes_per_second": float,
        "handshake_burst": int,
        "max_handshakes_per_second_total": float,
    }

    def __init__(
        self,
        handler: MessageHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_message_size: int = 16 * 1024 * 1024,
        idle_timeout: float = 300.0,
        frame_timeout: float = 60.0,
        write_timeout: float = 30.0,
        max_connections: int = 64,
        # A quarter of max_connections: a RIS needs a handful of connections, an interface engine fanning feeds
        # through one address a dozen; and filling the listener takes four addresses, not two (at 32, two
        # addresses held all 64). Eviction (see _evict) makes a full listener no lockout anyway; the cap keeps one
        # address from holding most of it, and hogs are evicted first.
        max_connections_per_peer: int = 16,
        max_buffered_bytes: int = 256 * 1024 * 1024,
        evict_idle_after: float = 2.0,
        on_oversize: OversizeHandler | None = None,
        on_refused: RefusalHandler | None = None,
        name: str = "mllp",
        ssl: ssl.SSLContext | None = None,
        ssl_handshake_timeout: float = 10.0,
        allowed_subjects: tuple[str, ...] = (),
        tls: TLSSettings | None = None,
        max_handshakes_per_second: float = 20.0,
        handshake_burst: int = 40,
        max_handshakes_per_second_total: float = 100.0,
        on_tls_refused: TLSRefusalHandler | None = None,
    ):
        self.handler = handler
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.max_buffered_bytes = max_buffered_bytes
        self.evict_idle_after = evict_idle_after
        self.on_oversize = on_oversize
        self.on_refused = on_refused
        self.name = name
        self.ssl = ssl
        self.ssl_handshake_timeout = ssl_handshake_timeout
        self.allowed_subjects = allowed_subjects
        self.tls = tls
        self.max_handshakes_per_second = max_handshakes_per_second
        self.handshake_burst = handshake_burst
        self.max_handshakes_per_second_total = max_handshakes_per_second_total
        self.on_tls_refused = on_tls_refused
        self._rate = AcceptRate(max_handshakes_per_second, handshake_burst, max_handshakes_per_second_total)
        self.tls_refusals = 0  # connections closed for their handshake or certificate subject, since the start
        self.rate_refusals = 0  # of them: closed before their handshake, over the handshake rate
        self.buffered = 0  # bytes held across all connections, exact (see _Connection.held)
        self._server: asyncio.Server | None = None
        self._socket: socket.socket | None = None  # TLS: the listening socket, accepted from by _accept
        self._accepter: asyncio.Task[None] | None = None
        self._handshakes: dict[asyncio.Task[None], str] = {}  # TLS: handshakes under way, their peer's address
        self._watcher: asyncio.Task[None] | None = None
        self._connections: set[_Connection] = set()
        self._per_peer: dict[str, int] = {}
        self.evictions = 0  # idle connections closed to admit a newcomer, since the start
        self.refusals = 0  # newcomers closed at once (every connection busy), since the start
        self._evict_log = _Throttle(EVICTION_LOG_BURST, EVICTION_LOG_WINDOW)
        self._refuse_log = _Throttle(EVICTION_LOG_BURST, EVICTION_LOG_WINDOW)
        self._tls_log = _Throttle(EVICTION_LOG_BURST, EVICTION_LOG_WINDOW)

    @classmethod
    def from_config(
        cls,
        channel: str,
        source: dict[str, Any] | None,
        handler: MessageHandler,
        *,
        on_oversize: OversizeHandler | None = None,
        on_refused: RefusalHandler | None = None,
        tls_defaults: TLSSettings | None = None,
        on_tls_refused: TLSRefusalHandler | None = None,
    ) -> MLLPListener:
        """From a channel's ``source = {adapter = "mllp-listener", host, port, <limits>, tls}``; absent limits
        default. ``tls``: true (``tls_defaults``, the ``[tls]`` table), false, or a table overriding them."""
        src = source or {}
        where = f"channel {channel}: source"
        tls = TLSSettings.from_config(src.get("tls"), where, tls_defaults)
        if tls.enabled:
            tls.check_server(where)
        limits: dict[str, Any] = {}
        for key, kind in cls.LIMITS.items():
            if key in src:
                try:
                    limits[key] = kind(src[key])
                except (TypeError, ValueError):
                    raise ValueError(f"channel {channel}: source.{key} must be a number, not {src[key]!r}") from None
                if limits[key] <= 0:
                    raise ValueError(f"channel {channel}: source.{key} must be positive, not {src[key]!r}")
        return cls(
            handler,
            host=str(src.get("host", "127.0.0.1")),
            port=int(src.get("port", 2575)),
            on_oversize=on_oversize,
            on_refused=on_refused,
            name=channel,
            ssl=server_context(tls) if tls.enabled else None,
            allowed_subjects=tls.allowed_subjects,
            tls=tls if tls.enabled else None,
            on_tls_refused=on_tls_refused,
            **limits,
        )

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def handshakes(self) -> int:
        """TLS handshakes under way (not yet connections)."""
        return len(self._handshakes)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.ssl is not None:
            family = (await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM))[0][0]
            self._socket = socket.create_server((self.host, self.port), family=family, backlog=128)
            self._socket.setblocking(False)
            self.port = self._socket.getsockname()[1]
            self._accepter = asyncio.create_task(self._accept(), name=f"{self.name}-mllp-accept")
        else:
            self._server = await loop.create_server(lambda: _Connection(self), self.host, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.name}-mllp-timeouts")
        log.info("listening", adapter=self.name, host=self.host, port=self.port, tls=self.ssl is not None)

    async def stop(self) -> None:
        if self._server or self._socket:
            if self._server:
                self._server.close()
            if self._accepter is not None:
                self._accepter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._accepter
                self._accepter = None
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            if self._watcher is not None:
                self._watcher.cancel()
            tasks = [*self._handshakes, *(c.task for c in self._connections if c.task is not None)]
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
            if self._server:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    # -- TLS: accepting and handshakes -------------------------------------------------------------------------

    async def _accept(self) -> None:
        """Accept connections and start each one's handshake, within the handshake budget."""
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        while True:
            try:
                sock, address = await loop.sock_accept(self._socket)
            except OSError as exc:  # out of file descriptors, a connection reset before accept...
                log.warning("accept.failed", adapter=self.name, error=type(exc).__name__)
                await asyncio.sleep(0.1)
                continue
            host, peer = str(address[0]), f"{address[0]}:{address[1]}"
            rated = self._rate.take(host, loop.time())
            if rated:  # before anything else: a flood costs an accept and a close
                sock.close()
                self.rate_refusals += 1
                self._tls_refused(peer, rated)
                continue
            pending = list(self._handshakes.values())
            limit = ""
            if pending.count(host) >= self.max_connections_per_peer:
                limit = "max_connections_per_peer"
            elif len(pending) >= self.max_connections:
                limit = "max_connections"
            if limit:
                sock.close()
                self._tls_refused(peer, "handshakes_" + limit)
                continue
            task = asyncio.create_task(self._handshake(sock, peer), name=f"{self.name}-mllp-handshake")
            self._handshakes[task] = host
            task.add_done_callback(self._handshakes.pop)

    async def _handshake(self, sock: socket.socket, peer: str) -> None:
        """One connection's handshake: on success the loop calls the connection's ``connection_made``."""
        assert self.ssl is not None
        loop = asyncio.get_running_loop()
        certificate = ""  # the reason for on_tls_refused, when refused for the client certificate
        try:
            await loop.connect_accepted_socket(
                lambda: _Connection(self), sock, ssl=self.ssl, ssl_handshake_timeout=self.ssl_handshake_timeout
            )
            return
        except ssl.SSLCertVerificationError as exc:  # the client certificate: expired, another CA...
            reason = str(exc.verify_message or exc.reason or "certificate_verify_failed")
            certificate = f"client certificate refused: {reason}"  # OpenSSL's fixed texts
        except ssl.SSLError as exc:  # not TLS (a plain MLLP peer), a version or cipher refused, no certificate
            reason = str(exc.reason or type(exc).__name__)
            certificate = NO_CERTIFICATE if reason in NO_CERTIFICATE_REASONS else ""
        except ConnectionAbortedError:  # the loop aborts a handshake longer than ssl_handshake_timeout
            reason = "handshake_timeout"
        except OSError as exc:  # the peer left during the handshake
            reason = type(exc).__name__
        with contextlib.suppress(OSError):
            sock.close()
        self._tls_refused(peer, reason)
        if certificate:
            self._certificate_refused(peer.rpartition(":")[0], "", certificate)

    def _certificate_refused(self, host: str, subject: str, reason: str) -> None:
        if self.on_tls_refused is None:
            return
        try:
            self.on_tls_refused(host, subject, reason)
        except Exception as exc:
            log.error("connection.tls_refusal_hook_failed", adapter=self.name, error=type(exc).__name__)

    def _tls_refused(self, peer: str, reason: str, subject: str = "") -> None:
        self.tls_refusals += 1
        unlogged = self._tls_log.allow(asyncio.get_running_loop().time())
        if unlogged is None:  # a flood of handshakes is not a flood of lines
            return
        shown = {"subject": "".join(c if c.isprintable() else "?" for c in subject[:MAX_SUBJECT_LOGGED])}
        level = log.info if reason in ("ConnectionResetError", "BrokenPipeError") else log.warning
        extra = shown if subject else {}
        level("connection.tls_refused", adapter=self.name, peer=peer, reason=reason, unlogged=unlogged, **extra)

    def _admit(self, conn: _Connection) -> str:
        """Register a new connection, or say which limit refuses it (at a limit, an idle connection makes room)."""
        now = conn.loop.time()
        limit = "max_connections_per_peer"
        if self._per_peer.get(conn.host, 0) >= self.max_connections_per_peer and not self._evict(conn, now, limit):
            return limit
        limit = "max_connections"
        if len(self._connections) >= self.max_connections and not self._evict(conn, now, limit):
            return limit
        self._connections.add(conn)
        self._per_peer[conn.host] = self._per_peer.get(conn.host, 0) + 1
        return ""

    def _release(self, conn: _Connection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            left = self._per_peer.get(conn.host, 1) - 1
            if left > 0:
                self._per_peer[conn.host] = left
            else:
                self._per_peer.pop(conn.host, None)
        self.buffered -= conn.held
        conn.held = 0

    def _evict(self, newcomer: _Connection, now: float, limit: str) -> bool:
        """Close an idle connection to make room for ``newcomer``; False when none may be closed.

        Only an idle connection is closed: no frame begun, nothing queued, being answered or refused (a busy one
        never is). At ``max_connections_per_peer``, one of the newcomer's peer's own, idle for at least
        ``evict_idle_after``. At ``max_connections``, one of the peer holding the most connections, the one idle the
        longest: idle for at least ``evict_idle_after``, or for any time if that peer holds more connections than
        the newcomer's would (fair share). So idle connections never lock a newcomer out; the grace keeps a peer
        that has just connected from losing its connection before its first frame; and an attacker reopening
        connections as fast as it likes keeps evicting its own, not a RIS holding one or two. Closing an idle
        connection loses nothing: a sender whose frame crosses the close gets no answer and sends it again.
        """
        mine = self._per_peer.get(newcomer.host, 0)
        grace = self.evict_idle_after
        victim, best = None, (0, 0.0)
        for conn in self._connections:  # at most max_connections, and only when full
            if not conn.idle or (limit == "max_connections_per_peer" and conn.host != newcomer.host):
                continue
            held, idle = self._per_peer.get(conn.host, 0), now - conn.idle_since
            if idle < grace and (limit == "max_connections_per_peer" or held <= mine + 1):
                continue
            if victim is None or (held, idle) > best:
                victim, best = conn, (held, idle)
        if victim is None:
            return False
        self.evictions += 1
        unlogged = self._evict_log.allow(now)
        if unlogged is not None:
            log.warning(
                "connection.evicted",
                adapter=self.name,
                peer=victim.peer,
                idle=round(best[1], 2),
                limit=limit,
                newcomer=newcomer.peer,
                unlogged=unlogged,  # evictions since the previous line, not logged (rate bound)
            )
        victim.close()
        self._release(victim)  # now: the room is the newcomer's (its task releases it again, a no-op)
        return True

    async def _watch(self) -> None:
        """Frame and idle deadlines: one sweep over the connections rather than a timer per message (hot path)."""
        interval = max(0.01, min(END_WAIT / 2, self.idle_timeout / 4, self.frame_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                conn.check_deadlines(now)


class _Connection(asyncio.Protocol):
    """One connection: a frame parser fed by the transport, and a task answering what it parsed, in order.

    The parser is a two-state machine (outside / inside a frame) over the bytes read; ``buf`` holds the unfinished
    frame or the out-of-frame bytes seen since the last frame. Reading pauses while a message waits for the one
    before it to be answered, so a connection holds at most one read beyond its unfinished frame.
    """

    def __init__(self, listener: MLLPListener) -> None:
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.host = self.peer = ""
        self.inside = False  # between a start block and its end block
        self.buf = bytearray()  # the unfinished frame (inside) or out-of-frame bytes (outside)
        self.frame_started = 0.0  # loop time of the unfinished frame's start block (not of one that cut it short)
        self.bad_end = False  # the unfinished frame holds a 0x1C not followed by 0x0D
        self.last_read = 0.0  # loop time of the last read, kept while the unfinished frame ends with or holds a 0x1C
        self.idle_since = 0.0  # loop time since which the connection has had nothing to answer
        self.queue: deque[tuple[str | None, bytes]] = deque()  # (None or why refused, bytes), head being answered
        self.queued = 0  # bytes in the queue
        self.held = 0  # bytes of this connection counted in listener.buffered: buf + queue
        self.runs = 0  # out-of-frame sequences since the last message
        self.busy = False  # answering an item (its handler, then writing the answer)
        self.refused = False  # reading stopped for good: the connection ends after its queue
        self.eof = False  # the peer shut its side
        self.paused = False
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None  # pending while the transport's write buffer is full
        self.task: asyncio.Task[None] | None = None
        self.secure = listener.ssl is not None  # TLS: connection_made comes once the handshake is done
        self.subject = ""  # TLS: the client certificate's subject ("" without one)

    @property
    def idle(self) -> bool:
        """Nothing begun or pending: the listener may close it to admit another (see MLLPListener._evict)."""
        return not (
            self.inside or self.queue or self.busy or self.refused or self.closed or self.paused or self.task is None
        )

    # -- transport callbacks -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # not an asyncio.Transport subclass under uvloop
        peername = transport.get_extra_info("peername") or ("?", 0)
        self.host, self.peer = str(peername[0]), f"{peername[0]}:{peername[1]}"
        if self.secure:
            self.subject = subject_of(transport.get_extra_info("peercert"))
            if not subject_allowed(self.subject, self.listener.allowed_subjects):
                self.listener._tls_refused(self.peer, "subject_not_allowed", self.subject)
                self.listener._certificate_refused(self.host, self.subject, SUBJECT_NOT_ALLOWED)
                self.closed = True
                transport.close()
                return
        refused = self.listener._admit(self)
        if refused:
            listener = self.listener
            listener.refusals += 1
            unlogged = listener._refuse_log.allow(self.loop.time())
            if unlogged is not None:  # a flood of connections is not a flood of lines
                limit = getattr(listener, refused)
                log.warning(
                    "connection.refused",
                    adapter=listener.name,
                    peer=self.peer,
                    reason=refused,
                    limit=limit,
                    unlogged=unlogged,
                )
            self.closed = True
            transport.close()
            return
        log.debug("connection.open", adapter=self.listener.name, peer=self.peer)
        self.idle_since = self.loop.time()
        self.task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        if self.refused or self.closed:
            return
        listener = self.listener
        if listener.buffered + len(data) > listener.max_buffered_bytes:
            self._overloaded(data)
        elif (
            not self.inside
            and not self.buf
            and data[:1] == START
            and data.find(b"\x1c", 1) == len(data) - 2 > 0
            and data[-1] == CR
            and data.find(START, 1) < 0
        ):
            # The common case in original mode: one read, one whole frame (no 0x0B or 0x1C in its content).
            if len(data) - 3 > listener.max_message_size:
                self._refuse("too_large", data[1 : 1 + HEAD])
            else:
                self.runs = 0
                self._push(None, data[1:-2])
        else:
            self._parse(data)
        if len(self.queue) > 1 and not self.paused:  # a message arrived before the previous one was answered
            self._pause()
        self._account()

    def eof_received(self) -> bool:
        if self.inside and self.buf[-1:] == b"\x1c" and not self.refused:
            self._bad_end()  # its end block without 0x0D, and nothing more will come: the sender awaits an answer
            self._account()
        self.eof = self.refused = True  # the peer sent all it will: answer what is queued, then close
        self._wake()
        return not self.secure  # keep the transport open for the answers (TLS cannot: a close_notify ends it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self._wake()

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        self.drained = None

    # -- the frame parser ----------------------------------------------------------------------------------------

    def _parse(self, data: bytes) -> None:
        """Frames out of a read. Inside a frame, what ends it is looked for: a 0x1C, and before it any 0x0B.

        * ``0x1C 0x0D``: the end block (split across two reads too).
        * ``0x0B``: a new frame starts there; the bytes before it (this frame, cut short) are refused unanswered
          (``frame_interrupted``): its sender gets one answer, for the frame it completes. The frame deadline keeps
          running from the first start block: a peer sending a 0x0B each minute does not hold a frame open forever.
        * ``0x1C`` not followed by ``0x0D``: MLLP release 2 ends a frame with 0x1C 0x0D and forbids 0x1C in content,
          so the frame is refused (``bad_end_block``, AR naming the missing 0x0D), never guessed past. Strict, not
          lenient: accepting a lone 0x1C as the end would acknowledge a message cut at a 0x1C in its content (AA for
          part of an order). Followed by 0x0B, the frame is answered AR and the next one starts there (a sender
          that omits the 0x0D gets one answer per frame); followed by anything else, the frame goes on to its real
          end block (one frame, one answer: AR). A frame whose last byte so far is a lone 0x1C, or that holds a
          stray one, and gets no more bytes for END_WAIT is answered AR then (the sender is waiting), and the
          connection closed; at the peer's end of stream, at once.
        """
        view, i, n = memoryview(data), 0, len(data)
        if self.buf and self.buf[-1] == EB:  # the previous read ended with a 0x1C: this read's first byte decides
            if data[0] == CR:  # an end block split across two reads
                del self.buf[-1]
                self._end_block()
                i = 1
            elif self.inside and data[0] == SB:
                self._bad_end()  # the next frame starts at i = 0
            elif self.inside:
                self.bad_end = True  # a 0x1C in the content: the frame goes on, to be refused at its end
        limit = self.listener.max_message_size
        while i < n and not self.refused:
            if self.inside:
                e = data.find(b"\x1c", i)
                s = data.find(START, i, n if e < 0 else e)
                if s >= 0:  # a start block before any end block: this frame was cut short, a new one starts
                    self.buf += view[i:s]
                    if len(self.buf) > limit:
                        self._refuse("too_large", bytes(self.buf[:HEAD]))
                        return
                    self._interrupted()
                    i = s + 1
                    continue
                self.buf += view[i : n if e < 0 else e]
                if len(self.buf) > limit:
                    self._refuse("too_large", bytes(self.buf[:HEAD]))
                    return
                if e < 0:
                    break
                if e + 1 == n:  # its second byte is in the next read, or never comes (check_deadlines)
                    self.buf.append(EB)
                    break
                after = data[e + 1]
                if after == CR:
                    i = e + 2
                    self._end_block()
                elif after == SB:
                    i = e + 1
                    self._bad_end()
                else:
                    self.buf.append(EB)
                    self.bad_end = True
                    i = e + 1
            else:
                s, e = data.find(START, i), data.find(END, i)
                if e >= 0 and (s < 0 or e < s):
                    self.buf += view[i:e]
                    i = e + 2
                    self._end_block()
                elif s >= 0:
                    self.buf += view[i:s]
                    i = s + 1
                    self._start_block()
                else:
                    if self.buf or data[i:].strip(BETWEEN_FRAMES):  # line breaks after an end block are not kept
                        self.buf += view[i:]
                    if len(self.buf) > MAX_UNFRAMED:
                        log.warning("connection.unframed_flood", adapter=self.listener.name, peer=self.peer)
                        head = bytes(self.buf[:HEAD]).lstrip(BETWEEN_FRAMES)
                        self._refuse("no_start_block" if head else _CLOSE, head)
                    return
        if self.inside and (self.bad_end or self.buf[-1:] == b"\x1c"):
            self.last_read = self.loop.time()

    def _start_block(self) -> None:
        self._unframed("outside_frame")
        if not self.refused:
            self.inside = True
            self.bad_end = False
            self.frame_started = self.loop.time()

    def _end_block(self) -> None:
        if self.inside:
            message = bytes(self.buf)
            self.buf.clear()
            self.inside = False
            if self.bad_end:  # it held a 0x1C not followed by 0x0D
                self.bad_end = False
                self._push("bad_end_block", message)
            else:
                self.runs = 0
                self._push(None, message)
        else:
            self._unframed("no_start_block")

    def _bad_end(self) -> None:
        """The frame ends at a 0x1C not followed by 0x0D: refused, answered (its sender sent an end block)."""
        if self.buf[-1:] == b"\x1c":
            del self.buf[-1]
        message = bytes(self.buf)
        self.buf.clear()
        self.inside = self.bad_end = False
        self._push("bad_end_block", message)

    def _interrupted(self) -> None:
        """A start block inside a frame: the bytes before it are refused unanswered; the frame starts over."""
        data = bytes(self.buf)
        self.buf.clear()
        self.bad_end = False
        if not data.strip(BETWEEN_FRAMES):  # a doubled start block, or only line breaks before the new one
            return
        self._push("frame_interrupted", data)
        self.runs += 1
        if self.runs >= MAX_UNFRAMED_RUNS:
            log.warning("connection.unframed_runs", adapter=self.listener.name, peer=self.peer, runs=self.runs)
            self._refuse(_CLOSE, b"")

    def _unframed(self, why: Refusal) -> None:
        """Out-of-frame bytes: handed over unless they are only what senders put between frames."""
        data = bytes(self.buf).lstrip(BETWEEN_FRAMES)  # the rest as sent: a message's last segment ends with CR
        self.buf.clear()
        if not data.rstrip(BETWEEN_FRAMES):
            return
        self._push(why, data)
        self.runs += 1
        if self.runs >= MAX_UNFRAMED_RUNS:
            log.warning("connection.unframed_runs", adapter=self.listener.name, peer=self.peer, runs=self.runs)
            self._refuse(_CLOSE, b"")

    def _overloaded(self, data: bytes) -> None:
        """This read would take the listener above max_buffered_bytes: refuse the message it belongs to, close."""
        log.warning(
            "connection.overloaded",
            adapter=self.listener.name,
            peer=self.peer,
            buffered=self.listener.buffered,
            limit=self.listener.max_buffered_bytes,
        )
        start = -1 if self.inside else data.find(START)
        if not self.inside and start < 0:  # no message begun: nobody to answer
            self._refuse(_CLOSE, b"")
            return
        # As much of the message's start as the limit leaves room for (its MSH, with any room at all).
        room = max(0, min(HEAD, self.listener.max_buffered_bytes - (self.listener.buffered - self.held)))
        head = (bytes(self.buf[:room]) + data[:room] if self.inside else data[start + 1 : start + 1 + room])[:room]
        end = head.find(END)
        self._refuse("overloaded", head[:end] if end >= 0 else head)

    def _refuse(self, why: str, head: bytes) -> None:
        """Stop reading for good: what is queued is answered, then ``head`` (a refused message's start), then close."""
        self.refused = True
        self.buf.clear()
        self.inside = self.bad_end = False
        self._push(why, head)
        if not self.paused:
            self._pause()

    def _pause(self) -> None:
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def _push(self, why: str | None, data: bytes) -> None:
        self.queue.append((why, data))
        self.queued += len(data)
        self._wake()

    def _account(self) -> None:
        held = len(self.buf) + self.queued
        self.listener.buffered += held - self.held
        self.held = held

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def check_deadlines(self, now: float) -> None:
        """Called by the listener's sweep: refuse a frame past frame_timeout, close a connection idle too long."""
        listener = self.listener
        if self.closed or self.refused:
            return
        if self.inside and not self.paused and now - self.frame_started > listener.frame_timeout:
            seconds = listener.frame_timeout
            log.warning("frame.timeout", adapter=listener.name, peer=self.peer, seconds=seconds, bytes=len(self.buf))
            self._refuse("frame_timeout", bytes(self.buf[:HEAD]))
            self._account()
        elif (
            self.inside
            and not self.paused
            and (self.bad_end or self.buf[-1:] == b"\x1c")
            and now - self.last_read > END_WAIT
        ):
            log.warning("frame.no_end_cr", adapter=listener.name, peer=self.peer, seconds=END_WAIT, bytes=len(self.buf))
            message = bytes(self.buf[:-1] if self.buf[-1:] == b"\x1c" else self.buf)
            self._refuse("bad_end_block", message)
            self._account()
        elif not (self.inside or self.queue or self.busy) and now - self.idle_since > listener.idle_timeout:
            log.info("connection.idle_timeout", adapter=listener.name, peer=self.peer, seconds=listener.idle_timeout)
            self.close()

    # -- answering -------------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            peer_subject.set(self.subject)  # this task's context: what the handler and its callees read
            transport = self.transport
            assert transport is not None
            await self._answer_queue()
            if self.refused and not (self.eof or self.closed or transport.is_closing()):
                await self._linger()
            if self.inside and self.buf:
                log.warning("connection.partial_frame", adapter=self.listener.name, peer=self.peer, bytes=len(self.buf))
                if bytes(self.buf[:HEAD]).strip(BETWEEN_FRAMES) and self.listener.on_refused:
                    await self.listener.on_refused(bytes(self.buf[:HEAD]), self.peer, "partial_frame")  # unanswered
            elif (rest := bytes(self.buf).lstrip(BETWEEN_FRAMES)).rstrip(BETWEEN_FRAMES) and self.listener.on_refused:
                await self.listener.on_refused(rest, self.peer, "outside_frame")  # left at the close: not answered
        except asyncio.CancelledError:
            pass  # the listener stops
        except Exception:
            log.exception("connection.failed", adapter=self.listener.name, peer=self.peer)
        finally:
            self.close()
            self.queue.clear()
            self.queued = 0
            self.buf = bytearray()
            self.listener._release(self)
            log.debug("connection.close", adapter=self.listener.name, peer=self.peer)

    async def _answer_queue(self) -> None:
        assert self.transport is not None
        while not self.closed:  # closed: the peer left or a deadline passed; whatever is queued gets no answer
            if not self.queue:
                if self.refused:
                    return
                if self.paused:
                    self.paused = False
                    self.transport.resume_reading()
                    if self.inside:  # the time we did not read is not the peer's: its frame's deadline restarts
                        self.frame_started = self.last_read = self.loop.time()
                self.idle_since = self.loop.time()
                self.waiter = self.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
                continue
            why, data = self.queue[0]  # stays counted as buffered until answered
            self.busy = True
            try:
                reply = await self._answer(why, data)
            finally:
                self.queue.popleft()
                self.queued -= len(data)
                self._account()
            if reply is not None and not self.transport.is_closing():
                self.transport.write(frame(reply))
                if self.drained is not None:  # the peer does not read what we write: give it write_timeout
                    try:
                        await asyncio.wait_for(self.drained, self.listener.write_timeout)
                    except TimeoutError:
                        log.warning(
                            "connection.write_timeout",
                            adapter=self.listener.name,
                            peer=self.peer,
                            seconds=self.listener.write_timeout,
                        )
                        self.transport.abort()
                        return
            self.busy = False
            if why is not None and why not in _GO_ON:
                return  # a refused message or a flood: the stream cannot be trusted any further

    async def _linger(self) -> None:
        """Before closing on a peer that may still be sending, read (and drop) what it sends for LINGER seconds:
        closing with unread bytes resets the connection, and a reset destroys the answer the peer has not read."""
        assert self.transport is not None
        if self.transport.can_write_eof():
            self.transport.write_eof()  # after the answer: the peer reads it, then the end of the stream
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = self.loop.create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.waiter, LINGER)  # woken by the peer's end of stream
        self.waiter = None

    async def _answer(self, why: str | None, data: bytes) -> bytes | None:
        listener = self.listener
        if why is None:
            return await listener.handler(data, self.peer)
        if why == _CLOSE:
            return None
        if why == "too_large":
            log.warning("frame.too_large", adapter=listener.name, peer=self.peer, limit=listener.max_message_size)
            return await listener.on_oversize(data, self.peer) if listener.on_oversize else None
        if why in _GO_ON:  # the others were logged when detected
            log.warning("frame." + why.removeprefix("frame_"), adapter=listener.name, peer=self.peer, bytes=len(data))
        return await listener.on_refused(data, self.peer, why) if listener.on_refused else None  # type: ignore[arg-type]

    def close(self) -> None:
        """Close gracefully (what is written goes out first), but never wait longer than write_timeout for it."""
        self.closed = True
        self._wake()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                self.loop.call_later(self.listener.write_timeout, transport.abort)


class MLLPClient:
    """Sends messages over one MLLP connection and returns each reply (the ACK)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 30.0,
        ssl: ssl.SSLContext | None = None,
        server_hostname: str = "",
    ):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.ssl = ssl  # a client context (`traboule.tls.client_context`): TLS, the server's certificate checked
        self.server_hostname = server_hostname  # the name checked in it when not ``host``
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> MLLPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        tls: dict[str, Any] = {}
        if self.ssl is not None:
            tls = {"ssl": self.ssl, "server_hostname": self.server_hostname or self.host}
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=64 * 1024 * 1024, **tls), self.timeout
        )

    async def send(self, message: bytes) -> bytes:
        if self._writer is None or self._reader is None:
            await self.connect()
        assert self._writer is not None and self._reader is not None
        self._writer.write(frame(message))
        await self._writer.drain()
        data = await asyncio.wait_for(self._reader.readuntil(END), self.timeout)
        start = data.find(START)
        return data[start + 1 : -len(END)]

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._writer.wait_closed(), self.timeout)  # TLS: the peer's close_notify
            self._writer = self._reader = None


class MLLPSender:
    """One kept MLLP connection to a receiver, one message at a time, each answer judged.

    ``send`` returns the acknowledgment code (AA or CA) or raises ``NotAccepted``; after a transport failure, or an
    answer out of step with the messages (a late answer to an earlier one), the connection is dropped and reopened
    by the next call. ``judge`` reads an answer: (message sent, answer) → `AckReading`; by default
    `traboule.formats.hl7.read_ack` (HL7 v2 original mode: MSA-1, MSA-2 against MSH-10).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float = 10.0,
        judge: AckJudge = read_ack,
        ssl: ssl.SSLContext | None = None,
        server_hostname: str = "",
    ) -> None:
        self.client = MLLPClient(host, port, timeout=timeout, ssl=ssl, server_hostname=server_hostname)
        self.judge = judge
        self._lock = asyncio.Lock()
        self._counter = 0
        self._prefix = uuid.uuid4().hex[:8]

    @classmethod
    def from_config(
        cls, channel: str, destination: dict[str, Any] | None, tls_defaults: TLSSettings | None = None
    ) -> MLLPSender:
        """From a channel's ``destination = {adapter = "mllp-sender", host, port, timeout, tls}`` (host and port
        needed). ``tls``: true (``tls_defaults``, the ``[tls]`` table), false, or a table overriding them."""
        dest = destination or {}
        if dest.get("adapter", "mllp-sender") != "mllp-sender":
            raise ValueError(f"channel {channel}: destination adapter {dest.get('adapter')!r} not supported")
        if not dest.get("host") or not dest.get("port"):
            raise ValueError(f"channel {channel}: destination needs host and port (the receiver's MLLP listener)")
        tls = TLSSettings.from_config(dest.get("tls"), f"channel {channel}: destination", tls_defaults)
        return cls(
            str(dest["host"]),
            int(dest["port"]),
            timeout=float(dest.get("timeout", 10)),
            ssl=client_context(tls) if tls.enabled else None,
            server_hostname=tls.server_name,
        )

    def next_control_id(self, tag: str = "") -> str:
        """A fresh MSH-10 for a message to this receiver (unique across restarts: a random prefix)."""
        self._counter += 1
        return f"{self._prefix}{tag}{self._counter}"

    @property
    def address(self) -> str:
        scheme = "mllps" if self.client.ssl is not None else "mllp"
        return f"{scheme}://{self.client.host}:{self.client.port}"

    async def close(self) -> None:
        await self.client.close()

    async def send(self, data: bytes) -> str:
        async with self._lock:
            try:
                answer = await self.client.send(data)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                await self.client.close()
                raise NotAccepted(f"receiver unreachable or silent: {type(exc).__name__}: {exc}") from exc
        reading = self.judge(data, answer)
        if reading.out_of_step:  # this message's fate is unknown, and the next answers would be misread: start over
            await self.client.close()
        if not reading.accepted:
            raise NotAccepted(reading.reason)
        return reading.code
