"""The journal's group commit: the messages appended in one turn of the loop share a commit, each sender answered
only once its message is on disk, every one of them told when the commit failed, and what was appended before
`close` written."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from traboule.stores.journal import JournalEntry, OutboxEvent, SQLiteJournal


def entry(n: int) -> JournalEntry:
    return JournalEntry(
        "ris",
        f"MSH|^~\\&|RIS|CHU|T|CHU|2026||ORM^O01|C{n}|P|2.5\r".encode(),
        "accepted",
        control_id=f"C{n}",
        idempotency_key=f"k{n}",
    )


def stored(path: Path) -> dict[str, int]:
    """control id -> journal id, read by a connection of its own (what is on disk)."""
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT control_id, id FROM messages").fetchall())


async def test_concurrent_messages_share_commits_in_order_and_are_all_on_disk(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.sqlite")
    try:
        # Senders arriving in one turn of the loop share its commit.
        results = await asyncio.gather(
            *(journal.append(entry(n), [OutboxEvent("order.new", f"e{n}", b"{}")]) for n in range(200))
        )
        ids = [r.id for r in results]
        assert all(ids) and ids == sorted(ids) and len(set(ids)) == 200  # journal order is the order of arrival
        assert stored(tmp_path / "journal.sqlite") == {f"C{n}": ids[n] for n in range(200)}
        assert len(journal.pending_events(1000)) == 200
        again = await journal.append(entry(7), [OutboxEvent("order.new", "again", b"{}")])
        assert again.status == "duplicate"  # the duplicate check reads what the earlier commits wrote
    finally:
        journal.close()


async def test_a_failed_commit_answers_every_waiting_sender_with_the_error(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.sqlite")
    try:
        await journal.append(entry(0))
        journal._db.close()  # the disk is gone
        outcomes = await asyncio.gather(*(journal.append(entry(n)) for n in range(1, 30)), return_exceptions=True)
        assert all(isinstance(o, sqlite3.Error) for o in outcomes)  # nobody is told "stored"
        assert stored(tmp_path / "journal.sqlite") == {"C0": 1}
    finally:
        journal.close()


async def test_messages_appended_before_close_are_written(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "journal.sqlite")
    waiting = [asyncio.ensure_future(journal.append(entry(n))) for n in range(50)]
    await asyncio.sleep(0)  # appended; the first commit may be on disk already
    journal.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    answered = {r.control_id: r.id for r in results if isinstance(r, JournalEntry)}
    assert len(answered) == 50
    assert stored(tmp_path / "journal.sqlite") == answered
