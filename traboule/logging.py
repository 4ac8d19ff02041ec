"""structlog set-up: JSON lines in production, readable console lines for a person at a terminal.

Every line is one event with its context bound once (channel, message id, correlation id). Patient data
(names, identifiers, message bodies) is never logged unless ``log.patient_data`` is set for debugging.
"""

from __future__ import annotations

import logging
import sys

import structlog

PATIENT_KEYS = {"patient_name", "patient_id", "raw", "body"}


def _drop_patient_data(_: object, __: str, event: dict) -> dict:
    for key in PATIENT_KEYS & event.keys():
        event[key] = "<redacted>"
    return event


class _StderrLogger(structlog.PrintLogger):
    """Prints to whatever ``sys.stderr`` is at the time of the call (it may be replaced after configuration)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def configure(fmt: str = "console", level: str = "info", patient_data: bool = False) -> None:
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not patient_data:
        processors.append(_drop_patient_data)
    processors.append(structlog.processors.format_exc_info)
    processors.append(
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )
    # Libraries (and our bus adapters) log through the standard library: render their records with the same
    # processors, so every line of the process is one JSON object with a level and a timestamp.
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=processors[:-2],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                processors[-1],
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.getLevelNamesMapping()[level.upper()])
    # pynetdicom logs every PDU at INFO through stdlib logging: keep it quiet unless debugging.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level.lower() == "debug" else logging.WARNING)
