"""What /health says of a destination: reachable or not, since when, and the kind of the last failure.

A channel keeps one `DestinationHealth` per remote system it sends to and reports it from ``health()``; the
runtime turns a destination that is ``down`` into a ``degraded`` engine (HTTP 503 on /health). A refusal of one
message (an AE, a 4xx) says nothing of the destination's availability: only transport failures (refused
connection, timeout, 5xx) put it ``down``. No value from a message is kept here: exception type names only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


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
