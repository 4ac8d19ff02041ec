"""Read-only access to the documents an inbound channel published (``<data_dir>/<channel>.reports.sqlite``).

For the command line (``traboule cda export``): it opens the store read-only, never writes, and can run beside the
engine (the store is in WAL mode).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

from traboule.errors import NotPublished
from traboule.stores.sqlite import Durability, open_database


@dataclass(frozen=True)
class PublishedDocument:
    id: str
    set_id: str
    version: int
    status: str  # current | superseded | deleted
    accession: str
    data: bytes  # the CDA


class PublishedDocuments:
    """The documents table of a reports store, opened read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        self._db = open_database(self.path, Durability.READ_ONLY)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PublishedDocuments:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def by_id(self, doc_id: str) -> PublishedDocument:
        row = self._db.execute(
            "SELECT id, set_id, version, status, document FROM documents WHERE id = ?", (doc_id,)
        ).fetchone()
        if row is None:
            raise NotPublished(f"no document with id {doc_id!r} in {self.path}")
        return _document(row)

    def by_accession(self, accession: str) -> PublishedDocument:
        """The current version of the accession number's document set (a set traboule made is keyed on the
        accession number; a ready CDA's set is found by the accession number its report carried)."""
        rows = self._db.execute(
            "SELECT d.id, d.set_id, d.version, d.status, d.document FROM sets s JOIN documents d "
            "ON d.set_id = s.set_id WHERE s.set_key = ? ORDER BY d.version DESC",
            (f"acc:{accession}",),
        ).fetchall()
        if not rows:
            rows = self._db.execute(
                "SELECT id, set_id, version, status, document FROM documents "
                "WHERE json_extract(document, '$.report.accession_number.value') = ? ORDER BY rowid DESC",
                (accession,),
            ).fetchall()
        if not rows:
            raise NotPublished(f"no document for accession number {accession!r} in {self.path}")
        current = [r for r in rows if r[3] == "current"]
        if not current:
            latest = rows[0]
            raise NotPublished(
                f"accession number {accession!r}: no current version (version {latest[2]}, {latest[0]}, is "
                f"{latest[3]}); export a version by its id"
            )
        return _document(current[0])


def _document(row: tuple) -> PublishedDocument:
    doc_id, set_id, version, status, text = row
    event = json.loads(text)
    return PublishedDocument(
        id=doc_id,
        set_id=set_id,
        version=int(version),
        status=status,
        accession=str(((event.get("report") or {}).get("accession_number") or {}).get("value", "")),
        data=base64.b64decode(event.get("content", "")),
    )
