"""`PatientIdentities.admit`: the usual message's identity checks with one query. For random sequences of messages
(orders, patient updates, merges, identity sources' updates over a few IPPs, INS and order keys; some left in flight,
checked and not yet recorded; INS forgotten meanwhile), a registry that admits then falls back on the four calls
decides exactly as one that always makes them: the same answers (refusal text and location, warnings), the same
patients, the same messages in flight and the same recorded state. Real SQLite files."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from traboule import model
from traboule.errors import MappingFailure
from traboule.stores.patient_identity import Pair, PatientIdentities, _dump


def nir(body: str) -> str:
    """An INS of 13 digits with its key."""
    return f"{body}{97 - int(body) % 97:02d}"


INS_KINDS = ("1.2.250.1.213.1.4.10", "1.2.250.1.213.1.4.8")  # test NIR, NIR
INS_VALUES = (nir("2790351215189"), nir("1850575123456"), nir("2010175000123"), "279035121519000")  # last: bad key
IPPS = ("IPP1", "IPP2", "IPP3")
AUTHORITIES = (("CHU-LYON", "1.2.250.1.999.1.1"), ("CHU-LYON", ""), ("", ""), ("HOP", "1.2.250.1.999.9"))
ACCESSIONS, PLACERS, STUDIES = ("ACC1", "ACC2", "ACC3", None), ("PLC1", None), ("1.2.3.1", "1.2.3.2", None)


def ipp_of(spec: tuple[int, int]) -> model.Identifier:
    issuer, oid = AUTHORITIES[spec[1]]
    return model.Identifier(IPPS[spec[0]], issuer, oid, "PI")


def patient_of(spec: tuple[tuple[int, int], list[tuple[int, int]]]) -> model.Patient:
    ins = [model.Identifier(INS_VALUES[v], "ASIP-SANTE-INS-NIR", INS_KINDS[k], "INS") for v, k in spec[1]]
    return model.Patient(ids=[ipp_of(spec[0]), *ins])


def build(message: list[tuple[Any, ...]]) -> list[Any]:
    """The payloads of a message (new objects each time: the checks may change them)."""
    out: list[Any] = []
    for kind, *args in message:
        if kind == "order":
            patient, acc, placer, study = args
            out.append(
                model.ImagingOrder(
                    patient=patient_of(patient),
                    accession_number=model.Identifier(acc or ""),
                    placer_order_number=model.Identifier(placer or "", "RIS"),
                    study_instance_uid=study or "",
                )
            )
        elif kind == "update":
            patient, authoritative = args
            out.append(model.PatientUpdate(patient=patient_of(patient), authoritative=authoritative))
        else:
            survivor, merged = args
            out.append(model.PatientUpdate("merge", patient_of(survivor), [ipp_of(merged)]))
    return out


ipp_spec = st.tuples(st.sampled_from([0, 0, 1, 2]), st.sampled_from([0, 0, 0, 1, 2, 3]))  # (collisions wanted)
ins_spec = st.tuples(st.sampled_from([0, 0, 1, 2, 3]), st.sampled_from([0, 0, 0, 1]))
patient_spec = st.tuples(ipp_spec, st.lists(ins_spec, max_size=2))
order_spec = st.tuples(
    st.just("order"),
    patient_spec,
    st.sampled_from(ACCESSIONS[:1] * 2 + ACCESSIONS),  # (keys shared by several orders: often)
    st.sampled_from(PLACERS[-1:] * 2 + PLACERS),
    st.sampled_from(STUDIES[-1:] * 3 + STUDIES),
)
payload_spec = st.one_of(
    order_spec,
    order_spec,
    order_spec,
    st.tuples(st.just("update"), patient_spec, st.booleans()),
    st.tuples(st.just("merge"), patient_spec, ipp_spec),
)
message_spec = st.lists(payload_spec, min_size=1, max_size=2)
message_op = st.tuples(st.just("message"), message_spec, st.sampled_from(["flight", "record", "flight", "release"]))
operation = st.one_of(
    message_op,
    message_op,
    message_op,
    message_op,
    st.tuples(st.just("settle"), st.integers(0, 7), st.sampled_from(["record", "release", "record"])),
    st.tuples(st.just("forget"), st.sampled_from(IPPS)),
    st.tuples(st.just("flush")),
)


class Side:
    """A registry and the messages it let through that are not recorded yet (as the orders channel holds them)."""

    def __init__(self, path: Path, *, admits: bool) -> None:
        self.registry = PatientIdentities(path)
        self.admits = admits
        self.admitted = 0
        self.flight: list[list[Any]] = []
        self.journal_id = 0

    def checks(self, payloads: list[Any]) -> tuple[Any, ...]:
        """The orders channel's identity checks of a message: its outcome."""
        reserved: list[Any] = []
        try:
            if self.admits and self.registry.admit(payloads):
                self.admitted += 1
                return ("accepted", [])
            notes = self.registry.resolve_merged(payloads)
            notes += self.registry.check(payloads)
            reserved = payloads
            self.registry.check_report(payloads)
            self.registry.check_order(payloads)
            return ("accepted", notes)
        except MappingFailure as exc:
            self.registry.release(reserved)
            return ("refused", exc.reason, exc.location, exc.code)

    def settle(self, payloads: list[Any], how: str) -> None:
        if how == "record":
            self.journal_id += 1
            self.registry.record(payloads, channel="ris-orders", journal_id=self.journal_id)
            if any(isinstance(p, model.PatientUpdate) and p.action == "merge" for p in payloads):
                # Merges are applied latest first, by their time (milliseconds): two in one would be in any order.
                time.sleep(0.002)
        else:
            self.registry.release(payloads)

    def in_flight(self) -> tuple[Any, ...]:
        """What the registry holds for the messages in flight (their pairs, their keys), without the times."""
        r = self.registry
        return (
            sorted((ipp, sorted(map(repr, held))) for ipp, held in r._reserved.items()),
            sorted((repr(p), n) for p, n in r._holders.items()),
            sorted((key, sorted(_dump(ids) for ids, _ in by.values())) for key, by in r._keys_held.items()),
        )

    def state(self) -> tuple[Any, ...]:
        """What the registry recorded, as an operator sees it (`show`, the owners), without the times."""
        r = self.registry
        shown = []
        for ipp in IPPS:
            found = r.show(ipp)
            shown.append(
                {
                    part: sorted(sorted((k, v) for k, v in row.items() if k not in ("recorded", "at")) for row in rows)
                    for part, rows in found.items()
                }
            )
        keys = [
            (k, v) for k, values in (("accession", ACCESSIONS), ("placer", PLACERS), ("study", STUDIES)) for v in values
        ]
        owners = [(k, v, _dump(r.owner(k, v) or [])) for k, v in keys if v]
        return shown, owners, r.mark("ris-orders")


def patients(payloads: list[Any]) -> list[str]:
    return [_dump(p.patient.ids) for p in payloads]


@contextmanager
def two_sides() -> Iterator[tuple[Side, Side]]:
    where = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=where) as folder:
        sides = Side(Path(folder) / "admits.sqlite", admits=True), Side(Path(folder) / "checks.sqlite", admits=False)
        try:
            yield sides
        finally:
            for side in sides:
                side.registry.close()


def run(operations: list[tuple[Any, ...]]) -> int:
    """Play the operations on both registries, comparing at each step; returns how many messages were admitted."""
    with two_sides() as (admits, checks):
        both = (admits, checks)
        for op in operations:
            if op[0] == "message":
                _, message, fate = op
                sent = [build(message), build(message)]
                outcomes = [side.checks(payloads) for side, payloads in zip(both, sent, strict=True)]
                assert outcomes[0] == outcomes[1], (message, outcomes)
                assert patients(sent[0]) == patients(sent[1])  # a merged IPP's messages: the survivor's
                if outcomes[0][0] == "accepted":
                    for side, payloads in zip(both, sent, strict=True):
                        if fate == "flight":
                            side.flight.append(payloads)
                        else:
                            side.settle(payloads, fate)
            elif op[0] == "settle" and admits.flight:
                _, index, how = op
                for side in both:
                    side.settle(side.flight.pop(index % len(side.flight)), how)
            elif op[0] == "forget":
                assert admits.registry.forget(op[1]) == checks.registry.forget(op[1])
            elif op[0] == "flush":
                for side in both:
                    side.registry.flush()
            assert admits.in_flight() == checks.in_flight(), op
        assert admits.state() == checks.state()
        for side in both:  # what is left in flight is journaled in turn
            while side.flight:
                side.settle(side.flight.pop(0), "record")
        assert admits.in_flight() == checks.in_flight() == ([], [], [])
        assert admits.state() == checks.state()
        return admits.admitted


SAME = ((0, 0), [(0, 0)])  # IPP1 of CHU-LYON, its INS
SAME_ORDER = ("order", SAME, "ACC2", None, None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=12, max_size=40))
# An order in flight whose recorded INS is removed before its record: by the operator, by the identity system.
@example(
    [
        ("message", [SAME_ORDER], "record"),
        ("message", [SAME_ORDER], "flight"),
        ("forget", "IPP1"),
        ("settle", 0, "record"),
    ]
)
@example(
    [
        ("message", [SAME_ORDER], "record"),
        ("message", [SAME_ORDER], "flight"),
        ("message", [("update", ((0, 0), [(1, 0)]), True)], "record"),
        ("settle", 0, "record"),
    ]
)
@example(  # ... merged meanwhile
    [
        ("message", [SAME_ORDER], "record"),
        ("message", [SAME_ORDER], "flight"),
        ("message", [("merge", ((1, 0), []), (0, 0))], "record"),
        ("settle", 0, "record"),
        ("message", [SAME_ORDER], "record"),
    ]
)
def test_admitting_then_checking_decides_as_the_four_checks(operations: list[tuple[Any, ...]]) -> None:
    async def inside_a_loop() -> None:  # as the channel: the owners of order keys wait in memory to be written
        run(operations)

    asyncio.run(inside_a_loop())


def test_the_property_admits_the_usual_messages() -> None:
    """The usual sequence (a patient's orders, some in flight, one naming the keys of an earlier one, an INS forgotten
    meanwhile, a patient update): admitted, and the two registries still agree."""
    same = ((0, 0), [(0, 0)])

    def an_order(accession: str, placer: str | None = None, study: str | None = None) -> tuple[Any, ...]:
        return ("order", same, accession, placer, study)

    operations = [
        ("message", [an_order("ACC1", "PLC1", "1.2.3.1")], "record"),
        ("message", [an_order("ACC2")], "flight"),
        ("message", [an_order("ACC3")], "flight"),
        ("message", [an_order("ACC1", "PLC1", "1.2.3.1")], "record"),  # its keys: this patient's
        ("message", [an_order("ACC2")], "flight"),  # held by this patient's order in flight
        ("forget", "IPP1"),
        ("settle", 0, "record"),
        ("message", [("update", same, False)], "flight"),
        ("settle", 1, "record"),
    ]
    admitted = 0

    async def inside_a_loop() -> None:
        nonlocal admitted
        admitted = run(operations)

    asyncio.run(inside_a_loop())
    assert admitted == 6


# -- what the usual message costs --------------------------------------------------------------------------------

INS = nir("2790351215189")


def order(ipp: str, accession: str, *ins: str) -> model.ImagingOrder:
    ids = [model.Identifier(ipp, "CHU-LYON"), *(model.Identifier(v, "", INS_KINDS[0], "INS") for v in ins)]
    return model.ImagingOrder(patient=model.Patient(ids=ids), accession_number=model.Identifier(accession))


@contextmanager
def traced(registry: PatientIdentities) -> Iterator[list[str]]:
    """The statements the registry's connection runs meanwhile."""
    statements: list[str] = []
    registry._db.set_trace_callback(statements.append)
    try:
        yield statements
    finally:
        registry._db.set_trace_callback(None)


def test_the_usual_order_is_one_query_and_its_record_reads_no_pair_again(tmp_path: Path) -> None:
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    try:
        registry.record([order("IPP1", "ACC0", INS)])
        registry.survivor(model.Identifier("IPP1"))  # the merges read once
        second = order("IPP1", "ACC1", INS)
        with traced(registry) as statements:
            assert registry.admit([second])
        (query,) = [s for s in statements if not s.startswith("PRAGMA user_version")]  # (the merges' generation)
        assert "FROM ins" in query and "FROM owners" in query and "FROM actions" in query
        assert registry._reserved and registry._keys_held  # reserved and held as `check` and `check_order` do
        with traced(registry) as statements:
            registry.record([second])
        assert statements == ["SELECT max(rowid) FROM actions"]  # its pair recorded and not removed since: no more
        assert not registry._reserved and not registry._keys_held and not registry._admitted
        assert [i.value for i in registry.owner("accession", "ACC1") or []] == ["IPP1", INS]
    finally:
        registry.close()


def test_a_pair_removed_between_admit_and_record_is_recorded_again_as_the_checks_would(tmp_path: Path) -> None:
    """An operator forgets the INS (another process: the file's generation tells) while an admitted order is in
    flight: its record writes the pair again, as after the four calls."""
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    operator = PatientIdentities(tmp_path / "patients.sqlite")
    try:
        registry.record([order("IPP1", "ACC0", INS)])
        flying = order("IPP1", "ACC1", INS)
        assert registry.admit([flying])
        assert [p.ins for p in operator.forget("IPP1")] == [INS]
        registry.record([flying])
        assert [p.ins for p in registry.known(Pair("IPP1", "", "CHU-LYON", INS_KINDS[0], ""))] == [INS]
        # Released instead: nothing recorded, nothing held.
        operator.forget("IPP1")
        released = order("IPP1", "ACC2", INS)
        assert registry.admit([released])
        registry.release([released])
        assert registry.known(Pair("IPP1", "", "CHU-LYON", INS_KINDS[0], "")) == []
        assert not registry._reserved and not registry._keys_held and not registry._admitted
    finally:
        operator.close()
        registry.close()


def test_what_admit_cannot_settle_it_declines_changing_nothing(tmp_path: Path) -> None:
    """A merge, an identity source's update, a report, two orders, an order without keys, a merged IPP, another
    INS for a recorded IPP, another patient's key (recorded or in flight): declined, nothing reserved or held; the
    four calls then decide (and refuse what must be)."""
    registry = PatientIdentities(tmp_path / "patients.sqlite")
    try:
        registry.record([order("IPP1", "ACC1", INS)])
        registry.record(
            [model.PatientUpdate("merge", order("IPP1", "").patient, [model.Identifier("IPP9", "CHU-LYON")])]
        )
        in_flight = order("IPP5", "ACC5")
        assert registry.admit([in_flight])
        before = (
            dict(registry._reserved),
            dict(registry._holders),
            {k: dict(v) for k, v in registry._keys_held.items()},
        )
        other = nir("1850575123456")
        declined = [
            [model.PatientUpdate("merge", order("IPP2", "").patient, [model.Identifier("IPP3", "CHU-LYON")])],
            [model.PatientUpdate(patient=order("IPP1", "", INS).patient, authoritative=True)],
            [model.Report(patient=order("IPP1", "", INS).patient, accession_number=model.Identifier("ACC1"))],
            [order("IPP1", "ACC2", INS), order("IPP1", "ACC3", INS)],
            [order("IPP1", "", INS)],
            [order("IPP9", "ACC9")],  # merged into IPP1
            [order("IPP1", "ACC2", other)],
            [order("IPP2", "ACC1")],  # IPP1's accession
            [order("IPP2", "ACC5")],  # held by IPP5's order in flight
        ]
        for payloads in declined:
            assert not registry.admit(payloads), payloads
            assert (registry._reserved, registry._holders, registry._keys_held) == before
        for payloads, where in ((declined[6], "accepted with another"), (declined[7], "ACC1 belongs to patient IPP1")):
            assert registry.resolve_merged(payloads) == []
            with pytest.raises(MappingFailure, match=where) as refused:
                registry.check(payloads)
                registry.check_order(payloads)
            assert refused.value.location == "PID-3"
            registry.release(payloads)
        registry.release([in_flight])
        assert not registry._reserved and not registry._keys_held and not registry._admitted
    finally:
        registry.close()
