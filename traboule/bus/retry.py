"""What a bus does with a delivery whose handler raised: one policy, the same on every bus.

* A list of several deliveries failed together (``subscribe_batch``): :class:`Isolate`, no attempt counted; each is
  handed again alone, in order, so that the failing one is found.
* One delivery failed: :class:`Retry` after ``backoff * attempt`` seconds as attempt + 1, until ``max_attempts``;
  then, or at once for a :class:`~traboule.bus.PermanentError`, :class:`DeadLetter` to ``<queue>.dlq`` with the
  error in the ``x-error`` header.
* A delivery that already failed (``attempt > 1``) is never put in a batch (:func:`handed_alone`).

Each failure is one warning event (``bus.batch_failed`` / ``bus.delivery_failed``) naming the queue, the message
ids, the outcome and the exception's type only: its text may quote what a remote system answered (an ACK's
comment, an OperationOutcome) and so patient data; it goes to the dead letter's ``x-error`` header, not the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from traboule.errors import PermanentError

log = structlog.get_logger("traboule.bus")


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
