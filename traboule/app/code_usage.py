"""Procedure codes seen in the journal that the CR d'imagerie cannot use: no row in ``tables/cda_acts.csv``.

A report is published only when its procedure code (or its order's) has a LOINC act of
JDV_CodesDocumentImagerie_CISIS in the acts table. This reads the orders and reports the journal holds (raw
messages, accepted or refused), maps them again with their channel's inbound mapping, and counts the procedure codes
without a row, with the journal id of the latest message that carried each. The journal is opened read-only and
read row by row: memory grows with the number of distinct codes (capped), not with the journal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from traboule import model
from traboule.errors import MappingFailure
from traboule.formats import hl7
from traboule.stores.sqlite import Durability, open_database
from traboule.translate.hl7_mapping import HL7InboundMapping

MAX_CODES = 10_000  # distinct unmapped codes kept; beyond, they are counted in ``CodeUsage.dropped``
KINDS = ("order", "report")


@dataclass
class CodeCount:
    code: str
    system: str = ""
    display: str = ""
    orders: int = 0
    reports: int = 0
    example: int = 0  # journal id of the latest message with this code
    channels: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return self.orders + self.reports


@dataclass
class CodeUsage:
    codes: dict[str, CodeCount] = field(default_factory=dict)
    messages: int = 0  # orders and reports read
    mapped: int = 0  # procedure codes with a row in the acts table (occurrences)
    unreadable: int = 0  # messages the mapping refuses now (journal show ID says why)
    other_channels: int = 0  # messages of channels not configured (their mapping is unknown)
    dropped: int = 0  # occurrences of codes beyond MAX_CODES

    def unmapped(self) -> list[CodeCount]:
        return sorted(self.codes.values(), key=lambda c: (-c.total, c.code))


def scan(
    journal: Path | str,
    mappings: dict[str, HL7InboundMapping],
    acts: Any,
    since: str = "",
) -> CodeUsage:
    """Procedure codes of the orders and reports journaled by the channels of ``mappings`` (channel name → its
    inbound mapping) since ``since`` (ISO 8601, UTC, as the journal's ``received``) that ``acts`` (the CDA
    mapping's acts table) has no LOINC code for."""
    usage = CodeUsage()
    for entry_id, channel, message_type, raw in _entries(Path(journal), since):
        mapping = mappings.get(channel)
        if mapping is None:
            usage.other_channels += 1
            continue
        if mapping.accept.get(message_type) not in KINDS:
            continue
        usage.messages += 1
        try:
            payloads = mapping.map(hl7.parse(hl7.decode(raw).text))
        except (hl7.HL7Error, MappingFailure, ValueError):
            usage.unreadable += 1
            continue
        for payload in payloads:
            if not isinstance(payload, model.ImagingOrder | model.Report):
                continue
            proc = payload.procedure
            if not proc.code:
                continue  # a report without a code takes its order's
            if acts.lookup((proc.code,), "loinc"):
                usage.mapped += 1
                continue
            count = usage.codes.get(proc.code)
            if count is None:
                if len(usage.codes) >= MAX_CODES:
                    usage.dropped += 1
                    continue
                count = usage.codes[proc.code] = CodeCount(proc.code)
            count.system = count.system or proc.system
            count.display = count.display or proc.display
            if isinstance(payload, model.Report):
                count.reports += 1
            else:
                count.orders += 1
            count.example = max(count.example, entry_id)
            count.channels.add(channel)
    return usage


def _entries(journal: Path, since: str) -> Iterator[tuple[int, str, str, bytes]]:
    """Accepted and refused messages, oldest first, one row at a time (a read-only connection)."""
    if not journal.is_file():
        raise FileNotFoundError(f"{journal} does not exist")
    db = open_database(journal, Durability.READ_ONLY)
    try:
        rows = db.execute(
            "SELECT id, channel, message_type, raw FROM messages "
            "WHERE status IN ('accepted', 'rejected') AND received >= ? ORDER BY id",
            (since,),
        )
        for entry_id, channel, message_type, raw in rows:
            yield int(entry_id), str(channel), str(message_type), bytes(raw)
    finally:
        db.close()


def acts_file(cda_mapping: Path) -> Path:
    """The CSV of the acts table a CDA mapping names (``tables: acts:``), for messages that point at it."""
    from traboule.translate.mapping import load_yaml

    tables = load_yaml(cda_mapping).get("tables") or {}
    spec = tables.get("acts", "")
    return (cda_mapping.parent / str(spec.get("file", "") if isinstance(spec, dict) else spec)).resolve()
