"""What a bus does with a delivery whose handler raised: one policy, the same on every bus.

* A list of several deliveries failed together (``subscribe_batch``): :class:`Isolate`, no attempt counted; each is
  handed again alone, in order, so that the failing one is found.
* One delivery failed: :class:`Retry` after ``backoff * attempt`` seconds as attempt + 1, until ``max_attempts``;
  then, or at once for a :class:`~traboule.bus.PermanentError`, :class:`DeadLetter` to ``<queue>.dlq`` with the
  error in the ``x-error`` header.
* A delivery that already failed (``attempt > 1``) is never put in a batch (:func:`handed_alone`).
* The engine's own database unreachable (:func:`database_unavailable`: a PostgreSQL connection refused or cut, the
  server shutting down): :class:`Retry` every `UNAVAILABLE_DELAY` seconds at the same attempt, never dead-lettered:
  the delivery waits for the database as long as it is down (an acknowledged order's event is applied once it is
  back, not parked for an operator).
* Another delivery working on the same item (`HeldElsewhere`: an XDS document claimed by a delivery in its own
  retry loop, here or on another node): :class:`Retry` every `HELD_ELSEWHERE_DELAY` seconds at the same attempt,
  never dead-lettered: the holder's retries may last minutes, this one waits its turn.

Each failure is one warning event (``bus.batch_failed`` / ``bus.delivery_failed``) naming the queue, the message
ids, the outcome and the exception's type only: its text may quote what a remote system answered (an ACK's
comment, an OperationOutcome) and so patient data; it goes to the dead letter's ``x-error`` header, not the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from traboule.errors import HeldElsewhere, PermanentError

log = structlog.get_logger("traboule.bus")

UNAVAILABLE_DELAY = 1.0  # seconds between attempts of a delivery waiting for the engine's database
HELD_ELSEWHERE_DELAY = 2.0  # seconds between attempts of a delivery waiting for another one to end
# SQLSTATE classes of a database that cannot serve now (connection exception, insufficient resources, operator
# intervention: shut down, starting up); a query cancelled by its timeout (57014) or a lock not granted counts an
# attempt as any other failure.
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


@dataclass(frozen=True)
class Isolate:
    """Hand each delivery of the failed list again alone, in order; no attempt counted."""

    error: str


@dataclass(frozen=True)
class Retry:
    """Deliver again as ``attempt`` once ``delay`` seconds have passed."""

    error: str
    attempt: int
    delay: float


@dataclass(frozen=True)
class DeadLetter:
    """Move to ``<queue>.dlq`` with ``error`` in ``x-error``: the handler refused it (``permanent``) or failed
    ``max_attempts`` times."""

    error: str
    reason: Literal["permanent", "max_attempts"]


Outcome = Isolate | Retry | DeadLetter


def describe(exc: BaseException) -> str:
    """A handler's error as the ``x-error`` header carries it: ``Type: message``."""
    return f"{type(exc).__name__}: {exc}"


def _error_type(error: str) -> str:
    """The exception type of a `describe`d error, for the log (never its text)."""
    return error.partition(":")[0]


def database_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) is psycopg's ``OperationalError`` saying that the engine's PostgreSQL
    database cannot serve now (no SQLSTATE: the connection refused or cut; or one of `_UNAVAILABLE_SQLSTATES`: the
    server shutting down or starting, out of connections or disk): a later attempt may. Recognised by class name and
    module, so that the bus imports no database driver."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; bounded all the same
        if seen is None:
            return False
        if any(c.__name__ == "OperationalError" and c.__module__.startswith("psycopg") for c in type(seen).__mro__):
            state = str(getattr(seen, "sqlstate", None) or "")
            return not state or state.startswith(_UNAVAILABLE_SQLSTATES)
        seen = seen.__cause__ or seen.__context__
    return False


def handed_alone(attempt: int) -> bool:
    """A delivery that already failed is handed alone, never in a batch (its failures are counted one by one)."""
    return attempt > 1


@dataclass(frozen=True)
class RetryPolicy:
    """A subscription's rule: ``max_attempts`` deliveries, the n-th failure waiting ``backoff * n`` seconds."""

    max_attempts: int = 5
    backoff: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def after_batch_failure(self, exc: Exception) -> Isolate:
        """The handler raised ``exc`` on a list of several deliveries: hand each again alone, counting nothing."""
        return Isolate(describe(exc))

    def after_failure(self, exc: Exception, attempt: int) -> Retry | DeadLetter:
        """The handler raised ``exc`` on one delivery, its ``attempt``-th: retry later, or dead-letter now."""
        error = describe(exc)
        if isinstance(exc, PermanentError):
            return DeadLetter(error, "permanent")
        if database_unavailable(exc):  # not counted: it waits for the database however long it is down
            return Retry(error, attempt, max(self.backoff * attempt, UNAVAILABLE_DELAY))
        if isinstance(exc, HeldElsewhere):  # not counted: it waits for the other delivery however long it takes
            return Retry(error, attempt, max(self.backoff * attempt, HELD_ELSEWHERE_DELAY))
        if attempt >= self.max_attempts:
            return DeadLetter(error, "max_attempts")
        return Retry(error, attempt + 1, self.backoff * attempt)

    def log(self, outcome: Outcome, queue: str, message_ids: Sequence[str], attempt: int = 1) -> None:
        """One warning event for a failed handler run: where, which deliveries, what happens next."""
        if isinstance(outcome, Isolate):
            log.warning(
                "bus.batch_failed",
                queue=queue,
                deliveries=len(message_ids),
                first_message_id=message_ids[0],
                last_message_id=message_ids[-1],
                error_type=_error_type(outcome.error),
                outcome="isolate",
            )
            return
        fields: dict[str, object] = (
            {"outcome": "retry", "retry_in": outcome.delay}
            if isinstance(outcome, Retry)
            else {"outcome": "dead_letter", "reason": outcome.reason}
        )
        log.warning(
            "bus.delivery_failed",
            queue=queue,
            message_id=message_ids[0],
            attempt=attempt,
            max_attempts=self.max_attempts,
            error_type=_error_type(outcome.error),
            **fields,
        )
