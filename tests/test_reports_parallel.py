"""Reports validated several at once: the validation processes (``ProcessValidator``), the report publisher's locks
(reports of different document sets prepared at once, of one set one at a time) and the orders channel taking
reports from several connections, with the official CI-SIS validators."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.test_flow import ack_code, engine_config, fixture, until
from tests.test_reports import TCC, needs_validators, report_of, study
from traboule import model
from traboule.adapters.mllp import MLLPClient
from traboule.app.runtime import Runtime
from traboule.errors import ConfigError
from traboule.formats import hl7
from traboule.formats.cda_validation import (
    MAX_DEFAULT_PROCESSES,
    MAX_PROCESSES,
    PROCESSES_ENV,
    CDAValidator,
    ProcessValidator,
    default_processes,
    processes_setting,
)
from traboule.model import Envelope
from traboule.stores.reports import ReportPublisher
from traboule.translate.cda import CDAMapping, DocumentIds
from traboule.translate.hl7_mapping import HL7InboundMapping

pytestmark = pytest.mark.timeout(300)

STUDY_ROOT = "1.2.250.1.999.1.2.20261206"


def report_message(k: int) -> bytes:
    """The fixture report with its own control id, order numbers and accession number (its own document set)."""
    text = fixture("oru_r01_report.hl7").decode("utf-8")
    for old, new in (("REP0001", f"R{k}"), ("PLC0001", f"P{k}"), ("FIL0001", f"F{k}"), ("ACC0001", f"A{k}")):
        text = text.replace(old, new)
    return text.encode("utf-8")


def study_of(k: int) -> model.Study:
    return study(f"A{k}", f"{STUDY_ROOT}.{k}")


class Recorder:
    """A validator that says how many validations it had under way at once (the most), around a real one."""

    def __init__(self, inner: ProcessValidator) -> None:
        self.inner = inner
        self.processes = inner.processes
        self._lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.calls = 0

    def validate(self, data: bytes, source: str = "") -> Any:
        with self._lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        try:
            return self.inner.validate(data, source)
        finally:
            with self._lock:
                self.running -= 1

    def warm(self) -> None:
        self.inner.warm()


@pytest.fixture(scope="module")
def pool(cda_validator: CDAValidator) -> Iterator[ProcessValidator]:
    """Two validation processes, warmed (their schematrons compiled and run once)."""
    needs_validators()
    validator = ProcessValidator(TCC, cda_validator.cache_dir, processes=2)
    try:
        validator.warm()
        yield validator
    finally:
        validator.close()


@pytest.fixture(scope="module")
def document() -> bytes:
    """A level-3 CR d'imagerie as the channel makes it (valid)."""
    report = report_of(fixture("oru_r01_report.hl7"))
    found = study()
    report.acts = [CDAMapping().act_of(report, found)]
    return CDAMapping().build(report, DocumentIds("1.2.250.1.999.9.1.1", "1.2.250.1.999.9.1", 1), found)


def test_the_number_of_processes_is_a_setting_with_a_default_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    assert processes_setting(3, "reports.validation_processes") == 3
    assert processes_setting("2", "reports.validation_processes") == 2
    for bad in (0, -1, True, 1.5, "two", MAX_PROCESSES + 1):
        with pytest.raises(ConfigError, match=r"reports\.validation_processes must be a whole number from 1"):
            processes_setting(bad, "reports.validation_processes")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    assert default_processes() == min(cores, MAX_DEFAULT_PROCESSES)
    monkeypatch.setenv(PROCESSES_ENV, "3")
    assert default_processes() == 3
    monkeypatch.setenv(PROCESSES_ENV, "none")  # not a number: said in the log, the default used
    assert default_processes() == min(cores, MAX_DEFAULT_PROCESSES)
    monkeypatch.delenv(PROCESSES_ENV)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_processes() == MAX_DEFAULT_PROCESSES  # many cores: capped (each process holds its schematrons)


def test_warm_starts_every_process(pool: ProcessValidator) -> None:
    pids = pool.pids
    assert len(pids) == 2 and len(set(pids)) == 2
    for pid in pids:
        os.kill(pid, 0)  # alive


def test_a_validation_does_not_wait_for_a_busy_process(pool: ProcessValidator, document: bytes) -> None:
    with pool._worker():  # one process taken (as by a long validation)
        report = pool.validate(document, source="other")
        assert report.valid, report.summary()
        with pool._worker():  # both taken: the next validation waits for one
            waiting = ThreadPoolExecutor(1)
            future = waiting.submit(pool.validate, document)
            time.sleep(0.5)
            assert not future.done()
        assert future.result(timeout=60).valid  # one was given back
        waiting.shutdown()


def test_reports_from_the_processes_are_those_of_an_in_process_validator(
    pool: ProcessValidator, cda_validator: CDAValidator, document: bytes
) -> None:
    broken = document.replace(b"<legalAuthenticator>", b"<legalAuthenticatorX>", 1)
    broken = broken.replace(b"</legalAuthenticator>", b"</legalAuthenticatorX>", 1)
    inputs = [document, broken] * 4
    with ThreadPoolExecutor(4) as threads:
        reports = list(threads.map(pool.validate, inputs))
    expected = [cda_validator.validate(document), cda_validator.validate(broken)]
    assert expected[0].valid and not expected[1].valid and expected[1].xsd_errors
    for i, report in enumerate(reports):
        want = expected[i % 2]
        assert report.valid == want.valid
        assert report.xsd_errors == want.xsd_errors and report.findings == want.findings


def test_reports_of_different_sets_are_validated_at_once(pool: ProcessValidator, tmp_path: Path) -> None:
    recorder = Recorder(pool)
    publisher = ReportPublisher(CDAMapping(), tmp_path / "reports.sqlite", recorder)
    assert publisher.parallel == 2
    inbound = HL7InboundMapping()
    ks = list(range(1, 9))
    publisher.remember([study_of(k) for k in ks])
    reports = {k: inbound.map(hl7.parse(hl7.decode(report_message(k)).text))[0] for k in ks}
    try:
        with ThreadPoolExecutor(publisher.parallel + 1) as threads:
            docs = list(threads.map(lambda k: publisher.prepare(reports[k], f"m{k}"), ks))
    finally:
        publisher.close()
    assert [(d.action, d.version, d.level) for d in docs] == [("publish", 1, 3)] * len(ks)
    assert len({d.set_id for d in docs}) == len(ks)
    assert recorder.calls == len(ks) and recorder.most >= 2  # validations under way at once (2 in processes)


def test_reports_of_one_set_are_prepared_one_at_a_time(pool: ProcessValidator, tmp_path: Path) -> None:
    """An original, its resend and its correction at once (three connections): one validation at a time, versions
    in a row, the resend given the original's document."""
    recorder = Recorder(pool)
    publisher = ReportPublisher(CDAMapping(), tmp_path / "reports.sqlite", recorder)
    publisher.remember_study(study())
    jobs = [
        ("original", "oru_r01_report.hl7"),
        ("resend", "oru_r01_report.hl7"),
        ("correction", "oru_r01_report_corrected.hl7"),
    ]
    keys = {"original": "m1", "resend": "m1", "correction": "m2"}
    try:
        with ThreadPoolExecutor(3) as threads:
            futures = {name: threads.submit(publisher.prepare, report_of(fixture(f)), keys[name]) for name, f in jobs}
            docs = {name: f.result(timeout=120) for name, f in futures.items()}
    finally:
        publisher.close()
    assert recorder.most == 1
    assert docs["resend"].id == docs["original"].id
    versions = sorted({(d.id, d.version) for d in docs.values()}, key=lambda d: d[1])
    assert [v for _, v in versions] == [1, 2]
    first, second = (next(d for d in docs.values() if d.version == v) for v in (1, 2))
    assert second.replaces == first.id and second.set_id == first.set_id


def test_workers_start_on_demand_and_stop_at_close(cda_validator: CDAValidator) -> None:
    needs_validators()
    validator = ProcessValidator(TCC, cda_validator.cache_dir, processes=2)
    try:
        assert validator.pids == []
        report = validator.validate(b"<x/>", source="not a CDA")
        assert not report.valid and report.xsd_errors
        (pid,) = validator.pids  # one call, one thread: the other process is not started
    finally:
        validator.close()
    assert validator.pids == []
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # shutdown(wait=True) joined it; its pid may linger a moment as a zombie
            os.kill(pid, 0)
            time.sleep(0.05)


def test_a_dead_process_is_started_again(pool: ProcessValidator, document: bytes) -> None:
    victim = pool._idle[-1].pid  # the process the next validation takes
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    report = pool.validate(document)
    assert report.valid, report.summary()
    assert victim not in pool.pids and len(pool.pids) == 2


async def test_the_channel_validates_reports_from_several_connections_at_once(
    tmp_path: Path, cda_validator: CDAValidator
) -> None:
    needs_validators()
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {
        "validate": True,
        "validators": str(TCC),
        "cache": str(cda_validator.cache_dir),
        "validation_processes": 2,
    }
    runtime = Runtime(cfg)
    channel: Any = runtime.channel("ris-orders")
    assert channel.reports.validator.processes == 2 and channel.reports.parallel == 2
    recorder = channel.reports.validator = Recorder(channel.reports.validator)
    await runtime.start()
    try:
        ks = list(range(101, 109))
        for k in ks:
            env = Envelope(study_of(k))
            await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
        await until(lambda: all(channel.reports.study_for(study_report(k)) is not None for k in ks), timeout=30)
        port = channel.listener.port

        async def connection(mine: list[int]) -> list[str]:
            async with MLLPClient("127.0.0.1", port, timeout=120) as client:
                return [ack_code(hl7.parse(hl7.decode(await client.send(report_message(k))).text)) for k in mine]

        codes = await asyncio.gather(*(connection(ks[c::4]) for c in range(4)))
        assert [c for conn in codes for c in conn] == ["AA"] * len(ks)
        assert recorder.calls == len(ks) and recorder.most >= 2
        assert runtime.journal is not None and runtime.journal.counts().get("accepted") == len(ks)
        with channel.reports.storage._lock:
            stored = channel.reports.storage.db.execute("SELECT count(*) FROM documents").fetchone()[0]
        assert stored == len(ks)
    finally:
        await runtime.stop()


def study_report(k: int) -> model.Report:
    return report_of(report_message(k))


def test_a_wrong_number_of_processes_is_refused_at_start(tmp_path: Path) -> None:
    needs_validators()
    cfg = engine_config(tmp_path)
    cfg.channels[0]["reports"] = {"validate": True, "validators": str(TCC), "validation_processes": 0}
    with pytest.raises(ConfigError, match=r"ris-orders: reports\.validation_processes must be a whole number"):
        Runtime(cfg)
