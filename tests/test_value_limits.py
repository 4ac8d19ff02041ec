"""Values longer than the worklist can carry: identifiers refused before the ACK, descriptive text cut and noted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_flow import ack_code, engine_config, fixture, send, store, until
from traboule.app.runtime import Runtime
from traboule.translate.hl7_mapping import HL7InboundMapping
from traboule.translate.mapping import MAPPINGS_DIR, MappingError


def order(accession: str = "ACC0001", patient_id: str = "IPP0001", description: str = "", control: str = "") -> bytes:
    """The Latin-1 ORM^O01 fixture with some of its values replaced."""
    data = fixture("orm_o01_nw_latin1.hl7")
    data = data.replace(b"|ACC0001|", f"|{accession}|".encode()).replace(b"IPP0001^", f"{patient_id}^".encode())
    if description:
        data = data.replace(b"^Scanner thoraco-abdomino-pelvien^L", f"^{description}^L".encode())
    if control:
        data = data.replace(b"|MSG0001|", f"|{control}|".encode())
    return data


@pytest.fixture
async def runtime(tmp_path: Path):  # type: ignore[no-untyped-def]
    rt = Runtime(engine_config(tmp_path))
    await rt.start()
    try:
        yield rt
    finally:
        await rt.stop()


async def test_accession_numbers_longer_than_sh_are_refused_not_cut(runtime: Runtime) -> None:
    """Cut to 16 characters, these two would both be ACC-2027-0000000: two exams on one accession number."""
    acks = await send(
        runtime,
        order("ACC-2027-0000000001", control="L1"),
        order("ACC-2027-0000000002", control="L2").replace(b"PLC0001", b"PLC0002"),
    )
    assert [ack_code(a) for a in acks] == ["AE", "AE"]
    msa = acks[0].segment("MSA")
    assert msa is not None and "OBR-18" in msa.field(3) and "16" in msa.field(3)
    assert runtime.journal is not None
    rejected = runtime.journal.recent(10, "rejected")
    assert len(rejected) == 2 and all("more than the 16" in e.error for e in rejected)
    await runtime.wait_idle()
    assert store(runtime).count() == 0


async def test_patient_id_longer_than_lo_is_refused(runtime: Runtime) -> None:
    (ack,) = await send(runtime, order(patient_id="P" * 74))
    assert ack_code(ack) == "AE"
    err = ack.segment("ERR")
    assert err is not None and "PID" in err.field(1) + err.field(2)
    msa = ack.segment("MSA")
    assert msa is not None and "74 characters" in msa.field(3) and "64" in msa.field(3)


async def test_identifiers_at_their_limit_are_accepted_whole(runtime: Runtime) -> None:
    (ack,) = await send(runtime, order("A" * 16, patient_id="P" * 64))
    assert ack_code(ack) == "AA"
    await until(lambda: store(runtime).count() == 1)
    (key,) = store(runtime).keys_with_prefix("")
    item = store(runtime).get(key)
    assert item.AccessionNumber == "A" * 16 and item.PatientID == "P" * 64


async def test_long_description_is_cut_with_a_note_in_the_journal(runtime: Runtime) -> None:
    description = "Scanner " + "tres " * 30 + "long"
    (ack,) = await send(runtime, order(description=description))
    assert ack_code(ack) == "AA"
    assert runtime.journal is not None
    (entry,) = runtime.journal.recent(1, "accepted")
    assert "OBR-44.2" in entry.warnings and "cut" in entry.warnings
    await until(lambda: store(runtime).count() == 1)
    (key,) = store(runtime).keys_with_prefix("")
    assert store(runtime).get(key).RequestedProcedureDescription == description[:64].rstrip()


def test_mapping_limits_are_checked_at_load(tmp_path: Path) -> None:
    text = (MAPPINGS_DIR / "hl7_inbound.yaml").read_text(encoding="utf-8")
    for bad, message in (
        ("max: 16}", "max must be"),
        ("max: 16, too_long: trim}", "too_long 'trim'"),
    ):
        path = tmp_path / "inbound.yaml"
        (tmp_path / "tables").mkdir(exist_ok=True)
        for table in (MAPPINGS_DIR / "tables").iterdir():
            (tmp_path / "tables" / table.name).write_bytes(table.read_bytes())
        broken = text.replace(
            "accession_number.value: {from: [IPC-1.1, OBR-18], max: 16}",
            "accession_number.value: {from: [IPC-1.1, OBR-18], " + bad.replace("max: 16}", "max: -1}")
            if message == "max must be"
            else "accession_number.value: {from: [IPC-1.1, OBR-18], " + bad,
            1,
        )
        path.write_text(broken, encoding="utf-8")
        with pytest.raises(MappingError, match=message):
            HL7InboundMapping(path)


async def test_an_order_with_a_wrong_ins_key_goes_on_without_the_ins(runtime: Runtime) -> None:
    """Reports with a wrong INS key are refused; an order must still be done, so its INS is left out (journaled),
    never propagated to the worklist (it was AA with the INS in OtherPatientIDsSequence)."""
    wrong = order().replace(b"279035121518989", b"279035121518900")
    (ack,) = await send(runtime, wrong)
    assert ack_code(ack) == "AA"
    assert runtime.journal is not None
    (entry,) = runtime.journal.recent(1, "accepted")
    assert "INS with a wrong check key was left out" in entry.warnings
    await until(lambda: store(runtime).count() == 1)
    (key,) = store(runtime).keys_with_prefix("")
    item = store(runtime).get(key)
    assert item.PatientID == "IPP0001"
    assert "279035121518900" not in str(item.get("OtherPatientIDsSequence", ""))


def test_a_valid_ins_is_kept_on_orders_and_adt() -> None:
    from traboule.formats import hl7

    mapping = HL7InboundMapping()
    for name in ("orm_o01_nw_latin1.hl7", "adt_a08_update.hl7"):
        text = fixture(name).decode("latin-1")
        (payload,) = mapping.map(hl7.parse(text))
        ins = payload.patient.ins
        assert ins is None or ins.value in text, name
    (order_payload,) = mapping.map(hl7.parse(fixture("orm_o01_nw_latin1.hl7").decode("latin-1")))
    assert order_payload.patient.ins is not None and order_payload.patient.ins.value == "279035121518989"
