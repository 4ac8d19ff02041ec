"""DICOM Modality Worklist C-FIND SCP (and C-ECHO) serving a `WorklistStore`, with pynetdicom.

One AE object is built once and its non-blocking server runs in pynetdicom's threads (one per association);
each C-FIND streams the store's matches as Pending responses, then Success. Logs carry AE titles, counts and
timings only: pynetdicom's own identifier logging (which would print patient names) is switched off.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import suppress

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification
from pynetdicom.transport import ThreadedAssociationServer

from traboule import metrics
from traboule.dicom_match import QueryError
from traboule.worklist import WorklistStore

log = structlog.get_logger("traboule.adapters.dicom_mwl")

PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # what dcmtk's wlmscpfs answers for an unusable matching key
UNABLE_TO_PROCESS = 0xC001

FindResult = tuple[int | Dataset, Dataset | None]


def _failure(status: int, comment: str, tag: int | None = None) -> Dataset:
    """A failure status dataset; pynetdicom copies ErrorComment and OffendingElement into the response."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]  # LO: at most 64 characters
    if tag is not None:
        ds.OffendingElement = [tag]
    return ds


class WorklistSCP:
    """Modality Worklist Information Model - FIND SCP and Verification SCP.

    Any calling AE title is accepted; the called AE title must be `ae_title`. `max_results` > 0 caps the
    number of matches sent for one query: the query then ends with Success and the log says "truncated".
    """

    def __init__(
        self,
        store: WorklistStore,
        *,
        ae_title: str = "TRABOULE",
        host: str = "127.0.0.1",
        port: int = 11112,
        case_insensitive_names: bool = False,
        max_results: int = 0,
    ) -> None:
        self.store = store
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.case_insensitive_names = case_insensitive_names
        self.max_results = max_results
        self._server: ThreadedAssociationServer | None = None
        self._ae = self._build_ae()
        self._log = log.bind(ae_title=ae_title)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # a wrong called AE is rejected ("called AE title not recognised")
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        ae.network_timeout = 300  # a modality may keep an idle association open between queries
        ae.add_supported_context(ModalityWorklistInformationFind)
        ae.add_supported_context(Verification)
        return ae

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (non-blocking); with port 0 the chosen port is written back to `self.port`."""
        if self._server is not None:
            return
        # Process-wide pynetdicom switches: identifiers would be logged (patient data) and decoded a second
        # time only for that log line.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self._ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        self._log.info("mwl.listening", host=self.host, port=self.port)

    def stop(self) -> None:
        """Stop listening and end open associations."""
        if self._server is None:
            return
        server, self._server = self._server, None
        active = server.active_associations
        server.shutdown()  # stops accepting; open associations would otherwise live until network_timeout
        for assoc in active:
            assoc.abort()
        self._log.info("mwl.stopped")

    # -- handlers (pynetdicom threads) -----------------------------------------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        # pynetdicom leaves Nagle's algorithm on: each small response PDU then waits for the peer's delayed
        # ACK, measured at +40 ms per C-FIND here (88 ms -> 48 ms for an in-process SCU, which keeps Nagle
        # on its side). Fired before the association starts, so every PDU goes out at once.
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            with suppress(OSError):
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_echo(self, event: evt.Event) -> int:
        self._log.debug("mwl.echo", calling_aet=event.assoc.requestor.ae_title)
        return 0x0000

    def _on_rejected(self, event: evt.Event) -> None:
        self._log.warning(
            "mwl.association_rejected",
            calling_aet=event.assoc.requestor.ae_title,
            called_aet=event.assoc.acceptor.ae_title,
        )

    def _on_find(self, event: evt.Event) -> Iterator[FindResult]:
        started = time.perf_counter()
        bound = self._log.bind(calling_aet=event.assoc.requestor.ae_title)
        count, outcome = 0, "success"
        try:
            try:
                query = event.identifier
                results = self.store.find(query, case_insensitive_names=self.case_insensitive_names)
            except QueryError as exc:
                outcome = "invalid_query"
                # The comment goes back to the SCU that sent the value; the log names the key only.
                bound.warning("mwl.invalid_query", key=str(exc.tag) if exc.tag is not None else None)
                yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc), exc.tag), None
                return
            except Exception as exc:  # undecodable identifier, store unavailable...
                outcome = "error"
                bound.error("mwl.find_failed", error=type(exc).__name__)
                yield _failure(UNABLE_TO_PROCESS, "the worklist query could not be processed"), None
                return
            while True:
                try:
                    response = next(results, None)
                except Exception as exc:  # the store failed while streaming
                    outcome = "error"
                    bound.error("mwl.find_failed", error=type(exc).__name__)
                    yield _failure(UNABLE_TO_PROCESS, "the worklist query failed while streaming"), None
                    return
                if response is None:
                    break
                # C-CANCEL (PS3.7 9.3.2.3): stop at once with a Cancel status.
                if event.is_cancelled:
                    outcome = "cancelled"
                    yield CANCEL, None
                    return
                yield PENDING, response
                count += 1
                if self.max_results and count >= self.max_results:
                    outcome = "truncated"
                    break
        finally:
            metrics.mwl_queries.inc()
            bound.info(
                "mwl.find",
                outcome=outcome,
                results=count,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
