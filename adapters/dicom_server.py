"""What every DICOM SCP of the engine shares: one pynetdicom AE built once, a non-blocking server, TCP_NODELAY
on each association, and pynetdicom's identifier logging switched off (it would print patient data).

Subclasses name their presentation contexts and event handlers; the lifecycle is here.
"""

from __future__ import annotations

import socket
from contextlib import suppress
from typing import Any

import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer


class DicomServer:
    """Base of the SCPs: ``start()`` / ``stop()``; any calling AE title, the called AE title must be ``ae_title``."""

    contexts: tuple[str, ...] = ()  # abstract syntaxes served
    name = "dicom"  # prefix of the log events

    def __init__(self, *, ae_title: str, host: str, port: int) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._server: ThreadedAssociationServer | None = None
        self._ae = self._build_ae()
        self._log = structlog.get_logger(f"traboule.adapters.{self.name}").bind(ae_title=ae_title)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # a wrong called AE is rejected ("called AE title not recognised")
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        ae.network_timeout = 300  # a modality may keep an idle association open between requests
        for context in self.contexts:
            ae.add_supported_context(context)
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        """The pynetdicom event handlers of this SCP (besides the connection one)."""
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
        handlers = [(evt.EVT_CONN_OPEN, self._on_connection), *self.handlers()]
        self._server = self._ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        self._log.info(f"{self.name}.listening", host=self.host, port=self.port)

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
