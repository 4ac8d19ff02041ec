"""End to end: RIS orders over a real MLLP socket → journal → bus → worklist, queried with dcmtk findscu.

Runs on each store backend (SQLite files in the data folder, a PostgreSQL database) with the embedded bus, and on
SQLite with a real RabbitMQ broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests import ports
from tests.conftest import BACKENDS, ROOT, database_url_of, shared_path
from tests.peer_dcmtk import findscu
from traboule.adapters.mllp import MLLPClient
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.formats import hl7

FIXTURES = ROOT / "fixtures" / "hl7"

CT_QUERY = [
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "StudyInstanceUID",
    "ScheduledProcedureStepSequence[0].Modality=CT",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261125",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID",
]


free_port = ports.free_port  # one allocator for every test (tests/ports.py)


def engine_config(data_dir: Path, amqp_url: str = "", exchange: str = "traboule", database_url: str = "") -> Config:
    cfg = Config(data_dir=str(data_dir), amqp_url=amqp_url, exchange=exchange, database_url=database_url)
    # The orders → worklist flow; a test adds the other channels it needs (test_defaults runs the whole default set).
    cfg.channels = [cfg.channel("ris-orders"), cfg.channel("worklist")]
    cfg.channels[0]["source"]["port"] = free_port()
    wl = cfg.channels[1]
    wl["destinations"][0]["port"] = free_port()
    wl["destinations"].append({"adapter": "worklist-files", "folder": str(data_dir / "wl" / "TRABOULE")})
    return cfg


@pytest.fixture(params=[*BACKENDS, pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Runtime]:
    """The orders → worklist engine on each store backend with the embedded bus (``sqlite``, ``postgresql``), and
    on SQLite with a real RabbitMQ broker (``rabbitmq``)."""
    amqp_url, exchange, database_url = "", "traboule", ""
    if request.param == "rabbitmq":
        amqp_url = request.getfixturevalue("rabbitmq_url")
        exchange = f"traboule-{tmp_path.name}"
    else:
        database_url = database_url_of(request.param, request)
    runtime = Runtime(engine_config(tmp_path, amqp_url, exchange, database_url))
    assert runtime.stores.backend == ("postgresql" if database_url else "sqlite")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


def mllp_port(runtime: Runtime) -> int:
    return runtime.channel("ris-orders").listener.port  # type: ignore[attr-defined]


def mwl_port(runtime: Runtime) -> int:
    return runtime.channel("worklist").scps[0].port  # type: ignore[attr-defined]


def store(runtime: Runtime) -> Any:
    return runtime.channel("worklist").store  # type: ignore[attr-defined]


async def send(runtime: Runtime, *messages: bytes) -> list[hl7.Message]:
    async with MLLPClient("127.0.0.1", mllp_port(runtime), timeout=10) as client:
        return [hl7.parse(hl7.decode(await client.send(m)).text) for m in messages]


def ack_code(ack: hl7.Message) -> str:
    msa = ack.segment("MSA")
    assert msa is not None
    return msa.field(1)


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


async def test_order_appears_in_findscu_and_cancel_removes_it(engine: Runtime) -> None:
    (ack,) = await send(engine, fixture("orm_o01_nw_latin1.hl7"))
    assert ack_code(ack) == "AA"
    await until(lambda: store(engine).count() == 1)

    found = await asyncio.to_thread(findscu, mwl_port(engine), "TRABOULE", CT_QUERY)
    assert len(found) == 1
    item = found[0]
    assert item.AccessionNumber == "ACC0001"
    assert str(item.PatientName) == "DUPONT^Hélène^Marie^Mme"
    assert item.SpecificCharacterSet == "ISO_IR 100"
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "093000"

    (ack,) = await send(engine, fixture("orm_o01_ca.hl7"))
    assert ack_code(ack) == "AA"
    await until(lambda: store(engine).count() == 0)
    assert await asyncio.to_thread(findscu, mwl_port(engine), "TRABOULE", CT_QUERY) == []


async def test_worklist_files_follow_the_orders(engine: Runtime) -> None:
    folder = Path(engine.config.data_dir) / "wl" / "TRABOULE"
    await send(engine, fixture("orm_o01_nw_latin1.hl7"), fixture("omi_o23_nw_utf8.hl7"))
    await until(lambda: len(list(folder.glob("*.wl"))) == 2)
    await send(engine, fixture("orm_o01_ca.hl7"))
    await until(lambda: len(list(folder.glob("*.wl"))) == 1)
    (remaining,) = folder.glob("*.wl")
    assert pydicom.dcmread(remaining).AccessionNumber == "ACC0002"


async def test_same_message_twice_schedules_one_item(engine: Runtime) -> None:
    acks = await send(engine, fixture("orm_o01_nw_latin1.hl7"), fixture("orm_o01_nw_latin1.hl7"))
    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    await until(lambda: store(engine).count() == 1)
    assert engine.journal is not None
    assert engine.journal.counts() == {"accepted": 1, "duplicate": 1}
    await asyncio.sleep(0.2)
    assert store(engine).count() == 1


async def test_change_moves_the_scheduled_time(engine: Runtime) -> None:
    await send(engine, fixture("orm_o01_nw_latin1.hl7"))
    await until(lambda: store(engine).count() == 1)
    await send(engine, fixture("orm_o01_xo_change.hl7"))

    def moved() -> bool:
        found = findscu(mwl_port(engine), "TRABOULE", CT_QUERY)
        return (
            len(found) == 1 and found[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime == "110000"
        )

    await until(lambda: moved(), timeout=10)


async def test_patient_update_and_merge_reach_pending_items(engine: Runtime) -> None:
    await send(engine, fixture("orm_o01_nw_latin1.hl7"))
    await until(lambda: store(engine).count() == 1)
    await send(engine, fixture("adt_a08_update.hl7"))

    def name() -> str:
        (key,) = store(engine).keys_for_patient("IPP0001", "CHU-LYON") or [None]
        return str(store(engine).get(key).PatientName) if key else ""

    await until(lambda: name().startswith("DUPONT-MOREL^Hélène"))
    await send(engine, fixture("adt_a40_merge.hl7"))
    await until(lambda: store(engine).keys_for_patient("IPP0009", "CHU-LYON") != [])
    assert store(engine).keys_for_patient("IPP0001", "CHU-LYON") == []


async def test_bad_input_is_answered_and_journaled(engine: Runtime) -> None:
    acks = await send(
        engine,
        fixture("orm_o01_no_pid3.hl7"),
        fixture("siu_s12_unsupported.hl7"),
        b"THIS IS NOT HL7",
        fixture("orm_o01_missing_orc2.hl7"),
    )
    assert [ack_code(a) for a in acks] == ["AE", "AR", "AR", "AE"]
    err = acks[0].segment("ERR")
    assert err is not None and err.field(2) == "PID^1^3"  # v2.5 sender: ERR-2 location, ERR-3 code
    assert err.field(3).startswith("101^")
    assert acks[0].segment("MSA").field(2) == "MSG0041"  # type: ignore[union-attr]
    assert engine.journal is not None
    rejected = engine.journal.recent(10, "rejected")
    assert len(rejected) == 4
    assert {e.raw for e in rejected} >= {b"THIS IS NOT HL7", fixture("orm_o01_no_pid3.hl7")}
    assert store(engine).count() == 0


async def test_many_connections_at_once(engine: Runtime) -> None:
    base = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")

    async def one(i: int) -> list[str]:
        msgs = [
            base.replace("MSG0001", f"M{i}-{j}").replace("PLC0001", f"P{i}-{j}").encode("latin-1") for j in range(10)
        ]
        return [ack_code(a) for a in await send(engine, *msgs)]

    results = await asyncio.gather(*(one(i) for i in range(8)))
    assert all(code == "AA" for codes in results for code in codes)
    await until(lambda: store(engine).count() == 80, timeout=20)


async def test_corpus_messages_over_mllp(engine: Runtime) -> None:
    paths = sorted(shared_path("corpus", "hl7v2").iterdir())
    acks = await send(engine, *(p.read_bytes() for p in paths))
    codes = {p.name: ack_code(a) for p, a in zip(paths, acks, strict=True)}
    assert set(codes.values()) <= {"AA", "AE", "AR"}
    assert codes["dcm4che_ORM_O01_v231_2019.hl7"] == "AA"
    # its IPC-4 is the 19-character placeholder "ScheduledProcStepID": too long for a DICOM step id (SH, 16)
    assert codes["dcm4che_OMI_O23-ImagingOrder.hl7"] == "AE"
    assert codes["openmrs_ORM_O01_v231_NW_ZDS.hl7"] == "AA"
    assert codes["dcm4che_ADT_A40-PatientMerge.hl7"] == "AA"
    # reports: the ANS copy carries a placeholder text where the CDA goes (AE, the reason says so)
    assert codes["ans_MDM_T02_CR-imagerie_INIT.er7"] == "AE"
    # the other ORU samples are not French imaging reports (no accession number, no conclusion, lab results)
    assert codes["dcm4che_ORU_R01_2021.hl7"] == codes["iris_ORU_R01_v23_A_FT-report.hl7"] == "AE"
    assert engine.journal is not None
    assert sum(engine.journal.counts().values()) == len(paths)


async def test_worklist_files_are_served_by_wlmscpfs(tmp_path: Path, wlmscpfs: Any) -> None:
    """The files the engine writes are complete enough for dcmtk wlmscpfs with file rejection on."""
    server = wlmscpfs("TRABOULE")
    cfg = engine_config(tmp_path)
    cfg.channels[1]["destinations"][1]["folder"] = str(server.folder)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        # ORM^O01 has no station field; this RIS sends it in ORC-18 (the default mapping reads it there).
        orm = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
        orm = orm.replace("|1234^RENARD^Paul\r", "|1234^RENARD^Paul||||||CT01\r", 1).encode("latin-1")
        acks = await send(runtime, orm, fixture("omi_o23_nw_utf8.hl7"))
        assert [ack_code(a) for a in acks] == ["AA", "AA"]
        await until(lambda: len(list(server.folder.glob("*.wl"))) == 2)
        keys = [
            "PatientName",
            "AccessionNumber",
            "SpecificCharacterSet",
            "StudyInstanceUID",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
            "ScheduledProcedureStepSequence[0].Modality",
        ]
        found = await asyncio.to_thread(findscu, server.port, "TRABOULE", keys)
        by_accession = {str(ds.AccessionNumber): ds for ds in found}
        assert set(by_accession) == {"ACC0001", "ACC0002"}
        assert str(by_accession["ACC0002"].PatientName) == "ŁUKASIEWICZ^Zoë"
        assert by_accession["ACC0001"].ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT01"
        await send(runtime, fixture("orm_o01_ca.hl7"))
        await until(lambda: len(list(server.folder.glob("*.wl"))) == 1)
        found = await asyncio.to_thread(findscu, server.port, "TRABOULE", keys)
        assert [str(ds.AccessionNumber) for ds in found] == ["ACC0002"]
    finally:
        await runtime.stop()


async def test_missing_identifiers_are_assigned_once(engine: Runtime) -> None:
    """An order without study UID / requested procedure id gets stable ones (same values after a change)."""
    text = fixture("orm_o01_nw_latin1.hl7").decode("latin-1")
    text = text.replace("|RP0001|SPS0001|", "|||").replace(
        "ZDS|1.2.250.1.999.1.2.20261125.1^RIS^Application^DICOM\r", ""
    )
    await send(engine, text.encode("latin-1"))
    await until(lambda: store(engine).count() == 1)
    (key,) = store(engine).keys_with_prefix("")
    first = store(engine).get(key)
    assert first.StudyInstanceUID.startswith("2.25.")
    assert first.RequestedProcedureID == "ACC0001"
    assert first.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "ACC0001"
    await send(engine, text.replace("MSG0001", "MSG0001B").replace("ORC|NW|", "ORC|XO|").encode("latin-1"))
    await asyncio.sleep(0.3)
    assert store(engine).keys_with_prefix("") == [key]
    assert store(engine).get(key).StudyInstanceUID == first.StudyInstanceUID


async def test_retried_order_does_not_undo_a_later_cancel(tmp_path: Path, database_url: str) -> None:
    """NW fails once and is retried after the CA was applied: the cancelled order must not come back."""
    runtime = Runtime(engine_config(tmp_path, database_url=database_url))
    channel: Any = runtime.channel("worklist")
    original, failed = channel._changes, []

    def flaky(env: Any, view: Any) -> Any:
        if env.payload.action == "new" and not failed:
            failed.append(env.id)
            raise RuntimeError("database briefly unavailable")
        return original(env, view)

    channel._changes = flaky
    await runtime.start()
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: bool(failed))
        await send(runtime, fixture("orm_o01_ca.hl7"))
        await until(lambda: channel.store.order_seqs(["RIS|PLC0001"]).get("RIS|PLC0001") == 2)
        await asyncio.sleep(1.0)  # the NW retry (backoff 0.2 s) has run by now
        assert await runtime.bus.depth("worklist") == 0
        assert channel.store.count() == 0
    finally:
        await runtime.stop()


async def test_merge_drops_the_old_identity(engine: Runtime) -> None:
    """After ADT^A40 the item carries the surviving patient only: no INS of the merged record is left behind."""
    await send(engine, fixture("orm_o01_nw_latin1.hl7"))
    await until(lambda: store(engine).count() == 1)
    (key,) = store(engine).keys_with_prefix("")
    assert store(engine).get(key).OtherPatientIDsSequence[0].PatientID == "279035121518989"
    await send(engine, fixture("adt_a40_merge.hl7"))
    await until(lambda: store(engine).get(key).PatientID == "IPP0009")
    merged = store(engine).get(key)
    assert "OtherPatientIDsSequence" not in merged
    assert str(merged.PatientName) == "DUPONT^Hélène"


async def test_unusable_numbers_do_not_block_the_order(engine: Runtime) -> None:
    text = fixture("orm_o01_nw_latin1.hl7").decode("latin-1").rstrip("\r")
    text += "\rOBX|1|NM|29463-7^Body weight^LN||72,5|kg\rOBX|2|NM|8302-2^Body height^LN||1 m 70|cm\r"
    (ack,) = await send(engine, text.encode("latin-1"))
    assert ack_code(ack) == "AA"
    await until(lambda: store(engine).count() == 1)
    (key,) = store(engine).keys_with_prefix("")
    item = store(engine).get(key)
    assert float(item.PatientWeight) == 72.5
    assert item.PatientSize is None or str(item.PatientSize) == ""
