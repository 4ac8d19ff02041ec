"""DICOM Modality Worklist C-FIND SCP (and C-ECHO) serving a `WorklistStore`, with pynetdicom.

One AE object is built once and its non-blocking server runs in pynetdicom's threads (one per association);
each C-FIND streams the store's matches as Pending responses, then Success. Logs carry AE titles, counts and
timings only: pynetdicom's own identifier logging (which would print patient names) is switched off.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from adapters.dicom_server import DicomServer
from traboule import metrics
from traboule.dicom_match import QueryError
from traboule.worklist import WorklistStore

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


class WorklistSCP(DicomServer):
    """Modality Worklist Information Model - FIND SCP and Verification SCP.

    Any calling AE title is accepted; the called AE title must be `ae_title`. `max_results` > 0 caps the
    number of matches sent for one query: the query then ends with Success and the log says "truncated".
    """

    contexts = (ModalityWorklistInformationFind, Verification)
    name = "mwl"

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
        self.case_insensitive_names = case_insensitive_names
        self.max_results = max_results
        super().__init__(ae_title=ae_title, host=host, port=port)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]

    # -- handlers (pynetdicom threads) -----------------------------------------------------------------------

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
