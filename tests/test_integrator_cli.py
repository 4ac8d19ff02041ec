"""The integrator's commands on an engine's data folder: ``cda export`` (a published CDA out of the reports store)
and ``codes unmapped`` (procedure codes of the journal without a CR-IMG act)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from tests.conftest import ROOT
from traboule import model
from traboule.formats import hl7
from traboule.stores.journal import Journal, JournalEntry
from traboule.stores.reports import ReportPublisher
from traboule.translate.cda import CDAMapping
from traboule.translate.hl7_mapping import HL7InboundMapping

pytestmark = pytest.mark.timeout(120)

FIXTURES = ROOT / "fixtures" / "hl7"
V3 = {"v3": "urn:hl7-org:v3"}
STUDY_UID = "1.2.250.1.999.1.2.20261125.1"


def cli(data_dir: Path, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRABOULE_CONFIG", "TRABOULE_AMQP_URL")}
    env["TRABOULE_DATA_DIR"] = str(data_dir)
    command = [sys.executable, "-m", "traboule.app.cli", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)


def payloads(data: bytes) -> list[model.Payload]:
    return HL7InboundMapping().map(hl7.parse(hl7.decode(data).text))


def study() -> model.Study:
    series = model.Series(
        f"{STUDY_UID}.1", "1", "CT", instances=[model.Instance(f"{STUDY_UID}.1.1", "1.2.840.10008.5.1.4.1.1.2", "1")]
    )
    patient = model.Patient(ids=[model.Identifier("IPP0001", "CHU-LYON", "1.2.250.1.999.1.1")])  # the report's
    return model.Study(STUDY_UID, "ACC0001", patient, started="20261125093512", series=[series])


@pytest.fixture
def published(tmp_path: Path) -> tuple[Path, list[model.Document]]:
    """The reports store of the default channel after a report, its correction and a PDF report (no validation:
    the documents are what the mapping makes)."""
    publisher = ReportPublisher(CDAMapping(), tmp_path / "ris-orders.reports.sqlite")
    publisher.remember([*payloads((FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes()), study()])
    docs = []
    for name in ("oru_r01_report.hl7", "oru_r01_report_corrected.hl7", "oru_r01_pdf.hl7"):
        (report,) = payloads((FIXTURES / name).read_bytes())
        docs.append(publisher.prepare(report, name))
    publisher.close()
    return tmp_path, docs


def test_cda_export_by_accession_writes_the_current_version(published: tuple[Path, list[model.Document]]) -> None:
    data_dir, (first, second, _) = published
    out = data_dir / "out.xml"
    proc = cli(data_dir, "cda", "export", "--accession", "ACC0001", "-o", out)
    assert proc.returncode == 0, proc.stderr
    root = etree.fromstring(out.read_bytes())
    assert root.find("v3:id", V3).get("root") == second.id
    assert root.find("v3:versionNumber", V3).get("value") == "2"
    assert root.find("v3:relatedDocument/v3:parentDocument/v3:id", V3).get("root") == first.id
    assert f"{second.id} (version 2, current" in proc.stderr.decode()


def test_cda_export_by_id_writes_that_version_to_stdout(published: tuple[Path, list[model.Document]]) -> None:
    data_dir, (first, _, pdf) = published
    proc = cli(data_dir, "cda", "export", first.id)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"<?xml")
    assert etree.fromstring(proc.stdout).find("v3:id", V3).get("root") == first.id
    assert f"version 1 of {first.set_id} is superseded" in proc.stderr.decode()
    level1 = cli(data_dir, "cda", "export", pdf.id)
    assert level1.returncode == 0 and b"nonXMLBody" in level1.stdout and b"stderr" not in level1.stderr


def test_cda_export_names_what_it_did_not_find(published: tuple[Path, list[model.Document]]) -> None:
    data_dir, _ = published
    unknown = cli(data_dir, "cda", "export", "1.2.3.4.5")
    assert unknown.returncode == 1 and unknown.stdout == b""
    assert "no document with id '1.2.3.4.5'" in unknown.stderr.decode()
    missing = cli(data_dir, "cda", "export", "--accession", "NOPE")
    assert missing.returncode == 1 and "no document for accession number 'NOPE'" in missing.stderr.decode()
    neither = cli(data_dir, "cda", "export")
    assert neither.returncode == 2 and "one of the arguments id --accession is required" in neither.stderr.decode()


def test_cda_export_of_a_deleted_set_says_there_is_no_current_version(
    published: tuple[Path, list[model.Document]],
) -> None:
    data_dir, (_, second, _) = published
    publisher = ReportPublisher(CDAMapping(), data_dir / "ris-orders.reports.sqlite")
    (deletion,) = payloads((FIXTURES / "oru_r01_report_deleted.hl7").read_bytes())
    publisher.prepare(deletion, "deleted")
    publisher.close()
    proc = cli(data_dir, "cda", "export", "--accession", "ACC0001")
    assert proc.returncode == 1
    assert f"no current version (version 2, {second.id}, is deleted)" in proc.stderr.decode()


def test_cda_export_without_a_store(tmp_path: Path) -> None:
    proc = cli(tmp_path, "cda", "export", "1.2.3")
    assert proc.returncode == 2 and "ris-orders.reports.sqlite does not exist" in proc.stderr.decode()


# -- codes unmapped -------------------------------------------------------------------------------------------


def journal_with(data_dir: Path, entries: list[tuple[bytes, str, str]]) -> list[int]:
    """Journal entries as the inbound channel writes them: raw bytes, status, message type."""

    async def write() -> list[int]:
        journal = Journal(data_dir / "journal.sqlite")
        ids = []
        for raw, status, message_type in entries:
            entry = JournalEntry("ris-orders", raw, status, message_type=message_type)
            ids.append((await journal.append(entry)).id)
        journal.close()
        return ids

    return asyncio.run(write())


def test_codes_unmapped_lists_codes_without_an_act_with_counts_and_an_example(tmp_path: Path) -> None:
    order = (FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes()
    other = order.replace(b"CTTAP", b"XRTHO").replace(b"ACC0001", b"ACC0077")
    report = (FIXTURES / "oru_r01_report.hl7").read_bytes().replace(b"CTTAP", b"XRTHO").replace(b"ACC0001", b"ACC0077")
    adt = (FIXTURES / "adt_a08_update.hl7").read_bytes()
    ids = journal_with(
        tmp_path,
        [
            (order, "accepted", "ORM^O01"),  # CTTAP has a row in cda_acts.csv
            (other, "accepted", "ORM^O01"),
            (other, "duplicate", "ORM^O01"),  # not counted twice
            (report, "rejected", "ORU^R01"),  # refused for this very reason: counted
            (adt, "accepted", "ADT^A08"),
            (b"garbage", "rejected", ""),
        ],
    )
    proc = cli(tmp_path, "codes", "unmapped")
    out = proc.stdout.decode()
    assert proc.returncode == 1, proc.stderr
    assert "3 order/report message(s) read: 1 procedure code(s) without a row in " in out
    assert "mappings/tables/cda_acts.csv" in out
    (line,) = [x for x in out.splitlines() if x.startswith("XRTHO")]
    assert line.split()[:5] == ["XRTHO", "L", "1", "1", str(ids[3])]
    assert "CTTAP" not in out
    later = cli(tmp_path, "codes", "unmapped", "--since", "2999-01-01")
    assert later.returncode == 0 and "0 order/report message(s) read since 2999-01-01T00:00:00.000+00:00" in (
        later.stdout.decode()
    )
    wrong = cli(tmp_path, "codes", "unmapped", "--since", "yesterday")
    assert wrong.returncode == 2 and "expected a date" in wrong.stderr.decode()


def test_codes_unmapped_reads_the_journal_row_by_row(tmp_path: Path) -> None:
    from traboule.app.code_usage import scan

    order = (FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes()
    entries = [(order.replace(b"CTTAP", f"LOC{i % 3}".encode()), "accepted", "ORM^O01") for i in range(300)]
    journal_with(tmp_path, entries)
    usage = scan(tmp_path / "journal.sqlite", {"ris-orders": HL7InboundMapping()}, CDAMapping().acts)
    assert usage.messages == 300
    assert [(c.code, c.orders, c.reports) for c in usage.unmapped()] == [
        ("LOC0", 100, 0),
        ("LOC1", 100, 0),
        ("LOC2", 100, 0),
    ]
    assert scan(tmp_path / "journal.sqlite", {"other": HL7InboundMapping()}, CDAMapping().acts).other_channels == 300
