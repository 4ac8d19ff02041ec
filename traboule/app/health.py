"""What /health says of a destination: reachable or not, since when, and the kind of the last failure.

A channel keeps one `DestinationHealth` per remote system it sends to and reports it from ``health()``; the
runtime turns a destination that is ``down`` into a ``degraded`` engine (HTTP 503 on /health). A refusal of one
message (an AE, a 4xx) says nothing of the destination's availability: only transport failures (refused
connection, timeout, 5xx) put it ``down``. No value from a message is kept here: exception type names only.

`Probe` runs a blocking check of /health (queries to the stores' database) off the event loop: one at a time, for
at most ``PROBE_DEADLINE_S`` per request, its answer kept ``PROBE_TTL_S``. /health answers within the deadline
whatever the database does (a host that drops packets would otherwise hold the loop, and the MLLP ACKs, for the
connect timeout), and a flood of /health requests costs one query at a time. The check runs in a thread of the
probe's own, never in the loop's default executor: the flows' blocking calls (the patient registry waiting for a
group commit) may fill that one under load, and a probe queued behind them would miss its deadline and report a
busy node's database ``unknown`` (taking the node out of the load balancer).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")

PROBE_DEADLINE_S = 2.0  # how long /health waits for its database probe before saying "unknown"
PROBE_TTL_S = 1.0  # how long a probe's answer serves the next /health requests


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class DestinationHealth:
    """The availability of one destination, as the last exchanges with it showed."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.state = "unknown"  # unknown (nothing sent yet) | ok | down
        self.since = _now()
        self.failures = 0  # transport failures in a row
        self.last_error = ""
        self.last_success = ""

    def _set(self, state: str) -> None:
        if state != self.state:
            self.state, self.since = state, _now()

    def succeeded(self) -> None:
        """An exchange went through (accepted or refused on its merits)."""
        self.failures = 0
        self.last_success = _now()
        self._set("ok")

    def unreachable(self, exc: BaseException) -> None:
        """A transport failure: refused, reset, timed out, a 5xx."""
        self.failures += 1
        self.last_error = type(exc).__name__
        self._set("down")

    def failed(self, exc: BaseException) -> None:
        """An exchange failed: ``down`` when the failure is the transport's (see `is_unavailability`), otherwise the
        destination answered (it refused one message on its merits) and is reachable."""
        if is_unavailability(exc):
            self.unreachable(exc)
        else:
            self.succeeded()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "state": self.state, "since": self.since}
        if self.failures:
            out["failures"] = self.failures
        if self.last_error:
            out["last_error"] = self.last_error
        if self.last_success:
            out["last_success"] = self.last_success
        return out


def channel_health(*destinations: DestinationHealth) -> dict[str, Any]:
    """A channel's ``health()``: ``down`` when one of its destinations is, with each destination's state."""
    states = [d.state for d in destinations]
    state = "down" if "down" in states else ("ok" if "ok" in states or not states else "unknown")
    return {"state": state, "destinations": [d.as_dict() for d in destinations]}


def is_unavailability(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) says the destination could not be reached or could not answer now:
    a socket error, a timeout, a connection closed before the answer, or an error its raiser marks ``retryable``
    (an HTTP 5xx / 429)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; bounded all the same
        if seen is None:
            return False
        if isinstance(seen, OSError | TimeoutError | EOFError) or getattr(seen, "retryable", False):
            return True
        if type(seen).__name__ in ("IncompleteReadError", "TransportError", "ConnectError", "ReadTimeout"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class Probed(Generic[T]):
    """A probe's answer: its ``value``, or the ``error`` (an exception type name) it raised, or neither when it did
    not finish within the deadline (``timed_out``). ``age_s``: how old the answer is (0 for a fresh one)."""

    value: T | None = None
    error: str = ""
    timed_out: bool = False
    age_s: float = 0.0


class Probe(Generic[T]):
    """``check`` (blocking) run in a thread of the probe's own (a one-thread executor, shared with nothing else):
    one run at a time, awaited at most ``deadline`` seconds from its start, its answer kept ``ttl`` seconds. A run
    past the deadline goes on in its thread (nothing can stop a blocked socket read); the callers meanwhile get
    ``timed_out`` without starting another, and its answer, when it comes, serves the next ones. `close` ends the
    thread (once a run in progress returns); a closed probe answers ``error`` ``ProbeClosed``."""

    def __init__(self, check: Callable[[], T], *, deadline: float = PROBE_DEADLINE_S, ttl: float = PROBE_TTL_S):
        self.check, self.deadline, self.ttl = check, deadline, ttl
        self._running: asyncio.Future[T] | None = None
        self._started = 0.0
        self._last: Probed[T] | None = None
        self._at = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health-probe")
        self._closed = False

    def close(self) -> None:
        """Stop the probe's thread: no new run; one in progress ends in its own time (not waited for)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def get(self) -> Probed[T]:
        """The latest answer younger than ``ttl``, else the answer of the run in progress (started now when none
        is), or ``timed_out`` when it does not come by its deadline."""
        now = time.monotonic()
        if self._last is not None and now - self._at < self.ttl:
            return Probed(self._last.value, self._last.error, age_s=now - self._at)
        if self._running is None:
            if self._closed:
                return Probed(error="ProbeClosed")
            self._started = now
            context = contextvars.copy_context()  # as asyncio.to_thread does: the caller's log context
            self._running = asyncio.get_running_loop().run_in_executor(self._executor, context.run, self.check)
            self._running.add_done_callback(self._done)
        left = self._started + self.deadline - now
        running = self._running
        if left > 0:
            await asyncio.wait({running}, timeout=left)  # neither cancels the run nor raises its error
        if not running.done():
            return Probed(timed_out=True)
        return self._answer(running)

    def _answer(self, run: asyncio.Future[T]) -> Probed[T]:
        if run.cancelled():
            return Probed(error="CancelledError")
        error = run.exception()
        return Probed(error=type(error).__name__) if error is not None else Probed(run.result())

    def _done(self, run: asyncio.Future[T]) -> None:
        self._last, self._at = self._answer(run), time.monotonic()
        if self._running is run:
            self._running = None
