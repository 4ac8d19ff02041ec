"""The FHIR store on PostgreSQL beyond the contract (tests/test_store_contracts.py): two nodes on one database, the
same answers as SQLite for the same resources (the store and the ``/fhir`` API), rollback, NUL in text, reindex."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import psycopg
import pytest
from starlette.applications import Starlette

from tests.test_fhir import order_of
from traboule.app.fhir_api import routes
from traboule.errors import SearchError
from traboule.formats.fhir_codes import IS_DELETED, STUDY_UID_TYPE
from traboule.stores.fhir_store import MAX_OFFSET, SQLiteFHIRStore
from traboule.stores.postgres.fhir_store import PostgresFHIRStore
from traboule.translate.fhir_mapping import FHIRMapping

pytestmark = pytest.mark.timeout(120)

PARIS = ZoneInfo("Europe/Paris")
TAGS = "urn:traboule:tags"
ACC = "urn:oid:1.2.250.1.999.1.2"


def _patient(rid: str, *idents: tuple[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": rid,
        "identifier": [{"system": s, "value": v} if s else {"value": v} for s, v in idents],
    }


def _request(rid: str, subject: str, accession: str, status: str, *tags: str) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": status,
        "subject": {"reference": subject},
        "identifier": [{"system": ACC, "value": accession}],
    }
    if tags:
        resource["meta"] = {"tag": [{"system": TAGS, "code": t} for t in tags]}
    return resource


def _document(rid: str, subject: str, n: int, **extra: Any) -> dict[str, Any]:
    """A DocumentReference with every IHE MHD ITI-67 parameter (PDSm)."""
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:1.2.3.{n}"},
        "type": {"coding": [{"system": "http://loinc.org", "code": "18748-4" if n % 2 else "11528-7"}]},
        "category": [{"coding": [{"system": "urn:oid:1.3.6.1.4.1.19376.1.2.6.1", "code": "REPORTS"}]}],
        "subject": {"reference": subject},
        "date": f"2026-11-{20 + n:02d}T23:30:00+01:00",
        "contained": [
            {"resourceType": "Practitioner", "id": "a1", "name": [{"family": "Dupont", "given": ["Élodie"]}]},
            {"resourceType": "PractitionerRole", "id": "r1", "practitioner": {"reference": "#a1"}},
        ],
        "author": [{"reference": "#r1" if n % 2 else "#a1"}],
        "securityLabel": [{"coding": [{"system": "urn:oid:2.16.840.1.113883.5.25", "code": "N"}]}],
        "content": [
            {
                "attachment": {"url": f"Binary/b{n}", "creation": f"2026-11-{20 + n:02d}T10:00:00Z"},
                "format": {
                    "system": "urn:oid:1.3.6.1.4.1.19376.1.2.3",
                    "code": "urn:ihe:rad:CDA:ImagingReportStructure",
                },
            }
        ],
        "context": {
            "period": {"start": f"2026-11-{20 + n:02d}T09:00:00+01:00", "end": f"2026-11-{20 + n:02d}T09:30:00+01:00"},
            "facilityType": {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.9", "code": "SA01"}]},
            "practiceSetting": {"coding": [{"system": "urn:oid:1.2.250.1.213.1.1.4.6", "code": "ORG-RAD"}]},
            "event": [{"coding": [{"system": "urn:oid:1.2.250.1.213.2.5", "code": "CT" if n % 2 else "MR"}]}],
            "related": [
                {"identifier": {"type": {"coding": [{"code": STUDY_UID_TYPE}]}, "value": f"1.2.826.0.1.{n}"}},
                {"identifier": {"system": ACC, "value": f"ACC{n}"}},
                {"reference": f"ServiceRequest/sr{n}"},
            ],
        },
        **extra,
    }


def resources() -> list[tuple[dict[str, Any], int]]:
    """Every kind of resource and search token, with updates (new versions), redeliveries and late events."""
    mapping = FHIRMapping()
    order = order_of("orm_o01_nw_latin1.hl7")
    patient = mapping.patient(order.patient)
    out: list[tuple[dict[str, Any], int]] = [
        (patient, 1),
        (mapping.service_request(order, f"Patient/{patient['id']}"), 1),
        (_patient("p1", ("urn:a", "V1"), ("urn:oid:1.2.250.1.213.1.4.8", "279035121518989")), 2),
        (_patient("p2", ("urn:b", "V1")), 3),
        (_patient("p3", ("", "V1"), ("urn:a", "with\x00nul"), ("urn:a", "with\x01soh")), 4),
        (_patient("p4", ("urn:a", "V2")), 5),
    ]
    for i in range(1, 8):
        subject = f"Patient/p{i % 3 + 1}"
        tags = ("unscheduled",) if i % 3 == 0 else ()
        out.append((_request(f"sr{i}", subject, f"ACC{i}", "active" if i % 2 else "completed", *tags), 10 + i))
    out.append((_request("sr2", "Patient/p3", "ACC2", "revoked"), 30))  # a new version
    out.append((_request("sr2", "Patient/p3", "ACC2", "active"), 29))  # a late, older event: ignored
    out.append((_request("sr3", "Patient/p1", "ACC3", "active", "unscheduled", "reconciled"), 31))
    for i in range(1, 4):
        study = {
            "resourceType": "ImagingStudy",
            "id": f"is{i}",
            "status": "available",
            "subject": {"reference": f"Patient/p{i}"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.826.0.1.{i}"}],
            "basedOn": [{"reference": f"ServiceRequest/sr{i}"}],
        }
        out.append((study, 40 + i))
    for n in range(1, 7):
        out.append((_document(f"d{n}", f"Patient/p{n % 2 + 1}", n), 50 + n))
    deleted = _document("d6", "Patient/p1", 6, extension=[{"url": IS_DELETED, "valueBoolean": True}])
    out.append((deleted, 60))
    out.append((_document("d2", "Patient/p1", 2, status="superseded"), 61))
    for i, status in ((1, "final"), (2, "entered-in-error"), (3, "final")):
        report = {
            "resourceType": "DiagnosticReport",
            "id": f"dr{i}",
            "status": status,
            "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
            "subject": {"reference": f"Patient/p{i}"},
            "identifier": [{"system": ACC, "value": f"ACC{i}"}],
            "basedOn": [{"reference": f"ServiceRequest/sr{i}"}],
        }
        out.append((report, 70 + i))
    return out


QUERIES: list[tuple[str, dict[str, str | list[str]], int, int]] = [
    ("Patient", {}, 20, 0),
    ("Patient", {"identifier": "V1"}, 20, 0),
    ("Patient", {"identifier": "urn:a|V1"}, 20, 0),
    ("Patient", {"identifier": "|V1"}, 20, 0),
    ("Patient", {"identifier": "urn:a|"}, 20, 0),
    ("Patient", {"identifier": "urn:b|V1,urn:a|V2"}, 20, 0),
    ("Patient", {"identifier": "urn:a|with\x00nul"}, 20, 0),
    ("Patient", {"identifier": "with\x01soh"}, 20, 0),
    ("Patient", {"identifier": "with\x01\x01"}, 20, 0),  # the escape of a NUL, searched for: no match
    ("Patient", {"identifier": "V1"}, 1, 1),
    ("Patient", {"identifier": "V1"}, 2, 2),
    ("Patient", {"identifier": "V1"}, 0, 0),
    ("Patient", {"identifier": "V1"}, 5, MAX_OFFSET),
    ("Patient", {"_id": "p2,p4"}, 20, 0),
    ("ServiceRequest", {}, 3, 0),
    ("ServiceRequest", {}, 3, 3),
    ("ServiceRequest", {}, 3, 6),
    ("ServiceRequest", {"status": "active"}, 20, 0),
    ("ServiceRequest", {"status": "revoked,completed"}, 20, 0),
    ("ServiceRequest", {"subject": "Patient/p1"}, 20, 0),
    ("ServiceRequest", {"patient": "p3", "status": "revoked"}, 20, 0),
    ("ServiceRequest", {"patient.identifier": "urn:oid:1.2.250.1.213.1.4.8|279035121518989"}, 20, 0),
    ("ServiceRequest", {"patient.identifier": "V1"}, 20, 0),
    ("ServiceRequest", {"_tag": f"{TAGS}|unscheduled"}, 20, 0),
    ("ServiceRequest", {"_tag": [f"{TAGS}|unscheduled", f"{TAGS}|reconciled"]}, 20, 0),
    ("ServiceRequest", {"identifier": f"{ACC}|ACC3"}, 20, 0),
    ("ServiceRequest", {"identifier": "ACC0001"}, 20, 0),
    ("ImagingStudy", {"basedon": "ServiceRequest/sr2"}, 20, 0),
    ("ImagingStudy", {"identifier": "urn:dicom:uid|urn:oid:1.2.826.0.1.3"}, 20, 0),
    ("ImagingStudy", {"patient": "p1"}, 20, 0),
    ("DocumentReference", {}, 20, 0),
    ("DocumentReference", {}, 2, 4),
    ("DocumentReference", {"status": "current"}, 20, 0),
    ("DocumentReference", {"patient": "Patient/p2", "status": "current,superseded"}, 20, 0),
    ("DocumentReference", {"type": "http://loinc.org|18748-4"}, 20, 0),
    ("DocumentReference", {"category": "REPORTS"}, 20, 0),
    ("DocumentReference", {"date": "2026-11-22"}, 20, 0),  # a Paris day: 23:30+01:00 is that day
    ("DocumentReference", {"date": ["ge2026-11-22", "lt2026-11-25T00:00:00Z"]}, 20, 0),
    ("DocumentReference", {"date": "gt2026-11-23"}, 20, 0),
    ("DocumentReference", {"creation": "le2026-11-23T10:00"}, 20, 0),
    ("DocumentReference", {"period": "2026-11-23"}, 20, 0),
    ("DocumentReference", {"period": "ge2026-11-24"}, 20, 0),
    ("DocumentReference", {"period": "lt2026-11-23T09:15:00+01:00"}, 20, 0),
    ("DocumentReference", {"author.given": "elo"}, 20, 0),
    ("DocumentReference", {"author.family": "DUPONT"}, 20, 0),
    ("DocumentReference", {"author.family": "Dupond"}, 20, 0),
    ("DocumentReference", {"related": "1.2.826.0.1.3"}, 20, 0),
    ("DocumentReference", {"related": "urn:dicom:uid|urn:oid:1.2.826.0.1.4"}, 20, 0),
    ("DocumentReference", {"related": f"{ACC}|ACC5"}, 20, 0),
    ("DocumentReference", {"related": "ServiceRequest/sr1"}, 20, 0),
    ("DocumentReference", {"related": "http://example.org/fhir/ServiceRequest/sr3"}, 20, 0),
    ("DocumentReference", {"setting": "ORG-RAD", "facility": "SA01", "event": "MR"}, 20, 0),
    ("DocumentReference", {"security-label": "N", "format": "urn:ihe:rad:CDA:ImagingReportStructure"}, 20, 0),
    ("DocumentReference", {"identifier": "urn:oid:1.2.3.6"}, 20, 0),  # deleted: found by no search
    ("DiagnosticReport", {}, 20, 0),
    ("DiagnosticReport", {"code": "18748-4", "basedon": "sr1,sr2,sr3"}, 20, 0),
    # refused alike
    ("Patient", {"no-such-parameter": "x"}, 20, 0),
    ("Observation", {}, 20, 0),
    ("Patient", {}, 20, MAX_OFFSET + 1),
    ("DocumentReference", {"date": "sa2026"}, 20, 0),
    ("DocumentReference", {"date": "2026-13"}, 20, 0),
    ("DocumentReference", {"author.given": " "}, 20, 0),
    ("ServiceRequest", {"subject": "Group/1"}, 20, 0),
    ("Patient", {"identifier": ",".join(["x"] * 101)}, 20, 0),
]


def _answer(store: Any, rtype: str, params: dict[str, Any], count: int, offset: int) -> Any:
    try:
        total, found = store.search(rtype, params, count, offset)
    except SearchError as exc:
        return ("refused", str(exc))
    return total, [_without_time(r) for r in found]


def _without_time(resource: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in resource.get("meta", {}).items() if k != "lastUpdated"}
    return {**resource, "meta": meta}


def _load(store: Any) -> None:
    for resource, seq in resources():
        store.upsert(resource, seq)


@pytest.fixture
def both(tmp_path: Path, pg_url: str) -> Any:
    sqlite, pg = SQLiteFHIRStore(str(tmp_path / "fhir.sqlite"), PARIS), PostgresFHIRStore(pg_url, PARIS)
    try:
        _load(sqlite)
        _load(pg)
        yield sqlite, pg
    finally:
        sqlite.close()
        pg.close()


def test_searches_answer_as_on_sqlite(both: tuple[SQLiteFHIRStore, PostgresFHIRStore]) -> None:
    sqlite, pg = both
    found_something = 0
    for rtype, params, count, offset in QUERIES:
        expected = _answer(sqlite, rtype, params, count, offset)
        assert _answer(pg, rtype, params, count, offset) == expected, (rtype, params, count, offset)
        found_something += expected[0] != "refused" and bool(expected[1])
    assert found_something >= 40  # the queries are not all empty


def test_the_other_reads_answer_as_on_sqlite(both: tuple[SQLiteFHIRStore, PostgresFHIRStore]) -> None:
    sqlite, pg = both
    unscheduled, reconciled = {"system": TAGS, "code": "unscheduled"}, {"system": TAGS, "code": "reconciled"}
    for store in (sqlite, pg):
        store.set_remote([("Patient", "p1", 1, "Patient/srv\x00-1"), ("ServiceRequest", "sr2", 1, "ServiceRequest/9")])
    for name, call in (
        ("holders", lambda s: sorted(s.holders("Patient", "V1"))),
        ("holders nul", lambda s: s.holders("Patient", "with\x00nul")),
        ("by_subject", lambda s: [r["id"] for r in s.by_subject("DocumentReference", "Patient/p1")]),
        ("by_subject live", lambda s: [r["id"] for r in s.by_subject("DocumentReference", "Patient/p1", False)]),
        ("count_tagged", lambda s: s.count_tagged("ServiceRequest", unscheduled)),
        ("count_tagged without", lambda s: s.count_tagged("ServiceRequest", unscheduled, reconciled)),
        ("count", lambda s: (s.count(), s.count("DocumentReference"), s.count("Binary"))),
        ("seq_of", lambda s: [s.seq_of("ServiceRequest", f"sr{i}") for i in range(0, 9)]),
        (
            "versions",
            lambda s: [(s.get("ServiceRequest", f"sr{i}") or {}).get("meta", {}).get("versionId") for i in range(9)],
        ),
        ("withdrawn", lambda s: [s.withdrawn_binary(f"b{n}") for n in range(8)]),
        ("remote", lambda s: [s.get_with_remote("Patient", p)[1] for p in ("p1", "p2", "nobody")]),
        ("unpushed", lambda s: s.unpushed()),
        ("forget_remote", lambda s: s.forget_remote()),
        ("after forget", lambda s: (s.unpushed(), s.get_with_remote("Patient", "p1")[1])),
    ):
        assert call(pg) == call(sqlite), name
    assert pg.get_with_remote("Patient", "p1") == (pg.get("Patient", "p1"), None)
    assert sqlite.withdrawn_binary("b6") and pg.count_tagged("ServiceRequest", unscheduled, reconciled) == 1


async def test_the_fhir_api_answers_as_on_sqlite(both: tuple[SQLiteFHIRStore, PostgresFHIRStore]) -> None:
    answers = []
    for store in both:
        transport = httpx.ASGITransport(app=Starlette(routes=routes(store, "http://fhir.example")))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            got = []
            for path in (
                "/fhir/Patient?identifier=V1&_count=2",
                "/fhir/Patient?identifier=V1&_count=2&_offset=2",
                "/fhir/ServiceRequest?patient=p1&status=active",
                "/fhir/DocumentReference?patient=p2&status=current,superseded&date=ge2026-11-22",
                "/fhir/DocumentReference?related=ServiceRequest/sr1&_format=xml",
                "/fhir/DiagnosticReport?basedon=sr2",
                "/fhir/ServiceRequest/sr2",
                "/fhir/DocumentReference/d6",
                "/fhir/Patient?date=2026",
            ):
                response = await client.get(path, headers={"Prefer": "handling=strict"})
                got.append((path, response.status_code, _stable(response)))
            posted = await client.post("/fhir/Patient/_search", data={"identifier": "urn:a|"})
            got.append(("post", posted.status_code, _stable(posted)))
        answers.append(got)
    sqlite, pg = answers
    assert pg == sqlite
    assert [status for _, status, _ in pg] == [200, 200, 200, 200, 200, 200, 200, 410, 400, 200]
    assert pg[0][2]["total"] == 3 and len(pg[0][2]["entry"]) == 2 and pg[3][2]["total"] >= 1


def _stable(response: Any) -> Any:
    """The answer without what differs between two stores: times (``lastUpdated``) and a Bundle's random id."""
    if "json" not in response.headers.get("content-type", ""):
        return response.text.count("<entry>"), len(response.text) > 0
    return _strip(response.json())


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "lastUpdated" and not (k == "id" and "type" in value)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def test_two_nodes_upserting_one_resource_at_once_end_with_the_highest_seq(pg_url: str) -> None:
    """Each round, both nodes write the same resources at the same moment with different events: one new (both
    create it), one stored before (both change it). Whichever commits last, the state of the later event stays (and
    its tokens alone)."""
    node_a, node_b = PostgresFHIRStore(pg_url), PostgresFHIRStore(pg_url)
    rounds = 40
    for i in range(rounds):
        node_a.upsert(_patient(f"q{i}", ("urn:a", "initial")), 1)
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []
    results: dict[str, list[bool]] = {"a": [], "b": []}

    def run(store: PostgresFHIRStore, name: str, high_on_even: bool) -> None:
        try:
            for i in range(rounds):
                high = (i % 2 == 0) == high_on_even
                seq = 10 + 2 * i + (2 if high else 1)
                barrier.wait()
                with store.transaction():  # an event's resources
                    store.upsert(_patient(f"q{i}", ("urn:b", f"seq-{seq}")), seq)
                    results[name].append(store.upsert(_patient(f"p{i}", ("urn:a", f"seq-{seq}")), seq))
                    store.upsert(_request(f"sr{i}", f"Patient/p{i}", f"ACC-{seq}", "active"), seq)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(node_a, "a", True)),
        threading.Thread(target=run, args=(node_b, "b", False)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        for i in range(rounds):
            winner = 10 + 2 * i + 2
            for store in (node_a, node_b):  # what one node committed, the other reads at once
                for rid in (f"p{i}", f"q{i}"):
                    patient = store.get("Patient", rid)
                    assert patient is not None and patient["identifier"][0]["value"] == f"seq-{winner}", rid
                    assert store.seq_of("Patient", rid) == winner
                assert store.seq_of("ServiceRequest", f"sr{i}") == winner
                assert store.search("Patient", {"identifier": f"seq-{winner}"})[0] == 2
                assert store.search("Patient", {"identifier": f"seq-{winner - 1}"})[0] == 0
                assert store.search("Patient", {"identifier": "initial"})[0] == 0
                assert store.search("ServiceRequest", {"identifier": f"ACC-{winner - 1}"})[0] == 0
                assert (store.get("Patient", f"q{i}") or {})["meta"]["versionId"] in ("2", "3")
        assert node_a.count("Patient") == 2 * rounds and node_b.count() == 3 * rounds
        assert all(results["a"][i] for i in range(0, rounds, 2))  # the later event always changes something
    finally:
        node_a.close()
        node_b.close()


def test_a_rolled_back_transaction_leaves_nothing_and_a_committed_one_shows_on_every_node(pg_url: str) -> None:
    node_a, node_b = PostgresFHIRStore(pg_url), PostgresFHIRStore(pg_url)
    try:
        node_a.upsert(_patient("p0", ("urn:a", "before")), 1)
        with pytest.raises(RuntimeError), node_a.transaction():
            node_a.upsert(_patient("p1", ("urn:a", "V1")), 2)
            node_a.upsert(_patient("p0", ("urn:a", "changed")), 2)
            node_a.set_remote([("Patient", "p0", 1, "Patient/srv-0")])
            assert node_a.get("Patient", "p1") is not None  # the writer sees its own writes
            assert node_b.get("Patient", "p1") is None and node_b.search("Patient", {"identifier": "V1"})[0] == 0
            raise RuntimeError("the event's handler failed")
        for store in (node_a, node_b):
            assert store.get("Patient", "p1") is None and store.count() == 1
            assert store.search("Patient", {"identifier": "changed"})[0] == 0
            assert store.search("Patient", {"identifier": "before"})[0] == 1
            assert store.get_with_remote("Patient", "p0")[1] is None and store.seq_of("Patient", "p0") == 1
        with psycopg.connect(pg_url) as conn:
            tokens = conn.execute("SELECT id, value FROM fhir_tokens ORDER BY id").fetchall()
        assert tokens == [("p0", "before")]  # no token of the rolled-back resource is left behind
        with node_a.transaction():
            node_a.upsert(_patient("p1", ("urn:a", "V1")), 2)
        assert node_b.search("Patient", {"identifier": "urn:a|V1"})[0] == 1  # at once, on the other node
    finally:
        node_a.close()
        node_b.close()


def test_an_index_built_by_an_older_version_is_rebuilt_at_open(pg_url: str) -> None:
    store = PostgresFHIRStore(pg_url)
    try:
        store.upsert(_patient("p1", ("urn:a", "V1")), 1)
    finally:
        store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM fhir_tokens")
        conn.execute("UPDATE fhir_index SET tokens_version = 1")
    store = PostgresFHIRStore(pg_url)
    try:
        assert store.search("Patient", {"identifier": "urn:a|V1"})[0] == 1
    finally:
        store.close()


# -- a server restart ---------------------------------------------------------------------------------------------


async def _api_answers(store: PostgresFHIRStore, paths: list[str]) -> list[httpx.Response]:
    """The /fhir API's answers to GETs of ``paths`` (``POST``: a search by form)."""
    transport = httpx.ASGITransport(app=Starlette(routes=routes(store, "http://fhir.example")))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return [
            await client.post("/fhir/Patient/_search", data={"identifier": "V1"})
            if path == "POST"
            else await client.get(path)
            for path in paths
        ]


def test_the_first_reads_and_write_after_a_server_restart_succeed() -> None:
    """Four pooled reader connections (and the writer) from before a restart of the server: none fails a call
    after it (each is found gone and replaced); while the server is down a read fails at once, it does not hang, and
    the /fhir API answers 503."""
    from tests.test_ha import private_postgres, start_postgres, stop_postgres

    with private_postgres() as server:
        store = PostgresFHIRStore(server.url(server.create_database()), pool_size=4)
        try:
            store.upsert(_patient("p1", ("urn:a", "V1")), 1)
            held = [store._readers.acquire() for _ in range(4)]  # four connections open at once, then idle
            for conn in held:
                store._readers.release(conn)
            assert store._readers.idle == 4 and store.count() == 1
            stop_postgres(server)
            with pytest.raises(psycopg.OperationalError):
                store.get("Patient", "p1")
            # The /fhir API says so: 503 transient with Retry-After, an OperationOutcome (JSON or XML), not a 500.
            paths = ["/fhir/Patient/p1", "/fhir/Patient?identifier=V1", "/fhir/Patient/p1?_format=xml", "POST"]
            for path, response in zip(paths, asyncio.run(_api_answers(store, paths)), strict=True):
                assert response.status_code == 503 and response.headers["retry-after"] == "5", path
                assert "transient" in response.text and "OperationOutcome" in response.text
            start_postgres(server)
            for _ in range(10):
                assert (store.get("Patient", "p1") or {}).get("id") == "p1"
                assert store.search("Patient", {"identifier": "urn:a|V1"})[0] == 1
            assert store.upsert(_patient("p2", ("urn:a", "V2")), 2) is True  # the writer's session replaced too
            assert store.count("Patient") == 2
        finally:
            store.close()
