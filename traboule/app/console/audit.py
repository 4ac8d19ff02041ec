"""What operators did through the console, kept for good: ``<data_dir>/console-actions.jsonl``.

One JSON object a line (time, operator, action, reason, details), appended and flushed to disk (fsync) before the
action it records is carried out, mode 0600: a discarded dead letter is kept here whole (its body base64), so that
discarding loses nothing (the console lists the last actions, `Audit.recent`, showing such a body by its size
only). The reasons and bodies may name patients: they are kept here, never in the logs (which get the operator's
token name, the action, the queue and message id).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

FILE = "console-actions.jsonl"
RECENT = 200  # actions the console lists at most
BLOCK = 1 << 20  # bytes read at a time, from the end of the file
MAX_DETAIL = 300  # characters of one detail shown
HEAD = ("time", "operator", "action", "reason")


class Audit:
    """The append-only record of operator actions of one data folder."""

    def __init__(self, data_dir: str | Path) -> None:
        self.path = Path(data_dir) / FILE
        self._lock = threading.Lock()

    def record(self, operator: str, action: str, reason: str = "", **details: Any) -> dict[str, Any]:
        """Append one action (durable when this returns)."""
        line = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "operator": operator,
            "action": action,
            "reason": reason,
            **details,
        }
        data = (json.dumps(line, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        return line

    def recent(self, limit: int = RECENT) -> list[dict[str, Any]]:
        """The last ``limit`` actions, newest first, as `summary` shows them (blocking: call it in a thread)."""
        out: list[dict[str, Any]] = []
        for line in _lines_backwards(self.path):
            out.append(summary(line))
            if len(out) >= limit:
                break
        return out


def summary(line: bytes) -> dict[str, Any]:
    """One recorded action for a page: time, operator, action, reason and its other details as short texts; the
    dead letters a discard kept are shown by count and size, never their bodies or headers."""
    try:
        entry = json.loads(line)
        if not isinstance(entry, dict):
            raise ValueError("not an object")
    except ValueError:
        return {"time": "", "operator": "", "action": "?", "reason": "", "details": {}, "size": None}
    shown: dict[str, Any] = {key: str(entry.get(key, ""))[:MAX_DETAIL] for key in HEAD}
    details: dict[str, str] = {}
    size: int | None = None
    for key, value in entry.items():
        if key in HEAD:
            continue
        if key == "letters" and isinstance(value, list):
            details[key] = f"{len(value)}"
            size = sum(_decoded_size(letter) for letter in value)
            continue
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        details[str(key)[:40]] = text[:MAX_DETAIL] + ("…" if len(text) > MAX_DETAIL else "")
    return {**shown, "details": details, "size": size}


def _decoded_size(letter: Any) -> int:
    body = letter.get("body", "") if isinstance(letter, dict) else ""
    try:
        return len(base64.b64decode(body, validate=True)) if isinstance(body, str) else 0
    except (binascii.Error, ValueError):
        return 0


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """The non-empty lines of ``path``, last first, read from the end in blocks (none when the file is absent)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return
    with handle:
        position = handle.seek(0, os.SEEK_END)
        tail = b""
        while position > 0:
            step = min(BLOCK, position)
            position -= step
            handle.seek(position)
            lines = (handle.read(step) + tail).split(b"\n")
            tail = lines.pop(0)  # maybe the end of a line that starts in an earlier block
            for line in reversed(lines):
                if line.strip():
                    yield line
        if tail.strip():
            yield tail
