"""`traboule.stores.sqlite.open_database`: the one way a store opens a SQLite file."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from traboule.stores.sqlite import Durability, open_database


def test_connections_opening_a_new_file_at_once_all_get_it_in_wal_mode(tmp_path: Path) -> None:
    """Two connections switching a new file to WAL at the same moment: SQLite answers the loser "database is locked"
    without waiting; each must still open it (a console page opened the journal's search index while the engine's
    indexer created it)."""
    errors: list[str] = []
    modes: list[str] = []
    for n in range(60):
        path = tmp_path / f"race-{n}.sqlite"
        barrier = threading.Barrier(3)

        def open_it(path: Path = path, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                db = open_database(path, Durability.CRASH, threads=True)
                db.execute("CREATE TABLE IF NOT EXISTS t (x)")
                modes.append(db.execute("PRAGMA journal_mode").fetchone()[0])
                db.close()
            except sqlite3.OperationalError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=open_it) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert modes == ["wal"] * 180
