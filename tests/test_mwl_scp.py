"""The MWL SCP queried by a real modality stand-in: dcmtk findscu / echoscu against WorklistSCP on a free port."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind

from adapters.dicom_mwl import WorklistSCP
from channels.worklist import WorklistChannel
from tests.peer_dcmtk import echoscu, findscu, free_port, mwl_item, require_dcmtk, run_findscu, with_keys
from traboule import metrics
from traboule.worklist import WorklistStore

pytestmark = pytest.mark.dcmtk

AET = "TRABOULE"
SPS = "ScheduledProcedureStepSequence[0]."
UTF8_NAME = "KOWALSKI^Łukasz Zoë"  # Ł is not in Latin-1: only UTF-8 can carry it


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorklistStore]:
    # Module-wide: the tests only read, and stopping a pynetdicom server takes up to 0.5 s (its poll interval).
    store = WorklistStore(str(tmp_path_factory.mktemp("mwl") / "worklist.sqlite"))
    store.apply(
        [
            ("o1#1", mwl_item()),  # ISO_IR 100, DUPONT^Hélène, CT01, 2024-03-15 09:30
            (
                "o2#1",
                mwl_item(
                    charset="ISO_IR 192",
                    patient_name=UTF8_NAME,
                    patient_id="PID2",
                    accession="ACC0002",
                    modality="MR",
                    station_aet="MR01",
                    start_date="20240316",
                    start_time="140000",
                ),
            ),
            (
                "o3#1",
                mwl_item(patient_name="MARTIN^Jean", accession="ACC0003", station_aet="CT02", start_date="20240320"),
            ),
            ("o4#1", mwl_item(patient_name="DONE^Job", accession="ACC0004", status="COMPLETED")),
        ],
        [],
    )
    yield store
    store.close()


@pytest.fixture(scope="module")
def scp(store: WorklistStore) -> Iterator[WorklistSCP]:
    require_dcmtk("findscu", "echoscu")
    server = WorklistSCP(store, ae_title=AET, port=free_port())
    server.start()
    yield server
    server.stop()


def accessions(datasets: list[Dataset]) -> list[str]:
    return sorted(ds.AccessionNumber for ds in datasets)


def test_latin1_item_is_returned_in_iso_ir_100_with_its_accents(scp: WorklistSCP) -> None:
    result = run_findscu(scp.port, AET, with_keys("AccessionNumber=ACC0001"))
    [ds] = result.datasets
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert ds.PatientName == "DUPONT^Hélène"
    # The bytes on the wire are Latin-1, as declared: a consumer honouring (0008,0005) decodes them right.
    assert "DUPONT^Hélène".encode("latin-1") in result.files[0]


def test_utf8_item_is_returned_in_iso_ir_192(scp: WorklistSCP) -> None:
    result = run_findscu(scp.port, AET, with_keys("AccessionNumber=ACC0002"))
    [ds] = result.datasets
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName == UTF8_NAME
    assert UTF8_NAME.encode("utf-8") in result.files[0]


def test_modality_query_returns_only_offered_items_of_that_modality(scp: WorklistSCP) -> None:
    found = findscu(scp.port, AET, with_keys(f"{SPS}Modality=CT"))
    assert accessions(found) == ["ACC0001", "ACC0003"]  # ACC0004 is COMPLETED: not offered
    assert {ds.ScheduledProcedureStepSequence[0].Modality for ds in found} == {"CT"}


def test_date_range_query(scp: WorklistSCP) -> None:
    found = findscu(scp.port, AET, with_keys(f"{SPS}ScheduledProcedureStepStartDate=20240301-20240316"))
    assert accessions(found) == ["ACC0001", "ACC0002"]


def test_combined_date_time_range_query(scp: WorklistSCP) -> None:
    keys = with_keys(
        f"{SPS}ScheduledProcedureStepStartDate=20240315-20240316",
        f"{SPS}ScheduledProcedureStepStartTime=1000-1500",
    )
    # From 15 March 10:00 to 16 March 15:00: the 09:30 item on the 15th is out, the 14:00 one on the 16th in.
    assert accessions(findscu(scp.port, AET, keys)) == ["ACC0002"]


def test_station_ae_title_query(scp: WorklistSCP) -> None:
    found = findscu(scp.port, AET, with_keys(f"{SPS}ScheduledStationAETitle=CT02"))
    assert accessions(found) == ["ACC0003"]


def test_patient_name_wildcard_query(scp: WorklistSCP) -> None:
    assert accessions(findscu(scp.port, AET, with_keys("PatientName=D?PONT*"))) == ["ACC0001"]
    assert accessions(findscu(scp.port, AET, with_keys("PatientName=*^J*"))) == ["ACC0003"]


def test_accession_query_returns_exactly_the_requested_keys(scp: WorklistSCP) -> None:
    [ds] = findscu(scp.port, AET, ["AccessionNumber=ACC0003", "PatientID", "PatientAge"])
    assert ds.PatientID == "PID12345"
    assert "PatientAge" in ds and ds.PatientAge == ""  # requested but unknown: zero length
    assert "PatientName" not in ds  # not requested, not returned
    assert ds.SpecificCharacterSet == "ISO_IR 100"  # always: it says how the values are encoded


def test_invalid_date_gets_a_failure_status_naming_the_key(scp: WorklistSCP) -> None:
    keys = with_keys(f"{SPS}ScheduledProcedureStepStartDate=20241301")
    result = run_findscu(scp.port, AET, keys, extra=["-d"])  # -d prints the status detail
    assert result.datasets == []
    assert "0xa900" in result.output.lower()  # Identifier does not match SOP class, as wlmscpfs answers
    assert "OffendingElement" in result.output and "(0040,0002)" in result.output
    assert "not a DA value: '20241301'" in result.output  # ErrorComment


def test_c_echo_succeeds_and_wrong_called_ae_is_rejected(scp: WorklistSCP) -> None:
    assert echoscu(scp.port, AET).returncode == 0
    rejected = echoscu(scp.port, "NOT-TRABOULE")
    assert rejected.returncode != 0
    assert "Called AE Title Not Recognized" in rejected.stdout + rejected.stderr
    result = run_findscu(scp.port, "NOT-TRABOULE", with_keys())
    assert result.returncode != 0 and result.datasets == []


def test_max_results_caps_the_matches(store: WorklistStore) -> None:
    require_dcmtk("findscu")
    server = WorklistSCP(store, ae_title=AET, port=free_port(), max_results=1)
    server.start()
    try:
        assert len(findscu(server.port, AET, with_keys())) == 1
    finally:
        server.stop()


def test_max_results_is_read_from_the_destination_config(tmp_path: Path) -> None:
    runtime = SimpleNamespace(config=SimpleNamespace(path=None), data_dir=tmp_path)
    destinations = [{"adapter": "mwl-scp", "max_results": "25"}, {"adapter": "mwl-scp"}]
    channel = WorklistChannel({"name": "worklist", "destinations": destinations}, runtime)
    try:
        assert [scp.max_results for scp in channel.scps] == [25, 0]
    finally:
        channel.store.close()


class SlowStore:
    """A store whose matches trickle in, so that a C-CANCEL arrives while the SCP is still streaming."""

    def find(self, query: Dataset, *, case_insensitive_names: bool = False) -> Iterator[Dataset]:
        for i in range(20):
            time.sleep(0.05)
            rsp = Dataset()
            rsp.SpecificCharacterSet = "ISO_IR 100"
            rsp.AccessionNumber = f"SLOW{i:02d}"
            yield rsp


def test_c_cancel_stops_the_stream() -> None:
    require_dcmtk("findscu")
    server = WorklistSCP(SlowStore(), ae_title=AET, port=free_port())  # type: ignore[arg-type]
    server.start()
    try:
        result = run_findscu(server.port, AET, ["AccessionNumber"], extra=["--cancel", "2", "-v"])
    finally:
        server.stop()
    assert 2 <= len(result.datasets) < 20
    assert "Cancel" in result.output


def answered_queries() -> float:
    return metrics.REGISTRY.get_sample_value("traboule_mwl_queries_total") or 0.0


def test_repeated_queries_from_findscu_and_on_one_open_association(scp: WorklistSCP) -> None:
    """The same query, from new findscu processes and again and again on one association: the same answer,
    each C-FIND counted in `traboule_mwl_queries` (timings: bench/mwl_find.py)."""
    before = answered_queries()
    keys = with_keys(
        f"{SPS}Modality=CT", f"{SPS}ScheduledStationAETitle=CT01", f"{SPS}ScheduledProcedureStepStartDate=20240315"
    )
    for _ in range(3):
        assert echoscu(scp.port, AET).returncode == 0
        assert accessions(findscu(scp.port, AET, keys)) == ["ACC0001"]
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=AET)
    assert assoc.is_established
    # Nagle off on the SCU side too (the SCP does it for its side), else each request waits ~40 ms.
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    query = Dataset()
    query.PatientName = ""
    query.AccessionNumber = ""
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = "CT01"
    step.ScheduledProcedureStepStartDate = "20240315"
    query.ScheduledProcedureStepSequence = [step]
    try:
        for _ in range(5):
            responses = list(assoc.send_c_find(query, ModalityWorklistInformationFind))
            assert [status.Status for status, _ in responses] == [0xFF00, 0x0000]
            assert responses[0][1].AccessionNumber == "ACC0001"
            assert responses[0][1].PatientName == "DUPONT^Hélène"
    finally:
        assoc.release()
    assert answered_queries() - before == 3 + 5


def test_stop_ends_open_associations(store: WorklistStore) -> None:
    server = WorklistSCP(store, ae_title=AET, port=free_port())
    server.start()
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AET)
    assert assoc.is_established
    server.stop()
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    assert not server.is_running
