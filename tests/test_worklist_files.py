"""Worklist files read by a real dcmtk wlmscpfs, with file rejection ON (so only complete items are served)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.sequence import Sequence

from tests.peer_dcmtk import WlmServer, findscu, mwl_item, with_keys
from traboule.adapters.worklist_files import WorklistFileWriter, file_name, missing_for_wlmscpfs


def test_written_file_is_a_dicom_file_like_dump2dcm_writes(tmp_path: Path) -> None:
    writer = WorklistFileWriter(str(tmp_path / "WLMSCP"))
    path = writer.write("order-1#1", mwl_item())
    assert path.name == file_name("order-1#1") and path.suffix == ".wl"
    assert (tmp_path / "WLMSCP" / "lockfile").exists()
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # explicit VR little endian
    assert ds.PatientName == "DUPONT^Hélène"
    assert "DUPONT^Hélène".encode("latin-1") in raw  # ISO_IR 100 bytes, as declared


def test_unchanged_item_gives_identical_bytes_and_sync_skips_it(tmp_path: Path) -> None:
    writer = WorklistFileWriter(str(tmp_path / "AE"))
    first = writer.write("k1", mwl_item()).read_bytes()
    assert writer.write("k1", mwl_item()).read_bytes() == first
    report = writer.sync([("k1", mwl_item()), ("k2", mwl_item(accession="ACC0002"))])
    assert (report.written, report.unchanged, report.removed) == (1, 1, 0)


def test_sync_removes_files_of_items_no_longer_listed_and_stale_temps(tmp_path: Path) -> None:
    writer = WorklistFileWriter(str(tmp_path / "AE"))
    writer.write("gone", mwl_item())
    (tmp_path / "AE" / ".abc.crash.tmp").write_bytes(b"half")
    report = writer.sync([("kept", mwl_item())])
    assert report.removed == 1
    names = sorted(p.name for p in (tmp_path / "AE").iterdir())
    assert names == sorted(["lockfile", file_name("kept")])


def test_remove_reports_whether_there_was_a_file(tmp_path: Path) -> None:
    writer = WorklistFileWriter(str(tmp_path / "AE"))
    writer.write("k", mwl_item())
    assert writer.remove("k") is True
    assert writer.remove("k") is False
    assert not writer.path_for("k").exists()


def test_completeness_check_names_what_wlmscpfs_would_reject() -> None:
    assert missing_for_wlmscpfs(mwl_item()) == []
    item = mwl_item()
    del item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime
    item.RequestedProcedureID = ""
    item.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = Sequence()
    assert missing_for_wlmscpfs(item) == [
        "RequestedProcedureID",
        "ScheduledProcedureStepSequence>ScheduledProcedureStepStartTime",
        "ScheduledProcedureStepSequence>ScheduledProtocolCodeSequence (present, so it needs complete items)",
    ]


@pytest.mark.dcmtk
def test_wlmscpfs_serves_written_items_and_forgets_removed_ones(wlmscpfs: Callable[..., WlmServer]) -> None:
    server = wlmscpfs("WLMSCP")  # file rejection ON: an incomplete item would be silently ignored
    writer = WorklistFileWriter(str(server.folder))
    writer.write("order-1#1", mwl_item())
    writer.write("order-2#1", mwl_item(accession="ACC0002", modality="MR", station_aet="MR01", sps_id="SPS0002"))

    ct = findscu(server.port, server.aet, with_keys("ScheduledProcedureStepSequence[0].Modality=CT"))
    assert [ds.AccessionNumber for ds in ct] == ["ACC0001"]
    assert ct[0].SpecificCharacterSet == "ISO_IR 100"
    assert ct[0].PatientName == "DUPONT^Hélène"
    assert ct[0].ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT01"

    assert len(findscu(server.port, server.aet, MWL_KEYS_ALL)) == 2
    writer.remove("order-1#1")
    assert [ds.AccessionNumber for ds in findscu(server.port, server.aet, MWL_KEYS_ALL)] == ["ACC0002"]


@pytest.mark.dcmtk
def test_wlmscpfs_with_file_reject_ignores_the_items_the_check_flags(wlmscpfs: Callable[..., WlmServer]) -> None:
    # The counter-proof: the fixture really rejects incomplete files (so the tests above prove completeness),
    # and missing_for_wlmscpfs agrees with dcmtk, including on an empty code sequence.
    server = wlmscpfs("WLMSCP")
    writer = WorklistFileWriter(str(server.folder))
    no_time = mwl_item(accession="NO-TIME")
    del no_time.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime
    empty_codes = mwl_item(accession="EMPTY-CODES")
    empty_codes.ScheduledProcedureStepSequence[0].ScheduledProtocolCodeSequence = Sequence()
    for item in (no_time, empty_codes, mwl_item()):
        writer.write(item.AccessionNumber, item)
    assert missing_for_wlmscpfs(no_time) and missing_for_wlmscpfs(empty_codes)
    assert [ds.AccessionNumber for ds in findscu(server.port, server.aet, MWL_KEYS_ALL)] == ["ACC0001"]


@pytest.mark.dcmtk
def test_sync_rewrites_the_folder_wlmscpfs_serves(wlmscpfs: Callable[..., WlmServer]) -> None:
    server = wlmscpfs("WLMSCP")
    writer = WorklistFileWriter(str(server.folder))
    writer.write("old", mwl_item(accession="OLD"))
    writer.sync([("a", mwl_item(accession="A1")), ("b", mwl_item(accession="B1", charset="ISO_IR 192"))])
    found = findscu(server.port, server.aet, MWL_KEYS_ALL)
    assert sorted(ds.AccessionNumber for ds in found) == ["A1", "B1"]
    assert {ds.SpecificCharacterSet for ds in found} == {"ISO_IR 100", "ISO_IR 192"}
    assert {str(ds.PatientName) for ds in found} == {"DUPONT^Hélène"}


MWL_KEYS_ALL = with_keys()
