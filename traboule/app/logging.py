"""structlog set-up: JSON lines in production, readable console lines for a person at a terminal.

Every line is one event with its context bound once (channel, message id, correlation id). Patient data
(names, identifiers, message bodies) is never logged unless ``log.patient_data`` is set for debugging:

* values under the keys of `PATIENT_KEYS` are replaced;
* free text (an ``error`` or ``reason``, an exception and its traceback, a library's formatted message) may quote
  what a message carried (``INS '279035121518900' has a wrong check key``): its quoted parts and long digit runs
  are masked (`scrub`). Code that logs a refusal logs where and why (``PID-3``, code 102), not the reason text,
  which goes to the journal and the ACK; the scrubbing is the net under that rule.

Each record is written with a single ``write`` of the whole line, at most `MAX_LINE` bytes (the atomic size of a
pipe write, PIPE_BUF): the engine's processes share one stderr, and two processes writing a line in several
pieces interleave them (seen: 6-34 broken JSON lines per 6,000).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

import structlog

PATIENT_KEYS = {"patient_name", "patient_id", "raw", "body"}
# Free-text values: they may quote what a message carried.
FREE_TEXT_KEYS = ("error", "reason", "exception", "detail", "warnings")
MAX_LINE = 4096  # bytes, newline included: Linux PIPE_BUF, the largest write a pipe never splits
REDACTED = "<redacted>"

# A quoted value ('...' or "..."), a run of 5+ digits (identifiers, INS, dates) or an ISO date.
# A traceback's ``File "/path/x.py", line 12`` is kept: the path and line are code, not data.
_QUOTED = re.compile(r"""'[^'\n]{0,2000}'|(?<!File )"[^"\n]{0,2000}"|(?<!line )\d[\d\-./]{4,}\d|(?<!line )\d{5,}""")


def scrub(text: str) -> str:
    """Free text with its quoted values and digit runs masked (``INS '2790…' has`` → ``INS <redacted> has``)."""
    return _QUOTED.sub(REDACTED, text)


def _drop_patient_data(_: object, __: str, event: dict) -> dict:
    for key in PATIENT_KEYS & event.keys():
        event[key] = REDACTED
    for key in FREE_TEXT_KEYS:
        value = event.get(key)
        if isinstance(value, str):
            event[key] = scrub(value)
    return event


def _scrub_foreign(_: object, __: str, event: dict) -> dict:
    """A library's record (stdlib logging) is one formatted sentence: scrub it as free text."""
    text = event.get("event")
    if isinstance(text, str):
        event["event"] = scrub(text)
    return event


def _bounded(line: str, event: dict | None = None) -> str:
    """The line itself when it fits `MAX_LINE`; otherwise the event re-rendered with its longest values cut."""
    if len(line) < MAX_LINE // 4 or len(line.encode("utf-8", "replace")) < MAX_LINE:
        return line
    if event is None:
        try:
            event = json.loads(line)
        except ValueError:
            return line.encode("utf-8", "replace")[: MAX_LINE - 16].decode("utf-8", "ignore") + "…"
    budget = MAX_LINE // 2
    shortened: dict[str, Any] = {}
    for key, value in event.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        if len(text) > 256:
            text = text[:256] + f"…(+{len(text) - 256} chars)"
        shortened[key] = text if not isinstance(value, int | float | bool) else value
    shortened["truncated"] = True
    out = json.dumps(shortened, ensure_ascii=False)
    while len(out.encode("utf-8", "replace")) >= MAX_LINE and budget > 16:
        budget //= 2
        shortened = {
            k: (v[:budget] + "…" if isinstance(v, str) and len(v) > budget else v) for k, v in shortened.items()
        }
        out = json.dumps(shortened, ensure_ascii=False)
    return out


def write_line(line: str) -> None:
    """Write one record as a single ``write`` of the whole line to the current stderr."""
    data = (line + "\n").encode("utf-8", "replace")
    stream = sys.stderr
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a test's capture: write the text in one call
        stream.write(data.decode("utf-8"))
        stream.flush()
        return
    stream.flush()  # anything printed before goes first
    os.write(fd, data)


class _JSONRenderer:
    """structlog's JSON renderer, bounded to one pipe-atomic line."""

    def __init__(self) -> None:
        self._render = structlog.processors.JSONRenderer(ensure_ascii=False)

    def __call__(self, logger: object, name: str, event: dict) -> str:
        return _bounded(self._render(logger, name, dict(event)), event)


class _StderrLogger:
    """Writes each rendered record to whatever ``sys.stderr`` is at the time (tests replace it)."""

    def msg(self, message: str) -> None:
        write_line(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


class _RateLimit(logging.Filter):
    """At most `burst` records of one kind (logger and message template) per `window` seconds from the libraries:
    a hostile peer makes them log per request ("Exceeded concurrency limit.", an invalid value per C-FIND key:
    227,000 and 110,000 lines in two attacks). The next record let through says how many were left out."""

    def __init__(self, burst: int = 20, window: float = 10.0) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self._seen: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, count, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            return True  # a library's crash is always told
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window:
            if len(self._seen) > 4096:
                self._seen.clear()
            suppressed = int(seen[2]) if seen else 0
            self._seen[key] = [now, 1, 0]
            if suppressed:
                record.suppressed = suppressed
            return True
        seen[1] += 1
        if seen[1] <= self.burst:
            return True
        seen[2] += 1
        return False


def _add_suppressed(_: object, __: str, event: dict) -> dict:
    record = event.get("_record")
    if record is not None and getattr(record, "suppressed", 0):
        event["suppressed_similar"] = record.suppressed
    return event


class _LineHandler(logging.Handler):
    """The stdlib handler of the libraries' records: the same single-write line as structlog's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(_bounded(self.format(record)))
        except Exception:  # a log line must never take the engine down
            self.handleError(record)


def configure(fmt: str = "console", level: str = "info", patient_data: bool = False) -> None:
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if not patient_data:
        processors.append(_drop_patient_data)
    renderer = _JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    # Libraries (pynetdicom, aio-pika, uvicorn...) log through the standard library: render their records with the same
    # processors, so every line of the process is one JSON object with a level and a timestamp.
    foreign = [*processors, _add_suppressed]
    if not patient_data:
        foreign.append(_scrub_foreign)
    handler = _LineHandler()
    handler.addFilter(_RateLimit())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=foreign,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # A library's warnings.warn becomes a record like the others (one JSON line). Off then on: captureWarnings
    # does nothing when already on, even if someone put another showwarning in place since.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    # pynetdicom logs every PDU at INFO, httpx every request (each one the main process forwards to a child, each
    # health check of the supervisor) through stdlib logging: keep them quiet unless debugging.
    for name in ("pynetdicom", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
    # uvicorn's own handlers write plain text (an exception's traceback over many lines): its records go to the
    # root handler above instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
