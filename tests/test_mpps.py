"""MPPS end to end: RIS order over MLLP → worklist; a pynetdicom MPPS SCU reports the step (N-CREATE IN PROGRESS,
N-SET COMPLETED) → journal → worklist status and an ORM^O01 status message to an MLLP "RIS" receiver."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

from tests.test_flow import engine_config, fixture, free_port, send, store, until
from traboule.adapters.dicom_server import SCPLimits
from traboule.adapters.mllp import MLLPListener
from traboule.app.runtime import Runtime
from traboule.channels.mpps import MPPSChannel
from traboule.formats import hl7


@dataclass
class Ris:
    """An MLLP receiver standing for the RIS: records every message, answers with the next scripted code."""

    script: list[str] = field(default_factory=list)
    received: list[tuple[str, hl7.Message]] = field(default_factory=list)
    listener: MLLPListener | None = None

    async def handle(self, data: bytes, peer: str) -> bytes:
        msg = hl7.parse(hl7.decode(data).text)
        code = self.script.pop(0) if self.script else "AA"
        self.received.append((code, msg))
        return hl7.build_ack(msg, code, control_id=f"R{len(self.received)}", timestamp="20261125100000").encode()

    def accepted(self) -> list[hl7.Message]:
        return [m for code, m in self.received if code == "AA"]


@dataclass
class Engine:
    runtime: Runtime
    ris: Ris
    mpps_port: int


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    ris = Ris()
    ris.listener = MLLPListener(ris.handle, port=0, name="ris")
    await ris.listener.start()
    cfg = engine_config(tmp_path)
    cfg.channels[1]["topics"] = ["order.#", "patient.#", "procedure.#"]
    mpps_port = free_port()
    cfg.channels.append({"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": mpps_port}]})
    cfg.channels.append(
        {
            "name": "ris-status",
            "kind": "hl7-status",
            "destination": {"adapter": "mllp-sender", "host": "127.0.0.1", "port": ris.listener.port, "timeout": 5},
        }
    )
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        yield Engine(runtime, ris, mpps_port)
    finally:
        await runtime.stop()
        await ris.listener.stop()


class Modality:
    """A pynetdicom MPPS SCU (blocking calls: run them off the event loop, which serves the SCP's journal)."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="CT01")
        ae.add_requested_context(ModalityPerformedProcedureStep)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="TRABOULE")
        assert self.assoc.is_established

    async def create(self, uid: str, ds: Dataset) -> int:
        status, _ = await asyncio.to_thread(self.assoc.send_n_create, ds, ModalityPerformedProcedureStep, uid)
        return int(status.Status)

    async def set(self, uid: str, ds: Dataset) -> Dataset:
        status, _ = await asyncio.to_thread(self.assoc.send_n_set, ds, ModalityPerformedProcedureStep, uid)
        return status

    def close(self) -> None:
        self.assoc.release()


def in_progress(item: Dataset) -> Dataset:
    """An N-CREATE as a modality builds it from the worklist item it performs."""
    ref = Dataset()
    ref.StudyInstanceUID = item.StudyInstanceUID
    ref.AccessionNumber = item.AccessionNumber
    ref.RequestedProcedureID = item.RequestedProcedureID
    ref.ScheduledProcedureStepID = item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    ref.ReferencedStudySequence = []
    ref.RequestedProcedureDescription = ""
    ref.ScheduledProcedureStepDescription = ""
    ref.ScheduledProtocolCodeSequence = []
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = [ref]
    ds.PatientName = item.PatientName
    ds.PatientID = item.PatientID
    ds.IssuerOfPatientID = item.get("IssuerOfPatientID", "")
    ds.PatientBirthDate = item.get("PatientBirthDate", "")
    ds.PatientSex = item.get("PatientSex", "")
    ds.PerformedProcedureStepID = "PPS0001"
    ds.PerformedStationAETitle = "CT01"
    ds.PerformedProcedureStepStartDate = "20261125"
    ds.PerformedProcedureStepStartTime = "093512"
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "Scanner TAP"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def completed() -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.PerformingPhysicianName = ""
    series.ProtocolName = "TAP"
    series.OperatorsName = ""
    series.SeriesDescription = "TAP"
    series.RetrieveAETitle = ""
    series.ReferencedImageSequence = []
    series.ReferencedNonImageCompositeSOPInstanceSequence = []
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedProcedureStepEndDate = "20261125"
    ds.PerformedProcedureStepEndTime = "094801"
    ds.PerformedSeriesSequence = [series]
    return ds


async def scheduled(engine: Engine) -> tuple[str, Dataset]:
    await send(engine.runtime, fixture("orm_o01_nw_latin1.hl7"))
    await until(lambda: store(engine.runtime).count() == 1)
    ((key, item),) = list(store(engine.runtime).all())
    return key, item


def sps_status(runtime: Runtime, key: str) -> str:
    ds = store(runtime).get(key)
    return "" if ds is None else str(ds.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus)


def status_of(msg: hl7.Message) -> dict[str, Any]:
    orc, obr = msg.segment("ORC"), msg.segment("OBR")
    assert orc is not None and obr is not None
    return {
        "type": msg.message_type,
        "orc1": orc.field(1),
        "placer": orc.field(2),
        "filler": orc.field(3),
        "orc5": orc.field(5),
        "accession": obr.field(18),
        "sps": obr.field(20),
    }


async def test_mpps_start_and_complete_reach_worklist_and_ris(engine: Engine) -> None:
    runtime, ris = engine.runtime, engine.ris
    key, item = await scheduled(engine)
    uid = generate_uid()
    modality = Modality(engine.mpps_port)
    try:
        assert await modality.create(uid, in_progress(item)) == 0x0000
        await until(lambda: len(ris.accepted()) == 1)
        (ip,) = ris.accepted()
        assert status_of(ip) == {
            "type": "ORM^O01",
            "orc1": "SC",
            "placer": "PLC0001^RIS",
            "filler": "FIL0001^RIS",
            "orc5": "IP",
            "accession": "ACC0001",
            "sps": "SPS0001",
        }
        assert ip.segment("PID").field(3).startswith("IPP0001^^^CHU-LYON")  # type: ignore[union-attr]
        assert ip.segment("ZDS").field(1).split("^")[0] == item.StudyInstanceUID  # type: ignore[union-attr]
        await until(lambda: sps_status(runtime, key) == "STARTED")

        status = await modality.set(uid, completed())
        assert status.Status == 0x0000
        await until(lambda: len(ris.accepted()) == 2)
        assert status_of(ris.accepted()[1])["orc5"] == "CM"
        await until(lambda: store(runtime).count() == 0)

        # A completed step may no longer be updated (PS3.4 F.7.2.2: 0110H, Error ID A710H).
        late = Dataset()
        late.PerformedProcedureStepStatus = "DISCONTINUED"
        refused = await modality.set(uid, late)
        assert refused.Status == 0x0110
        assert refused.ErrorID == 0xA710
        # N-SET of an instance nobody created.
        assert (await modality.set(generate_uid(), late)).Status == 0x0112
    finally:
        modality.close()
    await asyncio.sleep(0.3)
    assert len(ris.received) == 2  # nothing sent for the refused requests
    assert runtime.journal is not None
    entries = [e for e in runtime.journal.recent(50) if e.channel == "mpps"]
    assert sorted((e.message_type, e.status) for e in entries) == [
        ("N-CREATE", "accepted"),
        ("N-SET", "accepted"),
        ("N-SET", "rejected"),
        ("N-SET", "rejected"),
    ]
    assert all(e.raw for e in entries)


async def test_ris_error_is_retried_and_duplicate_create_refused(engine: Engine) -> None:
    runtime, ris = engine.runtime, engine.ris
    ris.script = ["AE"]
    _, item = await scheduled(engine)
    uid = generate_uid()
    modality = Modality(engine.mpps_port)
    try:
        assert await modality.create(uid, in_progress(item)) == 0x0000
        assert await modality.create(uid, in_progress(item)) == 0x0111
    finally:
        modality.close()
    await until(lambda: len(ris.accepted()) == 1)
    await asyncio.sleep(0.5)
    assert [code for code, _ in ris.received] == ["AE", "AA"]
    assert status_of(ris.received[0][1]) == status_of(ris.received[1][1])
    assert status_of(ris.accepted()[0])["orc5"] == "IP"
    assert runtime.journal is not None
    entries = [e for e in runtime.journal.recent(50) if e.channel == "mpps"]
    assert sorted(e.status for e in entries) == ["accepted", "rejected"]


async def test_started_step_leaves_the_worklist_when_not_offered(engine: Engine) -> None:
    engine.runtime.channel("worklist").offer_started = False  # type: ignore[attr-defined]
    _, item = await scheduled(engine)
    modality = Modality(engine.mpps_port)
    try:
        assert await modality.create(generate_uid(), in_progress(item)) == 0x0000
    finally:
        modality.close()
    await until(lambda: store(engine.runtime).count() == 0)
    await until(lambda: len(engine.ris.accepted()) == 1)


async def test_omi_status_message(engine: Engine) -> None:
    channel: Any = engine.runtime.channel("ris-status")
    from traboule.model import PerformedStep

    channel.message = "OMI^O23"
    step = PerformedStep(
        sop_instance_uid="1.2.3",
        status="DISCONTINUED",
        study_instance_uid="1.2.3.4",
        accession_number="ACC|9",
        requested_procedure_id="RP9",
        scheduled_step_id="SPS9",
        placer_order_number="PLC9",
        modality="MR",
    )
    msg = hl7.parse(channel.build(step, "C1", "20261125100000"))
    assert msg.message_type == "OMI^O23"
    assert msg.segment("ORC").field(5) == "DC"  # type: ignore[union-attr]
    ipc = msg.segment("IPC")
    assert ipc is not None and [ipc.field(i) for i in range(1, 6)] == ["ACC\\F\\9", "RP9", "1.2.3.4", "SPS9", "MR"]


async def test_health_names_the_ris_while_it_cannot_be_reached(engine: Engine) -> None:
    runtime, ris = engine.runtime, engine.ris
    _, item = await scheduled(engine)
    modality = Modality(engine.mpps_port)
    try:
        assert await modality.create(generate_uid(), in_progress(item)) == 0x0000
        await until(lambda: len(ris.accepted()) == 1)
        # The RIS has the message before the sender reads its ACK and says so in its health: wait for that too.
        await until(lambda: runtime.health()["channels"]["ris-status"]["state"] == "ok")
        await ris.listener.stop()  # the RIS goes away
        assert await modality.create(generate_uid(), in_progress(item)) == 0x0000
        await until(lambda: runtime.health()["channels"]["ris-status"]["state"] == "down")
    finally:
        modality.close()
    health = runtime.health()
    assert health["status"] == "degraded" and "ris-status" in health["problems"]
    (destination,) = health["channels"]["ris-status"]["destinations"]
    assert destination["failures"] >= 1 and destination["last_error"] == "NotAccepted"


async def test_mpps_scp_takes_its_limits_from_its_entry_and_drops_silent_connections(tmp_path: Path) -> None:
    entry = {"adapter": "mpps-scp", "port": free_port(), "max_associations_per_peer": 3, "acse_timeout": 1}
    channel = MPPSChannel({"name": "mpps", "destinations": [entry]}, SimpleNamespace(data_dir=tmp_path))
    [scp] = channel.scps
    assert scp.limits == SCPLimits(max_associations_per_peer=3, acse_timeout=1.0)
    await channel.start()
    try:
        closed_in, echoes = await asyncio.to_thread(silent_then_echo, scp.port)
        assert closed_in < 3  # a connection that never sends its A-ASSOCIATE-RQ: ARTIM = acse_timeout
        assert echoes == [True, True, True, False]  # three associations from this host, not a fourth
    finally:
        await channel.stop()


def silent_then_echo(port: int) -> tuple[float, list[bool]]:
    with socket.create_connection(("127.0.0.1", port)) as silent:
        started = time.perf_counter()
        silent.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""
        closed_in = time.perf_counter() - started
    ae = AE(ae_title="CT01")
    ae.add_requested_context(Verification)
    assocs = [ae.associate("127.0.0.1", port, ae_title="TRABOULE") for _ in range(4)]
    echoes = [assoc.is_established and assoc.send_c_echo().Status == 0x0000 for assoc in assocs]
    for assoc in assocs:
        if assoc.is_established:
            assoc.release()
    return closed_in, echoes


async def test_unscheduled_step_is_journaled_listed_and_taken_over_by_the_order(tmp_path: Path) -> None:
    """IHE unscheduled case: an MPPS whose Scheduled Step Attributes name no order (the study UID only) is accepted
    and journaled as unscheduled; FHIR gets a ServiceRequest tagged unscheduled (listed by ``_tag`` and counted in
    /channels) that the RIS's order for that study later replaces: the ImagingStudy is then based on the order, and
    the step's completion completes it."""
    from fhir.resources.R4B.imagingstudy import ImagingStudy
    from fhir.resources.R4B.servicerequest import ServiceRequest

    from traboule.app.http import create_app, serve
    from traboule.channels.mpps import UNSCHEDULED

    cfg = engine_config(tmp_path)
    mpps_port = free_port()
    cfg.channels.append({"name": "mpps", "kind": "mpps", "destinations": [{"adapter": "mpps-scp", "port": mpps_port}]})
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    fhir: Any = runtime.channel("fhir")
    tag = "urn:traboule:tags|unscheduled"
    study_uid = "1.2.250.1.999.1.2.20261125.1"  # the one the order will name (ZDS-1)
    emergency = Dataset()  # what the modality knows without a worklist item: the patient, a study UID it made
    emergency.update({"StudyInstanceUID": study_uid, "AccessionNumber": "", "RequestedProcedureID": ""})
    emergency.ScheduledProcedureStepSequence = [Dataset()]
    emergency.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID = ""
    emergency.update({"PatientName": "DUPONT^Helene", "PatientID": "IPP0001", "IssuerOfPatientID": "CHU-LYON"})
    step = in_progress(emergency)
    uid = generate_uid()
    modality = Modality(mpps_port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def unscheduled() -> list[dict[str, Any]]:
                bundle = (await client.get("/fhir/ServiceRequest", params={"_tag": tag})).json()
                return [e["resource"] for e in bundle.get("entry", [])]

            async def listed() -> int:
                channels = (await client.get("/channels")).json()
                return next(c["unscheduled"] for c in channels if c["name"] == "fhir")

            assert await modality.create(uid, step) == 0x0000
            await until(lambda: fhir.store.count("ImagingStudy") == 1)
            assert runtime.journal is not None
            (entry,) = [e for e in runtime.journal.recent(10) if e.channel == "mpps"]
            assert (entry.status, entry.warnings) == ("accepted", UNSCHEDULED)
            (request,) = await unscheduled()
            ServiceRequest.model_validate(request)
            assert (request["intent"], request["status"]) == ("filler-order", "active")
            assert request["identifier"] == [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]
            (imaging,) = fhir.store.search("ImagingStudy", {})[1]
            assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]
            assert await listed() == 1

            await send(runtime, fixture("orm_o01_nw_latin1.hl7"))  # the RIS's order for that study, same patient
            await until(lambda: fhir.store.count("ServiceRequest") == 2)
            (ordered,) = fhir.store.search("ServiceRequest", {"identifier": "ACC0001"})[1]
            ServiceRequest.model_validate(ordered)
            assert ordered["replaces"] == [{"reference": f"ServiceRequest/{request['id']}"}]
            assert ordered["subject"] == request["subject"] and fhir.store.count("Patient") == 1
            (replaced,) = await unscheduled()  # still listed, as revoked and reconciled
            assert replaced["status"] == "revoked"
            assert [t["code"] for t in replaced["meta"]["tag"]] == ["unscheduled", "reconciled"]
            imaging = fhir.store.search("ImagingStudy", {})[1][0]
            ImagingStudy.model_validate(imaging)
            assert imaging["basedOn"] == [{"reference": f"ServiceRequest/{ordered['id']}"}]
            assert await listed() == 0

            assert (await modality.set(uid, completed())).Status == 0x0000
            await until(lambda: fhir.store.get("ServiceRequest", ordered["id"])["status"] == "completed")
            assert fhir.store.get("ServiceRequest", request["id"])["status"] == "revoked"
    finally:
        modality.close()
        server.should_exit = True
        await server.task
        await runtime.stop()
