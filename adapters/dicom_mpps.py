"""DICOM Modality Performed Procedure Step SCP (N-CREATE, N-SET) and Verification SCP, with pynetdicom.

Protocol only: each request is handed to ``handler(kind, sop_instance_uid, attribute_list, peer)`` (``kind`` is
``"create"`` or ``"set"``; ``peer`` the `Peer` that sent it: calling AE title, address, TLS certificate subject),
which returns the DIMSE status to answer (an int, or ``(status, error_comment)``, or ``(status, error_comment,
error_id)``). Whether an instance exists, may still be updated or was journaled is the handler's business: it holds
the state. The handler runs in pynetdicom's association thread and may block.

Logs carry AE titles, SOP instance UIDs and statuses only: pynetdicom's identifier logging is switched off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

from traboule.adapters.dicom_server import DicomServer, Peer, SCPLimits, peer_of

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
MPPSHandler = Callable[[str, str, Dataset, Peer], HandlerResult]


def status_dataset(status: int, comment: str = "", error_id: int | None = None) -> Dataset:
    """The status dataset pynetdicom copies into the N-CREATE / N-SET response."""
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    if error_id is not None:
        ds.ErrorID = error_id
    return ds


class MPPSSCP(DicomServer):
    """Modality Performed Procedure Step SOP Class SCP (+ Verification). Any calling AE title is accepted; the
    called AE title must be ``ae_title``; ``limits`` bounds what callers may hold (see ``SCPLimits``)."""

    contexts = (ModalityPerformedProcedureStep, Verification)
    name = "mpps"

    def __init__(
        self,
        handler: MPPSHandler,
        *,
        ae_title: str = "TRABOULE",
        host: str = "127.0.0.1",
        port: int = 11113,
        limits: SCPLimits | None = None,
        **security: Any,
    ) -> None:
        self.handler = handler
        # ssl_context, allowed_subjects, ae_certificates, on_peer_refused: see DicomServer.
        super().__init__(ae_title=ae_title, host=host, port=port, limits=limits, **security)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_N_CREATE, self._on_create),
            (evt.EVT_N_SET, self._on_set),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
        ]

    # -- handlers (pynetdicom threads) -----------------------------------------------------------------------

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
            result = self.handler(kind, uid, attributes, peer_of(event.assoc))
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
