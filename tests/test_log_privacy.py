"""Logs without patient data, one JSON object per line, whatever the input and whichever process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_flow import engine_config, mllp_port, store, until
from traboule.adapters.mllp import MLLPClient
from traboule.app import logging as tlog
from traboule.app.runtime import Runtime

FIXTURES = ROOT / "fixtures" / "hl7"


def identity_values(message: bytes) -> set[str]:
    """Names, identifiers (IPP, INS, merged ids) and birth dates a message carries, as they could be logged."""
    text = message.decode("latin-1")
    values: set[str] = set()
    for segment in text.replace("\n", "\r").split("\r"):
        fields = segment.split("|")
        if fields[0] == "PID":
            picks = [(3, (0,)), (5, (0, 1, 2)), (7, ()), (18, (0,))]
        elif fields[0] == "MRG":
            picks = [(1, (0,))]
        else:
            continue
        for index, components in picks:
            if index >= len(fields):
                continue
            for repetition in fields[index].split("~"):
                parts = repetition.split("^")
                for c in components or (None,):
                    value = repetition if c is None else (parts[c] if c < len(parts) else "")
                    if len(value) >= 4:  # shorter ones ("F", "Mme") would be found anywhere
                        values.add(value)
                        values.add(value.encode("latin-1").decode("utf-8", "replace"))
    return values


def hostile_variants(order: bytes) -> list[bytes]:
    """Each reject path of the ingest, on a message carrying the same identity."""
    return [
        order.replace(b"279035121518989", b"279035121518900"),  # INS with a wrong check key
        order.replace(b"|ACC0001|", b"|ACC-2027-0000000001|"),  # accession too long for DICOM SH
        order.replace(b"IPP0001^", b"IPP0001-" + b"9" * 70 + b"^"),  # patient id too long
        order.replace(b"ORC|NW|", b"ORC|ZZ|"),  # unknown order control
        order.replace(b"|ORM^O01|", b"|ORM^O99|"),  # message type not accepted
        order.replace(b"ZDS|1.2.250", b"ZDS|1..2.250"),  # malformed study UID
        order.replace(b"|8859/1", b"|BOGUS-CHARSET"),  # unknown charset
        order.replace(b"ORC|", b"ORX|").replace(b"OBR|", b"OBX|"),  # no order group
        order[: len(order) // 2],  # cut in the middle
    ]


async def test_no_identity_from_any_fixture_or_reject_path_reaches_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = [path.read_bytes() for path in sorted(FIXTURES.glob("*.hl7"))]
    messages += hostile_variants((FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes())
    messages += hostile_variants((FIXTURES / "oru_r01_report.hl7").read_bytes())
    tlog.configure("json", "debug")
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        async with MLLPClient("127.0.0.1", mllp_port(runtime), timeout=10) as client:
            acks = [(await client.send(m)).decode("latin-1") for m in messages]
        await until(lambda: store(runtime).count() >= 1)
        await runtime.wait_idle()
    finally:
        await runtime.stop()
        tlog.configure("console", "info")
    codes = [ack.split("MSA|")[1][:2] for ack in acks]
    assert "AA" in codes and "AE" in codes and "AR" in codes  # every kind of answer was logged
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) > 50
    for line in lines:
        json.loads(line)  # every line is one JSON object
    secrets = set().union(*(identity_values(m) for m in messages))
    assert {"DUPONT", "IPP0001", "279035121518989", "19790328"} <= secrets
    leaked = sorted(s for s in secrets if s in err)
    assert leaked == []


def test_scrub_masks_quoted_values_and_digit_runs() -> None:
    scrubbed = tlog.scrub("PID-3: INS '279035121518900' has a wrong check key")
    assert scrubbed == "PID-3: INS <redacted> has a wrong check key"
    assert "19790328" not in tlog.scrub("birth date 19790328 is in the future")
    assert tlog.scrub('name "DUPONT^JEAN" too long') == "name <redacted> too long"
    assert tlog.scrub("OBR-18 is 19 characters") == "OBR-18 is 19 characters"


def test_a_long_record_is_one_bounded_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    tlog.configure("json", "info")
    try:
        import structlog

        structlog.get_logger("t").info("big", detail="x" * 50_000, other="y" * 10_000, n=3)
    finally:
        tlog.configure("console", "info")
    (line,) = capsys.readouterr().err.splitlines()
    assert len(line.encode()) < tlog.MAX_LINE
    record = json.loads(line)
    assert record["event"] == "big" and record["truncated"] is True and record["n"] == 3


_WRITER = """
import logging, sys, structlog
from traboule.app import logging as tlog
tlog.configure("json", "info")
log = structlog.get_logger("w")
std = logging.getLogger("lib")
for i in range(int(sys.argv[1])):
    log.info("record", process=sys.argv[2], i=i, pad="x" * (i % 3000))
    std.warning(f"library record {i} " + "y" * (i % 2000))  # distinct: not rate-limited
"""


def test_two_processes_writing_to_one_stderr_never_break_a_line(tmp_path: Path) -> None:
    """The engine's processes share one stderr: each line must reach it whole (one write per record)."""
    out = tmp_path / "log.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with out.open("wb") as sink:
        read, write = os.pipe()
        procs = [
            subprocess.Popen([sys.executable, "-c", _WRITER, "1500", name], stderr=write, env=env, cwd=ROOT)
            for name in ("a", "b", "c")
        ]
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            sink.write(pipe.read())
        assert [p.wait(60) for p in procs] == [0, 0, 0]
    lines = out.read_bytes().decode().splitlines()
    assert len(lines) == 3 * 1500 * 2
    records = [json.loads(line) for line in lines]
    assert {r.get("process") for r in records if r["event"] == "record"} == {"a", "b", "c"}


def test_patient_data_is_logged_when_asked_for_debugging(capsys: pytest.CaptureFixture[str]) -> None:
    tlog.configure("json", "debug", patient_data=True)
    try:
        import structlog

        structlog.get_logger("t").debug("x", patient_id="IPP0001", error="INS '279035121518900' bad")
    finally:
        tlog.configure("console", "info")
    record = json.loads(capsys.readouterr().err.splitlines()[0])
    assert record["patient_id"] == "IPP0001" and "279035121518900" in record["error"]


def test_hl7_fixture_identities_are_found_by_the_helper() -> None:
    """The check above is only as good as what it looks for."""
    values = identity_values((FIXTURES / "adt_a40_merge.hl7").read_bytes())
    assert {"IPP0009", "IPP0001", "DUPONT", "19790328"} <= values and all(len(v) >= 4 for v in values)


def test_a_library_repeating_itself_is_cut_to_a_burst(capsys: pytest.CaptureFixture[str]) -> None:
    """uvicorn's "Exceeded concurrency limit." and pydicom's invalid-value warnings came once per hostile request:
    hundreds of thousands of lines. A library's warnings.warn is a JSON line like the rest."""
    import logging
    import warnings

    tlog.configure("json", "info")
    try:
        for n in range(500):
            logging.getLogger("uvicorn.error").warning("Exceeded concurrency limit. %d", n)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR TM: '093'", UserWarning, stacklevel=1)
    finally:
        tlog.configure("console", "info")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert sum(1 for r in lines if "Exceeded" in r["event"]) == 20
    (warned,) = [r for r in lines if "Invalid value" in r["event"]]
    assert "093" not in warned["event"]  # a quoted value is scrubbed like any free text


def test_the_next_record_after_the_window_says_how_many_were_left_out() -> None:
    import logging

    limit = tlog._RateLimit(burst=2, window=0.2)
    record = logging.LogRecord("lib", logging.WARNING, __file__, 1, "same %s", ("x",), None)
    assert [limit.filter(record) for _ in range(5)] == [True, True, False, False, False]
    time.sleep(0.25)
    fresh = logging.LogRecord("lib", logging.WARNING, __file__, 1, "same %s", ("y",), None)
    assert limit.filter(fresh) and fresh.suppressed == 3  # type: ignore[attr-defined]


async def test_a_forwarded_request_writes_no_line_of_the_http_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main process forwards every request for another process's routes (and checks each child's health) with
    httpx, which logs each request at INFO: one line per API call, twice. Its lines stay off below a warning."""
    import asyncio

    import httpx

    from tests.test_engine import free_port_run
    from traboule.app.config import Config
    from traboule.app.http import create_app, serve

    cfg = Config(data_dir=str(tmp_path), http_port=free_port_run())
    cfg.channels = [c for c in cfg.channels if c["name"] == "fhir"]  # alone in its process: forwarded from main
    cfg.channels[0]["mapping"] = str(ROOT / "mappings" / "fhir.yaml")
    assert cfg.processes() == ["main", "fhir"]
    tlog.configure("json", "info")
    main, child = Runtime(cfg, process="main"), Runtime(cfg, process="fhir")
    await main.start()
    await child.start()
    main_server = await serve(create_app(main), "127.0.0.1", cfg.http_port)
    child_server = await serve(create_app(child), "127.0.0.1", cfg.http_port_of("fhir"))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.http_port}", trust_env=False) as client:
            for _ in range(3):
                assert (await client.get("/fhir/metadata")).status_code == 200  # answered by the child
    finally:
        child_server.should_exit = main_server.should_exit = True
        await asyncio.gather(main_server.task, child_server.task)
        await child.stop()
        await main.stop()
        tlog.configure("console", "info")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert any(r["event"] == "channel.started" for r in lines)  # the lines of the processes are read here
    assert not [r for r in lines if "HTTP Request" in r["event"] or r.get("logger") in ("httpx", "httpcore")]
