"""DICOM Modality Worklist C-FIND SCP (and C-ECHO), with pynetdicom.

Protocol only: each C-FIND identifier is handed to ``find`` (the worklist store's ``find`` in the ``worklist``
channel), whose matches are streamed as Pending responses, then Success; what matches is ``find``'s business. One
AE object is built once and its non-blocking server runs in pynetdicom's threads (one per association). Logs carry
AE titles, counts and timings only: pynetdicom's own identifier logging (which would print patient names) is
switched off.

Each C-FIND is bounded: at most `max_examined` items examined and `query_timeout` seconds, else it ends with
A700 "Refused: Out of Resources"; a C-CANCEL, or the association going away, stops the scan itself (checked
before every candidate item, not only between matches), so a query that matches nothing still stops at once.

After each C-FIND, ``on_query(peer, identifier, patients, outcome, sop_class=..., transfer_syntax=...)`` (when
given) hears who asked (`Peer`: calling AE title, address, TLS certificate subject), the identifier's bytes as
received, the (PatientID, IssuerOfPatientID) of the items returned (each once, at most `MAX_AUDITED_PATIENTS`), the
outcome (``success``, ``truncated``, ``cancelled``, ``association_gone``, ``invalid_query``, ``out_of_resources``,
``error``), the C-FIND's SOP Class UID and the transfer syntax UID of its presentation context (the identifier's
encoding): the worklist channel audits it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from traboule import metrics
from traboule.adapters.dicom_server import DicomServer, Peer, SCPLimits, peer_of
from traboule.errors import QueryError
from traboule.formats.dicom_match import ScanStopped

PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700  # PS3.4 K.4.1.1.4 (C-FIND of Basic Worklist Management): "Refused: Out of Resources"
IDENTIFIER_DOES_NOT_MATCH = 0xA900  # what dcmtk's wlmscpfs answers for an unusable matching key
UNABLE_TO_PROCESS = 0xC001

FindResult = tuple[int | Dataset, Dataset | None]
MAX_AUDITED_PATIENTS = 1000  # distinct patients handed to on_query for one C-FIND; the rest are counted only


class QueryHook(Protocol):
    """``on_query``: see the module."""

    def __call__(
        self,
        peer: Peer,
        identifier: bytes,
        patients: list[tuple[str, str]],
        outcome: str,
        *,
        sop_class: str,
        transfer_syntax: str,
    ) -> None: ...


class FindItems(Protocol):
    """What a `WorklistSCP` asks for the response identifiers of the items matching ``query`` (the signature of
    `traboule.stores.worklist.WorklistStore.find`). It raises `QueryError` at once (not on first iteration) for an
    unusable query and, while iterating, `ScanStopped` before examining one more item once ``max_examined`` (> 0)
    items were examined, ``time.monotonic()`` passed ``deadline`` or ``should_stop()`` returned True."""

    def __call__(
        self,
        query: Dataset,
        *,
        case_insensitive_names: bool = False,
        max_examined: int = 0,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Dataset]: ...


def _failure(status: int, comment: str, tag: int | None = None) -> Dataset:
    """A failure status dataset; pynetdicom copies ErrorComment and OffendingElement into the response."""
    ds = Dataset()
    ds.Status = status
    # LO of at most 64 characters, in the command set's default repertoire (ISO-IR 6, no Specific Character Set):
    # the comment may quote the offending value, whose backslashes would split it into several values.
    ds.ErrorComment = "".join(ch if " " <= ch <= "~" and ch != "\\" else "?" for ch in comment[:64])
    if tag is not None:
        ds.OffendingElement = [tag]
    return ds


class _FindGuard:
    """Whether a C-FIND must end early: a C-CANCEL for it arrived (PS3.7 9.3.2.3), or its association is gone.

    Called by ``find`` before each candidate item and by the handler before each response; cheap (a dict
    lookup and a state read), and remembers its answer (pynetdicom forgets a C-CANCEL once it was reported)."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self.reason: str | None = None

    def __call__(self) -> bool:
        if self.reason is None:
            if self._event.is_cancelled:
                self.reason = "cancelled"
            elif _association_gone(self._event.assoc):
                self.reason = "association_gone"
        return self.reason is not None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _association_gone(assoc: Any) -> bool:
    # Sta6 is "association established and ready for data transfer" (PS3.8 9.2); during a C-FIND, any other
    # state means the peer aborted, asked to release, or its connection dropped (A-P-ABORT, Sta1).
    return not assoc.is_established or assoc.dul.state_machine.current_state != "Sta6"


class WorklistSCP(DicomServer):
    """Modality Worklist Information Model - FIND SCP and Verification SCP, answering C-FIND with ``find``.

    Any calling AE title is accepted; the called AE title must be `ae_title`. `max_results` > 0 caps the
    number of matches sent for one query: the query then ends with Success and the log says "truncated".
    `max_examined` and `query_timeout` (seconds) bound the work of one query (0: no bound); beyond, A700.
    `limits` bounds what callers may hold (associations, timeouts: see `SCPLimits`). `on_query`: see the module.
    """

    contexts = (ModalityWorklistInformationFind, Verification)
    name = "mwl"

    def __init__(
        self,
        find: FindItems,
        *,
        ae_title: str = "TRABOULE",
        host: str = "127.0.0.1",
        port: int = 11112,
        case_insensitive_names: bool = False,
        max_results: int = 0,
        max_examined: int = 50_000,
        query_timeout: float = 10.0,
        limits: SCPLimits | None = None,
        on_query: QueryHook | None = None,
        **security: Any,
    ) -> None:
        self.find = find
        self.case_insensitive_names = case_insensitive_names
        self.max_results = max_results
        self.max_examined = max_examined
        self.query_timeout = query_timeout
        self.on_query = on_query
        # ssl_context, allowed_subjects, ae_certificates, on_peer_refused: see DicomServer.
        super().__init__(ae_title=ae_title, host=host, port=port, limits=limits, **security)

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
        deadline = time.monotonic() + self.query_timeout if self.query_timeout > 0 else None
        bound = self._log.bind(calling_aet=event.assoc.requestor.ae_title)
        guard = _FindGuard(event)
        count, outcome = 0, "success"
        patients: dict[tuple[str, str], None] = {}  # returned, in order, each once
        try:
            try:
                query = event.identifier
            except Exception as exc:  # not even a data set pydicom can read (e.g. a NUL in its character set)
                outcome = "invalid_query"
                bound.warning("mwl.undecodable_identifier", error=type(exc).__name__)
                yield _failure(IDENTIFIER_DOES_NOT_MATCH, "the identifier cannot be decoded"), None
                return
            try:
                results = self.find(
                    query,
                    case_insensitive_names=self.case_insensitive_names,
                    max_examined=self.max_examined,
                    deadline=deadline,
                    should_stop=guard,
                )
            except QueryError as exc:
                outcome = "invalid_query"
                # The comment goes back to the SCU that sent the value; the log names the key only.
                bound.warning("mwl.invalid_query", key=str(exc.tag) if exc.tag is not None else None)
                yield _failure(IDENTIFIER_DOES_NOT_MATCH, str(exc), exc.tag), None
                return
            except Exception as exc:  # the worklist unavailable...
                outcome = "error"
                bound.error("mwl.find_failed", error=type(exc).__name__)
                yield _failure(UNABLE_TO_PROCESS, "the worklist query could not be processed"), None
                return
            while True:
                try:
                    response = next(results, None)
                except ScanStopped as exc:
                    if exc.reason == "stopped":
                        break  # the guard's reason is answered below
                    outcome = "out_of_resources"
                    bound.warning(
                        "mwl.query_limit_exceeded",
                        limit=exc.reason,
                        examined=exc.examined,
                        max_examined=self.max_examined,
                        query_timeout=self.query_timeout,
                    )
                    comment = (
                        f"query took over {self.query_timeout:g} s"
                        if exc.reason == "deadline"
                        else f"query examined over {self.max_examined} items"
                    )
                    yield _failure(OUT_OF_RESOURCES, comment), None
                    return
                except Exception as exc:  # the worklist failed while streaming
                    outcome = "error"
                    bound.error("mwl.find_failed", error=type(exc).__name__)
                    yield _failure(UNABLE_TO_PROCESS, "the worklist query failed while streaming"), None
                    return
                if response is None or guard():
                    break
                if self.on_query is not None and len(patients) < MAX_AUDITED_PATIENTS:
                    patients[(_text(response, "PatientID"), _text(response, "IssuerOfPatientID"))] = None
                yield PENDING, response
                count += 1
                if self.max_results and count >= self.max_results:
                    outcome = "truncated"
                    break
            if guard.reason is not None:
                outcome = guard.reason
                if guard.reason == "cancelled":
                    yield CANCEL, None  # C-CANCEL (PS3.7 9.3.2.3): end at once with a Cancel status
                # Association gone: nobody to answer.
                return
        finally:
            metrics.mwl_queries.inc()
            bound.info(
                "mwl.find",
                outcome=outcome,
                results=count,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
            )
            if self.on_query is not None:
                self._report(event, list(patients), outcome)

    def _report(self, event: evt.Event, patients: list[tuple[str, str]], outcome: str) -> None:
        try:
            identifier = event.request.Identifier
            raw = identifier.getvalue() if identifier is not None else b""
            context = getattr(event, "context", None)
            self.on_query(  # type: ignore[misc]
                peer_of(event.assoc),
                bytes(raw),
                patients,
                outcome,
                sop_class=str(getattr(context, "abstract_syntax", "") or ModalityWorklistInformationFind),
                transfer_syntax=str(getattr(context, "transfer_syntax", "") or ""),
            )
        except Exception as exc:  # the audit must not change the answer
            self._log.error("mwl.query_hook_failed", error=type(exc).__name__)
