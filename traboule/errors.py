"""Every exception the engine raises on purpose, in one tree.

    TrabouleError
    ├── ConfigError, MappingError     the configuration or a mapping file is wrong
    ├── Refused                       a message (or query) is refused: reason, location, code
    │   HL7Error, MappingFailure, ReportRefused, CDAError, MetadataError, QueryError, SearchError, NotificationError
    ├── DeliveryError                 a remote system did not take (or give) a message
    │   PermanentError, NotAccepted, NotRegisteredYet, HeldElsewhere, RemoteError: DICOMwebError, XDSError,
    │   FHIRServerError
    ├── Unavailable                   nothing can be stored or moved now: DiskFull, BusClosedError, BusUnavailableError,
    │                                 ConsoleBusy
    ├── CommandError                  an operator command cannot do what was asked
    │   ReprocessError, MessageFailed (MessageRefused), ScaffoldError, NotPublished
    └── CDAValidatorError, EncodingError

What each branch means to an operator:

* configuration: the engine does not start, and ``traboule check`` says ``configuration error`` (``mapping error``
  for a mapping file) with the file, line and field to fix.
* refusal: the sender is answered no, with ``reason`` and ``location``: AE or AR for HL7 v2 (``code`` from HL7
  table 0357), HTTP 4xx for the FHIR API and webhooks, a C-FIND failure for a worklist query. A document a
  destination's rules refuse (``MetadataError``) is dead-lettered. Nothing of a refused message is published.
* delivery: the bus retries the message with a growing backoff, then dead-letters it (``traboule dlq``);
  ``PermanentError`` dead-letters it at once (the DMP and FHIR server channels raise it for a ``RemoteError`` that
  is not ``retryable``); ``HeldElsewhere`` (another delivery is working on the same document) is retried without
  counting an attempt, never dead-lettered.
* unavailable: the sender is told to send again later and the bus retries; nothing acknowledged is lost.
* command: the CLI prints the text and exits non-zero (a message that fails a reprocess is reported and skipped).
* ``CDAValidatorError``: the ANS CDA validators are missing or broken (``traboule cda validate`` exits 2).
  ``EncodingError`` never reaches an operator: pydicom encodes what the fast encoder declines.

Classes that callers also catch as builtins keep those bases (``except ValueError`` still catches ``HL7Error`` and
``ConfigError``, a wrong value of a setting; ``DiskFull`` is an ``OSError``, ``BusUnavailableError`` a
``ConnectionError``, ``NotPublished`` a ``LookupError``).
The modules that raise them re-export them under their former names (``traboule.bus.PermanentError``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TrabouleError(Exception):
    """The base of every error traboule raises on purpose."""


# -- configuration ---------------------------------------------------------------------------------------------


class ConfigError(TrabouleError, ValueError):
    """A setting or a configuration file is wrong; the text names the file, table or key and what to change."""


class MappingError(TrabouleError):
    """A mapping file that cannot be used, with where and why."""

    def __init__(self, file: str | Path, line: int, reason: str):
        super().__init__(f"{file}:{line}: {reason}")
        self.file = str(file)
        self.line = line
        self.reason = reason


class CDAValidatorError(TrabouleError):
    """The validator tree is missing or incomplete, or one of its schematrons does not compile."""


# -- refusals --------------------------------------------------------------------------------------------------


class Refused(TrabouleError):
    """A message (or query) refused for what it holds: nothing of it goes further.

    ``reason``: what is wrong, said to the sender. ``location``: where (an HL7 field such as ``PID-3``, a search
    parameter, a JSON field, a DICOM tag; ``""`` for the message as a whole). ``code``: the refusal's code in the
    sender's protocol (HL7 table 0357, an OperationOutcome issue type; ``""`` when it has none).
    """

    def __init__(self, reason: str, location: str = "", code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.location = location
        self.code = code


class HL7Error(Refused, ValueError):
    """Input that cannot be read as HL7 v2; carries what an ERR segment needs."""

    def __init__(self, reason: str, *, location: str = "MSH", code: str = "102", reject: bool = True):
        super().__init__(reason, location, code)  # location e.g. "MSH-9" or "PID-3"
        self.reject = reject  # AR (True) or AE (False)


class MappingFailure(Refused):
    """A message that the mapping cannot turn into a valid event (answered with AE)."""

    def __init__(self, reason: str, location: str, code: str = "101"):
        super().__init__(reason, location, code)


class ReportRefused(Refused):
    """The report cannot be published; ``reason`` goes into the AE, ``location`` names the HL7 field."""

    def __init__(self, reason: str, location: str = "", code: str = "101"):
        super().__init__(reason, location, code)


class CDAError(Refused, ValueError):
    """The report lacks what the document needs (names what is missing and where it comes from)."""


class MetadataError(Refused, ValueError):
    """The document cannot make valid DMP metadata (names what is missing and where it is read from)."""


class QueryError(Refused, ValueError):
    """The identifier cannot be matched (malformed range, date, time...): a C-FIND failure, not a crash."""

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message, "" if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        self.tag = tag


class SearchError(Refused, ValueError):
    """A search the store does not support (names the parameter); ``code``: the OperationOutcome issue type."""

    def __init__(self, param: str, reason: str, code: str = "not-supported"):
        super().__init__(reason, param, code)

    @property
    def param(self) -> str:
        """The search parameter refused (its ``location``)."""
        return self.location


class NotificationError(Refused, ValueError):
    """A notification refused at the webhook: the field and why (never the value received)."""

    def __init__(self, field: str, reason: str):
        super().__init__(reason, field)
        self.args = (f"{field}: {reason}",)

    @property
    def field(self) -> str:
        """The notification's field refused (its ``location``)."""
        return self.location


# -- delivery --------------------------------------------------------------------------------------------------


class DeliveryError(TrabouleError):
    """A remote system did not take (or give) a message: the bus retries it, then dead-letters it."""


class PermanentError(DeliveryError):
    """Raised by a handler when retrying cannot help (e.g. a peer rejected the content): dead-letter now."""


class NotAccepted(DeliveryError):
    """The receiver did not accept a message (AE/AR, an unreadable ACK, no answer, a broken connection)."""


class NotRegisteredYet(DeliveryError):
    """A replacement or deletion names a document this channel has not registered (yet): the bus retries."""


class HeldElsewhere(DeliveryError):
    """Another delivery, on this node or another, is working on the same item (an XDS document's claim): the bus
    retries later without counting an attempt, however long the holder's own retries last."""


class RemoteError(DeliveryError):
    """A remote system answered with an error or could not be reached.

    ``status``: the HTTP status (0 without an answer). ``retryable``: a later attempt may succeed (5xx, network
    errors); one that is not is dead-lettered at once.
    """

    def __init__(self, message: str, *, status: int = 0, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class DICOMwebError(RemoteError):
    """The archive answered with an error or could not be reached; ``retryable`` for 5xx and network errors."""


class XDSError(RemoteError):
    """The repository or registry refused the request, or could not be reached.

    ``retryable``: a later attempt may succeed. ``status``: the HTTP status (0 without an answer). ``codes``: the
    RegistryErrorList error codes, or the SOAP fault code (``Sender``, ``Receiver``...). ``request``: the SOAP
    envelope that was sent (for the journal).
    """

    def __init__(
        self, message: str, *, retryable: bool, status: int = 0, codes: list[str] | None = None, request: bytes = b""
    ) -> None:
        super().__init__(message, status=status, retryable=retryable)
        self.codes = codes or []
        self.request = request


class FHIRServerError(RemoteError):
    """The FHIR server refused the request or could not be reached.

    ``status`` is the HTTP status (0 when no response came back), ``operation_outcome`` the server's
    OperationOutcome (None when the body was not one), ``retryable`` whether a later retry may succeed.
    """

    def __init__(
        self, message: str, *, status: int = 0, operation_outcome: dict[str, Any] | None = None, retryable: bool
    ) -> None:
        super().__init__(message, status=status, retryable=retryable)
        self.operation_outcome = operation_outcome


# -- unavailable -----------------------------------------------------------------------------------------------


class Unavailable(TrabouleError):
    """Nothing can be stored or moved now: the sender is told to send again later, the bus retries."""


class DiskFull(Unavailable, OSError):
    """The data folder's disk has less free space than the journal keeps in reserve: nothing more is stored (the
    sender is told "not stored, send it again later") while the stores behind it can still write."""


class ConsoleBusy(Unavailable):
    """The operations console's threads have as many jobs as they take, running or waiting: answered 503 with
    Retry-After (the engine's other work goes on)."""


class BusClosedError(Unavailable, RuntimeError):
    """The bus was closed (or not started); nothing more can be published or settled."""


class BusUnavailableError(Unavailable, ConnectionError):
    """The broker is not connected (not yet, or lost and being reconnected) or the bus is closed: retry later."""


# -- operator commands -----------------------------------------------------------------------------------------


class CommandError(TrabouleError):
    """An operator command cannot do what was asked; the text says what and why."""


class ReprocessError(CommandError):
    """What was asked cannot be done; the text says what and why. ``code``: the command's exit code."""

    def __init__(self, text: str, code: int = 1):
        super().__init__(text)
        self.code = code


class MessageFailed(CommandError):
    """One message cannot be reprocessed (it no longer maps, its report made no document): reported, skipped."""


class MessageRefused(MessageFailed):
    """One message the patient identity checks refuse, as at ingest: reported as refused, nothing sent."""


class ScaffoldError(CommandError):
    """``traboule new channel`` cannot create the package asked for (a bad or taken name, an existing folder)."""


class NotPublished(CommandError, LookupError):
    """No document for the id or accession number asked for; the text says what was looked for."""


# -- internal --------------------------------------------------------------------------------------------------


class EncodingError(TrabouleError, ValueError):
    """The tree holds something this encoder does not write exactly as pydicom would: use pydicom instead."""


class ReportConflict(TrabouleError):
    """Another writer (a node) changed a report's document set, or took its message key or document id, between
    the read a preparation started from and its write: nothing was written; prepare again from the new state."""
