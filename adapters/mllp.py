"""MLLP (HL7 v2 over TCP, minimal lower layer protocol): a listener and a client. Framing only.

A frame is ``0x0B message 0x1C 0x0D``. The listener hands each message's bytes to a handler and writes back the
bytes the handler returns (the ACK), one message at a time per connection as HL7 original mode requires; many
connections are served at once. No HL7 knowledge lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

START, END = b"\x0b", b"\x1c\x0d"
log = structlog.get_logger("traboule.mllp")

MessageHandler = Callable[[bytes, str], Awaitable[bytes]]  # (message bytes, peer "host:port") -> reply bytes
OversizeHandler = Callable[[bytes, str], Awaitable[bytes]]  # (first bytes of the message, peer) -> reply


def frame(message: bytes) -> bytes:
    return START + message + END


class MLLPListener:
    """Accepts MLLP connections and answers each framed message with the handler's reply."""

    def __init__(
        self,
        handler: MessageHandler,
        *,
        host: str = "127.0.0.1",
        port: int = 2575,
        max_message_size: int = 16 * 1024 * 1024,
        idle_timeout: float = 300.0,
        on_oversize: OversizeHandler | None = None,
        name: str = "mllp",
    ):
        self.handler = handler
        self.host = host
        self.port = port
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.on_oversize = on_oversize
        self.name = name
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, limit=self.max_message_size + len(START) + len(END)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("listening", adapter=self.name, host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._server:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task:
            self._connections.add(task)
        host, port = writer.get_extra_info("peername")[:2]
        peer = f"{host}:{port}"
        log.debug("connection.open", adapter=self.name, peer=peer)
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.readuntil(END), self.idle_timeout)
                except TimeoutError:
                    log.info("connection.idle_timeout", adapter=self.name, peer=peer, seconds=self.idle_timeout)
                    break
                except asyncio.IncompleteReadError as exc:
                    if exc.partial.strip(b"\r\n\x0b\x00 "):
                        log.warning("connection.partial_frame", adapter=self.name, peer=peer, bytes=len(exc.partial))
                    break
                except asyncio.LimitOverrunError:
                    await self._oversize(reader, writer, peer)
                    break
                start = data.find(START)
                if start < 0:
                    log.warning("frame.no_start_block", adapter=self.name, peer=peer, bytes=len(data))
                    continue
                if start > 0 and data[:start].strip(b"\r\n\x00 "):
                    log.warning("frame.garbage_before_start", adapter=self.name, peer=peer, bytes=start)
                reply = await self.handler(data[start + 1 : -len(END)], peer)
                writer.write(frame(reply))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task:
                self._connections.discard(task)
            log.debug("connection.close", adapter=self.name, peer=peer)

    async def _oversize(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """Too large: answer (the handler journals and NAKs it) and close, as the stream cannot be resynced."""
        head = bytes(reader._buffer[: 64 * 1024])  # the start of the message, enough for its MSH
        log.warning("frame.too_large", adapter=self.name, peer=peer, limit=self.max_message_size)
        if self.on_oversize:
            start = head.find(START)
            reply = await self.on_oversize(head[start + 1 :] if start >= 0 else head, peer)
            writer.write(frame(reply))
            with contextlib.suppress(ConnectionError):
                await writer.drain()


class MLLPClient:
    """Sends messages over one MLLP connection and returns each reply (the ACK)."""

    def __init__(self, host: str, port: int, *, timeout: float = 30.0):
        self.host = host
        self.port = port
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> MLLPClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=64 * 1024 * 1024), self.timeout
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
                await self._writer.wait_closed()
            self._writer = self._reader = None


class NotAccepted(Exception):
    """The receiver did not accept a message (AE/AR, an unreadable ACK, no answer, a broken connection)."""


class MLLPSender:
    """One kept MLLP connection to a receiver, one message at a time, each ACK checked.

    ``send`` returns the acknowledgment code (AA or CA) or raises ``NotAccepted``; after a transport failure the
    connection is dropped and reopened by the next call.
    """

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.client = MLLPClient(host, port, timeout=timeout)
        self._lock = asyncio.Lock()
        self._counter = 0
        self._prefix = uuid.uuid4().hex[:8]

    @classmethod
    def from_config(cls, channel: str, destination: dict[str, Any] | None) -> MLLPSender:
        """From a channel's ``destination = {adapter = "mllp-sender", host, port, timeout}`` (host and port needed)."""
        dest = destination or {}
        if dest.get("adapter", "mllp-sender") != "mllp-sender":
            raise ValueError(f"channel {channel}: destination adapter {dest.get('adapter')!r} not supported")
        if not dest.get("host") or not dest.get("port"):
            raise ValueError(f"channel {channel}: destination needs host and port (the receiver's MLLP listener)")
        return cls(str(dest["host"]), int(dest["port"]), timeout=float(dest.get("timeout", 10)))

    def next_control_id(self, tag: str = "") -> str:
        """A fresh MSH-10 for a message to this receiver (unique across restarts: a random prefix)."""
        self._counter += 1
        return f"{self._prefix}{tag}{self._counter}"

    @property
    def address(self) -> str:
        return f"mllp://{self.client.host}:{self.client.port}"

    async def close(self) -> None:
        await self.client.close()

    async def send(self, data: bytes) -> str:
        from traboule import hl7

        async with self._lock:
            try:
                reply = await self.client.send(data)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                await self.client.close()
                raise NotAccepted(f"receiver unreachable or silent: {type(exc).__name__}: {exc}") from exc
        try:
            ack = hl7.parse(hl7.decode(reply).text)
        except hl7.HL7Error as exc:
            raise NotAccepted(f"unreadable ACK: {exc}") from exc
        msa = ack.segment("MSA")
        code = msa.field(1) if msa else ""
        sent_id = _control_id(data)
        if msa is not None and sent_id and msa.field(2) and msa.field(2) != sent_id:
            # A late answer to an earlier message (after a timeout): this one's fate is unknown; start over.
            await self.client.close()
            raise NotAccepted(f"the ACK is for message {msa.field(2)!r}, not {sent_id!r}")
        if code not in ("AA", "CA"):
            text = msa.field(3) if msa else ""
            err = ack.segment("ERR")
            detail = text or (err.field(8) if err else "")
            raise NotAccepted(f"receiver answered {code or 'no MSA'} {detail}".strip())
        return code


def _control_id(data: bytes) -> str:
    """MSH-10 of an outgoing message, from its first segment (no full parse of a message that carries a CDA)."""
    first = data.split(b"\r", 1)[0]
    if not first.startswith(b"MSH") or len(first) < 4:
        return ""
    fields = first.split(first[3:4])
    return fields[9].decode("latin-1") if len(fields) > 9 else ""
