"""Syslog sender to an audit record repository: RFC 5424 messages over TLS (RFC 5425), octet-counting framing.

Each message is ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG`` (RFC 5424 with no structured
data, the message UTF-8 with its byte order mark), sent as ``MSG-LEN SP SYSLOG-MSG`` (RFC 5425 section 4.3). The
facility is 10 (security/authorization, ``authpriv``), the severity notice (5), or warning (4) for an event that
failed; MSGID is ``IHE+RFC-3881``, as the IHE ATNA syslog profile (ITI-20) asks for a DICOM audit message.

TLS is the transport: the caller gives the client ``ssl.SSLContext`` (``traboule.tls.client_context``). Plain
TCP with the same framing (RFC 6587 octet counting) only when the caller passes no context, for a laboratory; UDP
is not offered: it loses messages without saying so.

Syslog has no application acknowledgement. `SyslogSender.send` returns once the repository's TCP stack
acknowledged every byte of the batch: asyncio's buffers empty (write buffer limits 0; under TLS the SSL transport's
and the raw transport's buffers polled), then, on Linux, the socket's
send queue polled (``ioctl(TIOCOUTQ)``: bytes not yet acknowledged by the peer) until it is empty, and the
connection not reset (``TCP_INFO``) — with ``TCP_USER_TIMEOUT`` on the socket so that a repository that stopped
answering (powered off, a firewall dropping packets) breaks the connection instead of holding it. Over TLS the
counts are of the ciphertext on the raw socket: the same proof. "Delivered" means no more than that: the bytes
reached the repository host's TCP stack; whether its syslog daemon then stored them, syslog cannot tell.

Protocol I/O only: what to send, and what to do when it fails, is the caller's (`SyslogSender.send` raises).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import ssl
import struct
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
CONNECT_TIMEOUT = 10.0  # seconds to open the connection (and finish the TLS handshake)
WRITE_TIMEOUT = 30.0  # seconds for the repository to acknowledge one batch (256 KiB at ~70 kbit/s)
SETTLE = 0.1  # where the send queue cannot be read (not Linux): seconds a written batch must leave the connection
# open to count as taken (a round trip)
ACK_POLL = 0.005  # first pause between two looks at the send queue (doubled up to 0.1 s)
TCP_ESTABLISHED, TCP_CLOSE_WAIT = 1, 8  # tcpi_state values (linux/tcp_states.h)

_PRINTUSASCII = re.compile(r"[^!-~]", re.ASCII)


def header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without space, at most ``limit`` characters; "-" when empty."""
    text = _PRINTUSASCII.sub("", value)[:limit]
    return text or "-"


def timestamp(at: float) -> str:
    """RFC 5424 TIMESTAMP (RFC 3339, UTC, milliseconds)."""
    moment = datetime.fromtimestamp(at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_message(
    message: bytes,
    *,
    at: float,
    hostname: str,
    app_name: str = "traboule",
    procid: str = "",
    failed: bool = False,
    msgid: str = MSGID,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG carrying ``message`` (UTF-8 XML)."""
    pri = FACILITY_AUTHPRIV * 8 + (SEVERITY_WARNING if failed else SEVERITY_NOTICE)
    header = " ".join(
        (
            f"<{pri}>1",
            timestamp(at),
            header_field(hostname, 255),
            header_field(app_name, 48),
            header_field(procid or str(os.getpid()), 128),
            header_field(msgid, 32),
            "-",  # no structured data
        )
    )
    return header.encode("ascii") + b" " + BOM + message


def frame(syslog_message: bytes) -> bytes:
    """Octet-counting framing (RFC 5425 4.3, RFC 6587 3.4.1): ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(syslog_message)).encode("ascii") + b" " + syslog_message


class SyslogSender:
    """A connection to one syslog receiver, opened on first use and again after it broke.

    ``ssl_context``: TLS (RFC 5425); None: plain TCP (only when configured so explicitly). ``server_name``: the
    name checked in the receiver's certificate (default: ``host``). `send` writes framed messages and returns once
    the receiver's TCP stack acknowledged all of them (see the module), within ``write_timeout`` seconds; any
    failure or timeout closes the connection and raises (``OSError``, ``TimeoutError``, ``ssl.SSLError``): the
    caller keeps the batch and sends it again. The receiver never answers: the connection is also watched for its
    end (a receiver that stopped closes it, or resets it when written to). ``settle``: where the send queue cannot
    be read (not Linux), how long a written batch must leave the connection open to count as taken.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        *,
        server_name: str = "",
        connect_timeout: float = CONNECT_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        settle: float = SETTLE,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.connect_timeout = connect_timeout
        self.write_timeout = write_timeout
        self.settle = settle
        self._writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing() and not (self._watch and self._watch.done())

    async def _connect(self) -> None:
        tls = {}
        if self.ssl_context is not None:
            tls = {"ssl": self.ssl_context, "server_hostname": self.server_name or self.host}
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, **tls), self.connect_timeout
        )
        self._writer = writer
        self._watch = asyncio.create_task(self._until_closed(reader), name="syslog-watch")
        if self.ssl_context is None:  # drain() waits for an empty user-space buffer, not for 64 KiB
            # (Not under TLS: asyncio's SSL transport stays paused at a 0 low-water mark; `_acknowledged` polls
            # its buffers, and the raw transport's, instead.)
            with contextlib.suppress(Exception):
                writer.transport.set_write_buffer_limits(0)
        raw = _raw_socket(writer)
        if raw is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
            with contextlib.suppress(OSError):  # unacknowledged data older than this breaks the connection
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.write_timeout * 1000))

    @staticmethod
    async def _until_closed(reader: asyncio.StreamReader) -> None:
        """Read (and drop) whatever the receiver sends until its end of stream."""
        with contextlib.suppress(Exception):
            while await reader.read(4096):
                pass

    async def send(self, messages: Sequence[bytes]) -> None:
        """Write ``messages`` (SYSLOG-MSGs, `format_message`), framed, in one write."""
        if not self.connected:
            await self.close()
            await self._connect()
        for _ in range(3):  # let the watcher see an end of stream that already arrived (TLS takes a few turns)
            await asyncio.sleep(0)
        if not self.connected:
            await self.close()
            raise ConnectionResetError("the syslog receiver closed the connection")
        assert self._writer is not None
        try:
            self._writer.write(b"".join(frame(m) for m in messages))
            await asyncio.wait_for(self._acknowledged(self._writer), self.write_timeout)
        except BaseException:
            await self.close()
            raise
        if not self.connected:
            await self.close()
            raise ConnectionResetError("the syslog receiver closed the connection during the write")

    async def _acknowledged(self, writer: asyncio.StreamWriter) -> None:
        """Until every byte written is acknowledged by the receiver's TCP stack (see the module); raises when the
        connection broke meanwhile."""
        await writer.drain()
        transports = _transports(writer)
        raw = _raw_socket(writer)
        if raw is None or not hasattr(_termios, "TIOCOUTQ"):
            # No send queue to read: a receiver that went away answers the write with a reset; wait that long.
            await asyncio.sleep(self.settle)
            return
        pause = ACK_POLL
        while True:
            if not self.connected:
                raise ConnectionResetError("the syslog receiver closed the connection during the write")
            buffered = sum(t.get_write_buffer_size() for t in transports)
            if not buffered and _unacknowledged(raw) == 0:
                break
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        # An empty send queue is also what a reset leaves (the queue purged): the connection must still be up.
        if _tcp_state(raw) not in (TCP_ESTABLISHED, TCP_CLOSE_WAIT, None):
            raise ConnectionResetError("the syslog receiver reset the connection during the write")

    async def close(self) -> None:
        writer, watch = self._writer, self._watch
        self._writer = self._watch = None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watch
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)


try:  # Linux: the send queue of a socket (SIOCOUTQ)
    import fcntl as _fcntl
    import termios as _termios
except ImportError:  # pragma: no cover - not POSIX
    _fcntl = _termios = None  # type: ignore[assignment]


def _transports(writer: asyncio.StreamWriter) -> list[asyncio.BaseTransport]:
    """The writer's transport and, under TLS, the raw transport beneath it (its ciphertext buffer)."""
    out: list[Any] = [writer.transport]
    raw = getattr(getattr(writer.transport, "_ssl_protocol", None), "_transport", None)
    if raw is not None and hasattr(raw, "get_write_buffer_size"):
        out.append(raw)
    return out


def _raw_socket(writer: asyncio.StreamWriter) -> Any:
    if sys.platform != "linux":
        return None
    return writer.get_extra_info("socket")


def _unacknowledged(sock: Any) -> int:
    """Bytes in the socket's send queue: not sent yet, or sent and not acknowledged by the peer (TIOCOUTQ)."""
    data = _fcntl.ioctl(sock.fileno(), _termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", data)[0])


def _tcp_state(sock: Any) -> int | None:
    """The connection's TCP state (``tcpi_state``, the first byte of ``TCP_INFO``), None when unknown."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    except (OSError, AttributeError):
        return None
