"""The MWL SCP queried by a real modality stand-in: dcmtk findscu / echoscu against WorklistSCP on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from tests.peer_dcmtk import (
    FindResult,
    echoscu,
    findscu,
    free_port,
    mwl_item,
    require_dcmtk,
    run_findscu,
    with_keys,
)
from traboule import metrics
from traboule.adapters.dicom_mwl import CANCEL, WorklistSCP
from traboule.adapters.dicom_server import SCPLimits
from traboule.channels.worklist import WorklistChannel
from traboule.stores.worklist import WorklistStore

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
    server = WorklistSCP(store.find, ae_title=AET, port=free_port())
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
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), max_results=1)
    server.start()
    try:
        assert len(findscu(server.port, AET, with_keys())) == 1
    finally:
        server.stop()


def test_limits_are_read_from_the_destination_config(tmp_path: Path) -> None:
    runtime = SimpleNamespace(config=SimpleNamespace(path=None), data_dir=tmp_path)
    configured = {
        "adapter": "mwl-scp",
        "max_results": "25",
        "max_examined": 1000,
        "query_timeout": 2.5,
        "max_associations": 100,
        "max_associations_per_peer": 8,
        "acse_timeout": 5,
        "dimse_timeout": 6,
        "network_timeout": 120,
    }
    channel = WorklistChannel({"name": "worklist", "destinations": [configured, {"adapter": "mwl-scp"}]}, runtime)
    try:
        custom, default = channel.scps
        assert (custom.max_results, custom.max_examined, custom.query_timeout) == (25, 1000, 2.5)
        assert custom.limits == SCPLimits(100, 8, 5.0, 6.0, 120.0)
        assert (default.max_results, default.max_examined, default.query_timeout) == (0, 50_000, 10.0)
        assert default.limits == SCPLimits(64, 32, 30.0, 30.0, 30.0)
        assert custom._ae.maximum_associations == 100 and custom._ae.network_timeout == 120.0
    finally:
        channel.store.close()


def test_a_limit_that_is_not_a_positive_number_names_itself(tmp_path: Path) -> None:
    runtime = SimpleNamespace(config=SimpleNamespace(path=None), data_dir=tmp_path)
    destinations = [{"adapter": "mwl-scp", "acse_timeout": "soon"}]
    with pytest.raises(ValueError, match=r"channel worklist: mwl-scp: acse_timeout must be a positive float"):
        WorklistChannel({"name": "worklist", "destinations": destinations}, runtime)


class SlowStore:
    """A store whose matches trickle in, so that a C-CANCEL arrives while the SCP is still streaming."""

    def find(self, query: Dataset, *, case_insensitive_names: bool = False, **limits: object) -> Iterator[Dataset]:
        for i in range(20):
            time.sleep(0.05)
            rsp = Dataset()
            rsp.SpecificCharacterSet = "ISO_IR 100"
            rsp.AccessionNumber = f"SLOW{i:02d}"
            yield rsp


def test_c_cancel_stops_the_stream() -> None:
    require_dcmtk("findscu")
    server = WorklistSCP(SlowStore().find, ae_title=AET, port=free_port())  # type: ignore[arg-type]
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
    server = WorklistSCP(store.find, ae_title=AET, port=free_port())
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


# -- availability under hostile conditions ----------------------------------------------------------------------

# PS3.4 wild cards that a backtracking regex matches in exponential time (x5 per `*?` pair): on the 38 items
# below, minutes of CPU with the GIL held, C-ECHO answered 12 s late.
HOSTILE = "*?" * 10 + "Z"
DESCRIPTIONS = ["SCANNER THORACO-ABDOMINO-PELVIEN INJECTE", "IRM ENCEPHALIQUE SANS ET AVEC INJECTION"]


@pytest.fixture(scope="module")
def described_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorklistSCP]:
    require_dcmtk("findscu", "echoscu")
    store = WorklistStore(str(tmp_path_factory.mktemp("hostile") / "worklist.sqlite"))
    items = [(f"h{i}#1", mwl_item(accession=f"H{i:04d}", description=DESCRIPTIONS[i % 2])) for i in range(37)]
    items.append(("hz#1", mwl_item(accession="HZZZZ", description="CONTROLE APRES TRAITEMENT, PROTOCOLE Z")))
    store.apply(items, [])
    server = WorklistSCP(store.find, ae_title=AET, port=free_port())
    server.start()
    yield server
    server.stop()
    store.close()


def test_an_exponential_wildcard_is_answered_at_once_and_delays_nobody(described_scp: WorklistSCP) -> None:
    port = described_scp.port
    hostile = with_keys(f"RequestedProcedureDescription={HOSTILE}")
    done = threading.Event()
    hostile_runs: list[FindResult] = []

    def keep_asking() -> None:
        while not done.is_set():
            hostile_runs.append(run_findscu(port, AET, hostile, timeout=20))

    askers = [threading.Thread(target=keep_asking) for _ in range(2)]
    for asker in askers:
        asker.start()
    try:
        time.sleep(0.3)  # hostile queries in flight from two other associations
        started = time.perf_counter()
        assert echoscu(port, AET).returncode == 0
        echo_s = time.perf_counter() - started
        normal = run_findscu(port, AET, with_keys("AccessionNumber=H0007"))
    finally:
        done.set()
        for asker in askers:
            asker.join(30)
    assert echo_s < 1.5
    assert normal.seconds < 1.5 and accessions(normal.datasets) == ["H0007"]
    assert hostile_runs and all(run.returncode == 0 for run in hostile_runs)
    assert all(accessions(run.datasets) == ["HZZZZ"] for run in hostile_runs)
    assert max(run.seconds for run in hostile_runs) < 2


@pytest.fixture(scope="module")
def long_scan_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorklistStore]:
    """Items whose 10,240-character comments make each comparison with LONG_SCAN cost ~50 ms (O(pattern x
    value), linear as it should be): a scan of all of them takes seconds and matches nothing."""
    store = WorklistStore(str(tmp_path_factory.mktemp("long") / "worklist.sqlite"))
    items = []
    for i in range(150):
        item = mwl_item(accession=f"L{i:04d}")
        item.RequestedProcedureComments = "a" * 10240
        items.append((f"l{i}#1", item))
    store.apply(items, [])
    yield store
    store.close()


LONG_SCAN = "*" + "a?" * 5000 + "b*"


def long_scan_query() -> Dataset:
    query = Dataset()
    query.AccessionNumber = ""
    query.RequestedProcedureComments = LONG_SCAN
    return query


def modality_association(port: int, *, bind_host: str = "127.0.0.1") -> Association:
    ae = AE(ae_title="MODALITY1")
    ae.add_requested_context(ModalityWorklistInformationFind)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 3  # a collector left waiting after an abort gives up soon
    return ae.associate("127.0.0.1", port, ae_title=AET, bind_address=(bind_host, 0))


def start_find(assoc: Association, query: Dataset, msg_id: int) -> tuple[list[int | None], threading.Thread]:
    """Send a C-FIND now and collect its response statuses in a thread (None: the association went away)."""
    responses = assoc.send_c_find(query, ModalityWorklistInformationFind, msg_id=msg_id)
    statuses: list[int | None] = []

    def collect() -> None:
        for status, _ in responses:
            statuses.append(int(status.Status) if "Status" in status else None)

    thread = threading.Thread(target=collect)
    thread.start()
    return statuses, thread


def test_a_query_over_its_item_budget_gets_out_of_resources(store: WorklistStore) -> None:
    require_dcmtk("findscu")
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), max_examined=2)
    server.start()
    try:
        result = run_findscu(server.port, AET, with_keys(), extra=["-d"])  # 3 offered items to examine
        narrow = findscu(server.port, AET, with_keys("AccessionNumber=ACC0003"))  # 1 candidate: within budget
    finally:
        server.stop()
    assert "0xa700" in result.output.lower()  # Refused: Out of Resources (PS3.4 K.4.1.1.4)
    assert "query examined over 2 items" in result.output  # ErrorComment
    assert accessions(narrow) == ["ACC0003"]


def test_a_query_over_its_time_budget_gets_out_of_resources(long_scan_store: WorklistStore) -> None:
    server = WorklistSCP(long_scan_store.find, ae_title=AET, port=free_port(), query_timeout=0.2)
    server.start()
    assoc = modality_association(server.port)
    try:
        started = time.perf_counter()
        responses = list(assoc.send_c_find(long_scan_query(), ModalityWorklistInformationFind))
        elapsed = time.perf_counter() - started
        assert [int(status.Status) for status, _ in responses] == [0xA700]
        assert responses[0][0].ErrorComment == "query took over 0.2 s"
        assert elapsed < 1.5  # the whole scan would take seconds
    finally:
        assoc.release()
        server.stop()


def test_c_cancel_ends_a_long_scan_that_has_no_match(long_scan_store: WorklistStore) -> None:
    server = WorklistSCP(long_scan_store.find, ae_title=AET, port=free_port(), query_timeout=120)
    server.start()
    assoc = modality_association(server.port)
    try:
        statuses, collector = start_find(assoc, long_scan_query(), msg_id=7)
        time.sleep(0.5)  # the scan is under way, no match yet (and none to come)
        cancelled = time.perf_counter()
        assoc.send_c_cancel(7, query_model=ModalityWorklistInformationFind)
        collector.join(10)
        assert time.perf_counter() - cancelled < 1.5
        assert statuses == [CANCEL]
    finally:
        assoc.release()
        server.stop()


def test_a_scan_stops_when_its_association_is_aborted(long_scan_store: WorklistStore) -> None:
    server = WorklistSCP(long_scan_store.find, ae_title=AET, port=free_port(), query_timeout=120)
    server.start()
    assoc = modality_association(server.port)
    try:
        before = answered_queries()
        _statuses, collector = start_find(assoc, long_scan_query(), msg_id=1)
        time.sleep(0.5)
        aborted = time.perf_counter()
        assoc.abort()
        while answered_queries() == before and time.perf_counter() - aborted < 10:
            time.sleep(0.02)  # the handler counts its query when it returns
        assert answered_queries() == before + 1
        assert time.perf_counter() - aborted < 1.5
    finally:
        collector.join(10)
        server.stop()


def test_silent_connections_and_idle_associations_do_not_lock_modalities_out(store: WorklistStore) -> None:
    """pynetdicom's default allowed 10 associations, counting connections that never sent anything: 10 idle
    modalities, or a port scanner's 12 bare connections, refused everyone else ("local limit exceeded")."""
    require_dcmtk("findscu", "echoscu")
    server = WorklistSCP(store.find, ae_title=AET, port=free_port())  # the default limits
    server.start()
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(12)]
    idle = [modality_association(server.port) for _ in range(10)]
    try:
        assert all(assoc.is_established for assoc in idle)
        started = time.perf_counter()
        assert echoscu(server.port, AET).returncode == 0
        assert accessions(findscu(server.port, AET, with_keys("AccessionNumber=ACC0001"))) == ["ACC0001"]
        assert time.perf_counter() - started < 2
    finally:
        for sock in silent:
            sock.close()
        for assoc in idle:
            assoc.release()
        server.stop()


def closed_after(sock: socket.socket, within: float) -> float:
    """Seconds until the peer closes `sock` (fails if it is still open after `within`)."""
    started = time.perf_counter()
    sock.settimeout(within)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return time.perf_counter() - started


def test_a_connection_that_never_associates_is_closed_after_the_acse_timeout(store: WorklistStore) -> None:
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=SCPLimits(acse_timeout=1))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert 0.8 < closed_after(silent, within=5) < 3  # the ARTIM timer (PS3.8 9.1.5)
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.sendall(b"\x01\x00\x00")  # the first bytes of an A-ASSOCIATE-RQ, and no more
            assert closed_after(stalled, within=5) < 3  # no DUL thread left blocked in recv()
    finally:
        server.stop()


def test_one_host_cannot_take_every_association(store: WorklistStore) -> None:
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=SCPLimits(max_associations_per_peer=3))
    server.start()
    greedy = [modality_association(server.port) for _ in range(3)]
    try:
        assert all(assoc.is_established for assoc in greedy)
        one_more = modality_association(server.port)
        assert not one_more.is_established  # its connection was closed at once
        other_host = modality_association(server.port, bind_host="127.0.0.2")  # the loopback is all of 127/8
        assert other_host.is_established
        assert other_host.send_c_echo().Status == 0x0000
        other_host.release()
        greedy.pop().release()
        time.sleep(0.2)
        again = modality_association(server.port)
        assert again.is_established  # a slot freed is a slot again
        again.release()
    finally:
        for assoc in greedy:
            assoc.release()
        server.stop()


def test_a_pdu_longer_than_the_message_budget_is_not_read(store: WorklistStore) -> None:
    """pynetdicom reads a PDU whole, trusting its header's length (up to 4 GiB): 100 MiB sent behind such a
    header went into the SCP's memory."""
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=SCPLimits(max_message_bytes=64 * 1024))
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as greedy:
            greedy.sendall(b"\x01\x00" + (100 * 1024 * 1024).to_bytes(4, "big"))  # an A-ASSOCIATE-RQ of 100 MiB
            sent = 0
            with contextlib.suppress(OSError):
                greedy.settimeout(5)
                for _ in range(1600):  # up to 100 MiB, unless the SCP closes first
                    greedy.sendall(b"\0" * 65536)
                    sent += 65536
            assert sent < 50 * 1024 * 1024  # the SCP closed the connection long before
        assert echoscu(server.port, AET).returncode == 0
    finally:
        server.stop()


def test_a_message_of_endless_fragments_ends_its_association(store: WorklistStore) -> None:
    """Each P-DATA PDU within the negotiated size, but a command that never ends: pynetdicom gathered its
    fragments in memory for ever."""
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=SCPLimits(max_message_bytes=256 * 1024))
    server.start()
    assoc = modality_association(server.port)
    try:
        assert assoc.is_established
        raw = assoc.dul.socket.socket
        assert raw is not None
        fragment = b"\0" * 8000
        pdv = (len(fragment) + 2).to_bytes(4, "big") + b"\x01\x01" + fragment  # context 1, command, not last
        pdu = b"\x04\x00" + len(pdv).to_bytes(4, "big") + pdv
        with contextlib.suppress(OSError):
            for _ in range(200):  # 1.6 MB of one command set
                raw.sendall(pdu)
        deadline = time.monotonic() + 5
        while assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established
        assert echoscu(server.port, AET).returncode == 0
    finally:
        if assoc.is_established:
            assoc.abort()
        server.stop()


def test_a_burst_of_connect_and_close_does_not_take_the_association_slots(store: WorklistStore) -> None:
    """A peer that connects and closes at once left pynetdicom's thread waiting out acse_timeout, still counted
    as an association: 300 such connections from one address refused everyone for 20 s."""
    server = WorklistSCP(store.find, ae_title=AET, port=free_port(), limits=SCPLimits(max_associations=16))
    server.start()
    try:
        for _ in range(60):
            with socket.socket() as flash:
                flash.bind(("127.0.0.2", 0))
                flash.connect(("127.0.0.1", server.port))
            # 60 in ~0.3 s, far within acse_timeout: back to back, the listen backlog (5) overflows and each
            # dropped SYN costs the kernel's 1 s retransmission, ~8 s in all, for nothing the test looks at.
            time.sleep(0.005)
        time.sleep(0.3)
        assert len(server._server.active_associations) < 16  # type: ignore[union-attr]
        assert echoscu(server.port, AET).returncode == 0
    finally:
        server.stop()
