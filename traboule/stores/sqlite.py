"""The one way a store opens a SQLite database: WAL, a declared durability, a busy timeout, autocommit.

Every store states what a commit must survive instead of choosing pragmas of its own:

* ``Durability.POWER_LOSS`` (``synchronous=FULL``): a commit is on disk when it returns. For everything that is
  acknowledged to a sender or that decides what is sent next (journal, bus, worklist, registries, sent-marks).
* ``Durability.CRASH`` (``synchronous=NORMAL``): a commit survives the process dying, not the machine. For data
  rebuilt from a durable source (caches, read models that are re-derived from the journal).
* ``Durability.READ_ONLY``: opened ``mode=ro``; nothing is written (command-line readers of a running engine's files).

Connections run in autocommit mode (``isolation_level=None``): a store writes ``BEGIN IMMEDIATE`` … ``COMMIT``
itself, so a transaction's extent is visible where it is written.
"""

from __future__ import annotations

import enum
import sqlite3
import time
from pathlib import Path


class Durability(enum.Enum):
    """What a committed transaction survives."""

    POWER_LOSS = "FULL"
    CRASH = "NORMAL"
    READ_ONLY = "ro"


BUSY_TIMEOUT_S = 10.0  # another process's writer (a second engine process, a CLI command) holds the lock this long


def open_database(
    path: str | Path,
    durability: Durability,
    *,
    threads: bool = False,
    busy_timeout_s: float = BUSY_TIMEOUT_S,
) -> sqlite3.Connection:
    """Open (and create, unless read-only) the database at ``path`` with the declared durability.

    ``threads=True`` lets the connection be used from worker threads (``asyncio.to_thread``, a pool): sqlite3's
    ``check_same_thread`` is off and the caller serialises access (one lock per connection, or one thread at a
    time); without it the connection refuses every thread but the one that opened it. ``busy_timeout_s``: how long
    a statement waits for another connection's write lock before ``database is locked``. A missing file opened
    ``READ_ONLY`` raises ``FileNotFoundError``.
    """
    if durability is Durability.READ_ONLY:
        if not Path(path).is_file():  # mode=ro would only say "unable to open database file"
            raise FileNotFoundError(f"{path} does not exist")
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=not threads, timeout=busy_timeout_s)
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        return db
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=not threads, timeout=busy_timeout_s)
    _wal(db, busy_timeout_s)
    db.execute(f"PRAGMA synchronous={durability.value}")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
    return db


def _wal(db: sqlite3.Connection, wait_s: float) -> None:
    """Switch to WAL. On a new file, two connections opening it at once race for the switch and SQLite answers the
    loser ``database is locked`` at once, without its busy handler: try again, for as long as a statement would wait
    (a file already in WAL mode answers at once)."""
    deadline = time.monotonic() + wait_s
    pause = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.1)
