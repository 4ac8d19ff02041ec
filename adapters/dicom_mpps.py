"""DICOM Modality Performed Procedure Step SCP (N-CREATE, N-SET) and Verification SCP, with pynetdicom.

Protocol only: each request is handed to ``handler(kind, sop_instance_uid, attribute_list)`` (``kind`` is
``"create"`` or ``"set"``), which returns the DIMSE status to answer (an int, or ``(status, error_comment)``, or
``(status, error_comment, error_id)``). Whether an instance exists, may still be updated or was journaled is the
handler's business: it holds the state. The handler runs in pynetdicom's association thread and may block.

Logs carry AE titles, SOP instance UIDs and statuses only: pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import suppress

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.transport import ThreadedAssociationServer

log = structlog.get_logger("traboule.adapters.dicom_mpps")

SUCCESS = 0x0000
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
# PS3.4 F.7.2.2 (N-SET): "Processing failure: Performed Procedure Step Object may no longer be updated" is
# 0110H with Error ID (0000,0902) A710H.
MAY_NO_LONGER_BE_UPDATED = 0xA710

HandlerResult = int | tuple[int, str] | tuple[int, str, int]
MPPSHandler = Callable[[str, str, Dataset], HandlerResult]


def status_dataset(status: int, comment: str = "", error_id: int | None = None) -> Dataset:
    """The status dataset pynetdicom copies into the N-CREATE / N-SET response."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    if error_id is not None:
        ds.ErrorID = error_id
    return ds


class MPPSSCP:
    """Modality Performed Procedure Step SOP Class SCP (+ Verification). Any calling AE title is accepted; the
    called AE title must be ``ae_title``."""

    def __init__(
        self, handler: MPPSHandler, *, ae_title: str = "TRABOULE", host: str = "127.0.0.1", port: int = 11113
    ) -> None:
        self.handler = handler
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._server: ThreadedAssociationServer | None = None
        self._ae = self._build_ae()
        self._log = log.bind(ae_title=ae_title)

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.acse_timeout = 30
        ae.dimse_timeout = 30
        ae.network_timeout = 300
        ae.add_supported_context(ModalityPerformedProcedureStep)
        ae.add_supported_context(Verification)
        return ae

    @property
    def is_running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Listen (non-blocking); with port 0 the chosen port is written back to ``self.port``."""
        if self._server is not None:
            return
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_N_CREATE, self._on_create),
            (evt.EVT_N_SET, self._on_set),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
        ]
        self._server = self._ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        self._log.info("mpps.listening", host=self.host, port=self.port)

    def stop(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        active = server.active_associations
        server.shutdown()
        for assoc in active:
            assoc.abort()
        self._log.info("mpps.stopped")

    # -- handlers (pynetdicom threads) -----------------------------------------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        # As in dicom_mwl: without TCP_NODELAY each small response PDU waits for the peer's delayed ACK (~40 ms).
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            with suppress(OSError):
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_create(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        # PS3.7 10.1.5: the SCU may leave the instance UID to the SCP, which then returns it in the response.
        uid = event.request.AffectedSOPInstanceUID or generate_uid()
        if not event.request.AffectedSOPInstanceUID:
            event.request.AffectedSOPInstanceUID = uid
        return self._call(event, "create", str(uid))

    def _on_set(self, event: evt.Event) -> tuple[Dataset, Dataset | None]:
        return self._call(event, "set", str(event.request.RequestedSOPInstanceUID))

    def _call(self, event: evt.Event, kind: str, uid: str) -> tuple[Dataset, Dataset | None]:
        bound = self._log.bind(calling_aet=event.assoc.requestor.ae_title, kind=kind, sop_instance_uid=uid)
        try:
            attributes = event.attribute_list
        except Exception as exc:  # undecodable attribute list
            bound.warning("mpps.undecodable", error=type(exc).__name__)
            return status_dataset(PROCESSING_FAILURE, "the attribute list could not be decoded"), None
        try:
            result = self.handler(kind, uid, attributes)
        except Exception as exc:
            bound.error("mpps.handler_failed", error=type(exc).__name__)
            return status_dataset(PROCESSING_FAILURE, "the request could not be processed"), None
        status, comment, error_id = _unpack(result)
        bound.info("mpps." + kind, status=f"0x{status:04X}")
        if status == SUCCESS:
            return status_dataset(SUCCESS), attributes
        return status_dataset(status, comment, error_id), None


def _unpack(result: HandlerResult) -> tuple[int, str, int | None]:
    if isinstance(result, int):
        return result, "", None
    if len(result) == 2:
        return int(result[0]), str(result[1]), None
    return int(result[0]), str(result[1]), int(result[2])  # type: ignore[misc]
