"""The channel base: typed settings refused with the channel and the key, the idempotent-consumer store, and the
log context bound once per delivery."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import ROOT
from tests.ports import free_port
from traboule.app import logging as tlog
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.bus import Delivery
from traboule.channel import ConsumerChannel, HasMapping, HasStore, ReportsHealth, ServesHTTP, Setting, settings_of
from traboule.errors import ConfigError, NotAccepted
from traboule.model import Document, Envelope, Identifier, ImagingOrder, Patient, PerformedStep, ScheduledStep
from traboule.stores.idempotency import AppliedKeys, Legacy
from traboule.stores.worklist import WorklistStore


class Tap(ConsumerChannel):
    """A consumer declaring one setting of each kind."""

    kind = "tap"
    topics = Setting(list, ["order.#"])
    mode = Setting(str, "copy", choices=("copy", "move"))
    ratio = Setting(float, 0.5, minimum=0, maximum=1)
    enabled = Setting(bool, True)
    lifetime = Setting(int, 300, minimum=1, key="vihf.lifetime")


def tap(tmp_path: Path, **settings: Any) -> Tap:
    return Tap({"name": "tap", "kind": "tap", **settings}, Runtime(Config(data_dir=str(tmp_path), channels=[])))


# -- typed settings ---------------------------------------------------------------------------------------------


def test_settings_take_their_defaults_and_typed_values(tmp_path: Path) -> None:
    default = tap(tmp_path)
    assert (default.topics, default.mode, default.ratio, default.enabled, default.lifetime) == (
        ["order.#"],
        "copy",
        0.5,
        True,
        300,
    )
    assert default.max_attempts == 5  # the base's
    given = tap(tmp_path, topics=["patient.*"], mode="move", ratio=1, enabled=False, max_attempts="7", vihf={})
    assert (given.topics, given.mode, given.ratio, given.enabled, given.max_attempts) == (
        ["patient.*"],
        "move",
        1.0,
        False,
        7,  # a whole number written as text (an environment variable) is read as one
    )
    assert tap(tmp_path, vihf={"lifetime": 60}).lifetime == 60
    assert Tap.bindings({"name": "tap", "topics": ["study.#"]}) == [("tap", ["study.#"])]
    assert set(settings_of(Tap)) == {"topics", "max_attempts", "mode", "ratio", "enabled", "lifetime"}


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"mode": "copy-all"}, "channel tap: mode must be copy or move, not 'copy-all'"),
        ({"ratio": 2}, "channel tap: ratio must be at most 1, not 2"),
        ({"ratio": "half"}, "channel tap: ratio must be a number, not 'half'"),
        ({"enabled": "no"}, "channel tap: enabled must be true or false, not 'no'"),
        ({"max_attempts": 0}, "channel tap: max_attempts must be at least 1, not 0"),
        ({"max_attempts": 2.5}, "channel tap: max_attempts must be a whole number, not 2.5"),
        ({"max_attempts": True}, "channel tap: max_attempts must be a whole number, not True"),
        ({"topics": "order.#"}, "channel tap: topics must be a list of text values, not 'order.#'"),
        ({"topics": ["order.#", ""]}, "channel tap: topics must be a list of text values"),
        ({"vihf": {"lifetime": 0}}, "channel tap: vihf.lifetime must be at least 1, not 0"),
        ({"vihf": "yes"}, "channel tap: vihf must be a table, not 'yes'"),
    ],
)
def test_a_wrong_setting_is_a_configuration_error_naming_channel_and_key(
    tmp_path: Path, settings: dict[str, Any], error: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        tap(tmp_path, **settings)
    assert str(refused.value).startswith(error)


def test_builtin_channels_refuse_their_wrong_settings(tmp_path: Path) -> None:
    mllp = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": free_port()}
    cases = [
        (
            {"name": "drimbox", "kind": "hl7-documents", "destination": mllp, "message": "ORU^R02"},
            "channel drimbox: message must be ORU^R01 or MDM, not 'ORU^R02'",
        ),
        (
            {"name": "ris-status", "kind": "hl7-status", "destination": mllp, "message": "ORM^O02"},
            "channel ris-status: message must be ORM^O01 or OMI^O23, not 'ORM^O02'",
        ),
        (
            {"name": "worklist", "kind": "worklist", "offer_started": "false"},
            "channel worklist: offer_started must be true or false, not 'false'",
        ),
        (
            {"name": "worklist", "kind": "worklist", "destinations": [{"adapter": "mpps-scp"}]},
            "channel worklist: destination adapter 'mpps-scp' not supported here",
        ),
        ({"name": "fhir", "kind": "fhir", "max_batch": "lots"}, "channel fhir: max_batch must be a whole number"),
        (
            {"name": "mpps", "kind": "mpps", "process": "worker"},
            "channel mpps: an mpps channel journals, it runs in the main process",
        ),
    ]
    for channel, error in cases:
        with pytest.raises(ConfigError) as refused:
            Runtime(Config(data_dir=str(tmp_path / channel["name"]), channels=[channel]))
        assert str(refused.value).startswith(error)


def test_check_prints_a_configuration_error_not_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path / "var"}"
defaults = false

[[channels]]
name = "ris-status"
kind = "hl7-status"
destination = {{adapter = "mllp-sender", host = "127.0.0.1", port = {free_port()}}}
max_attempts = "three"
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    done = subprocess.run(
        [sys.executable, "-m", "traboule.app.cli", "--config", str(config), "check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "configuration error: channel ris-status: max_attempts must be a whole number, not 'three'"
    )


def test_capabilities_are_found_by_type(tmp_path: Path) -> None:
    runtime = Runtime(
        Config(
            data_dir=str(tmp_path),
            channels=[{"name": "fhir", "kind": "fhir", "api": True}, {"name": "worklist", "kind": "worklist"}],
        )
    )
    fhir, worklist = runtime.channel("fhir"), runtime.channel("worklist")
    try:
        assert isinstance(fhir, ServesHTTP) and isinstance(fhir, ReportsHealth)
        assert not isinstance(worklist, ServesHTTP) and not isinstance(worklist, ReportsHealth)
        assert isinstance(worklist, HasMapping) and isinstance(worklist, HasStore)
        assert set(runtime.health()["channels"]) == {"fhir"}  # the worklist reports no destination state
    finally:
        fhir.store.close()  # type: ignore[attr-defined]
        worklist.store.close()  # type: ignore[attr-defined]


# -- the idempotency store --------------------------------------------------------------------------------------


def test_a_key_is_done_once_marked_and_stays_done_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    keys = AppliedKeys.open(path)
    assert keys.db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL: a mark survives a power cut
    assert not keys.is_done("e1") and not keys.is_done("")
    assert keys.mark_done("e1", "ctrl-1") is True
    assert keys.mark_done("e1", "ctrl-2") is False  # the first mark is kept
    assert keys.is_done("e1") and keys.detail("e1") == "ctrl-1" and keys.detail("e2") is None
    with pytest.raises(ValueError):
        keys.mark_done("")
    keys.mark_done("e2")
    assert keys.done(["e1", "e2", "e3", ""]) == {"e1", "e2"}
    assert keys.done(f"k{i}" for i in range(1200)) == set()  # more keys than one query's parameters
    keys.close()
    reopened = AppliedKeys.open(path)
    assert reopened.done(["e1", "e2"]) == {"e1", "e2"}
    reopened.close()


def test_a_mark_inside_the_callers_transaction_is_kept_or_lost_with_its_writes(tmp_path: Path) -> None:
    keys = AppliedKeys.open(tmp_path / "c.sqlite")
    keys.db.execute("CREATE TABLE effects (id TEXT PRIMARY KEY)")
    with pytest.raises(RuntimeError), keys.transaction() as db:
        db.execute("INSERT INTO effects VALUES ('a')")
        keys.mark_done("e1")
        raise RuntimeError("crash before the commit")
    assert not keys.is_done("e1")
    assert keys.db.execute("SELECT count(*) FROM effects").fetchone() == (0,)
    with keys.transaction() as db:
        db.execute("INSERT INTO effects VALUES ('a')")
        keys.mark_done("e1")
    assert keys.is_done("e1")
    assert keys.db.execute("SELECT count(*) FROM effects").fetchone() == (1,)
    keys.close()


def test_an_earlier_versions_sent_table_is_moved_into_the_store(tmp_path: Path) -> None:
    path = tmp_path / "ris-status.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE sent (idempotency_key TEXT PRIMARY KEY, control_id TEXT NOT NULL, sent_at TEXT NOT NULL)")
    old.execute("INSERT INTO sent VALUES ('mpps|1|COMPLETED', 'S0001', '2026-01-01T10:00:00')")
    old.commit()
    old.close()
    legacy = [Legacy("sent", key="idempotency_key", at="sent_at", detail="control_id")]
    keys = AppliedKeys.open(path, legacy=legacy)
    assert keys.is_done("mpps|1|COMPLETED") and keys.detail("mpps|1|COMPLETED") == "S0001"
    assert keys.db.execute("SELECT name FROM sqlite_master WHERE name = 'sent'").fetchone() is None
    keys.close()
    again = AppliedKeys.open(path, legacy=legacy)  # once moved, nothing more to do
    assert again.done(["mpps|1|COMPLETED"]) == {"mpps|1|COMPLETED"}
    again.close()


def test_the_worklist_stores_applied_table_is_read_and_written_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "worklist.sqlite"
    store = WorklistStore(str(path))
    try:
        assert store.apply([], [], "order-1") is True
        keys = AppliedKeys.open(path)
        assert keys.is_done("order-1")
        keys.mark_done("order-2")
        keys.close()
        assert store.applied(["order-1", "order-2"]) == {"order-1", "order-2"}
        assert store.apply([], [], "order-3") is True  # the store's own two-column insert still fits
        assert store.apply([], [], "order-2") is False
    finally:
        store.close()


async def test_an_upgraded_status_channel_does_not_resend_what_it_sent_before(tmp_path: Path) -> None:
    """The RIS accepted a status message under the earlier table: the redelivered event is not sent again (the
    destination port is closed: a send would raise)."""
    old = sqlite3.connect(tmp_path / "ris-status.sqlite")
    old.execute("CREATE TABLE sent (idempotency_key TEXT PRIMARY KEY, control_id TEXT NOT NULL, sent_at TEXT NOT NULL)")
    old.execute("INSERT INTO sent VALUES ('mpps|1.2.3|COMPLETED', 'S0001', '2026-01-01T10:00:00')")
    old.commit()
    old.close()
    destination = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": free_port(), "timeout": 1}
    channel_config = {"name": "ris-status", "kind": "hl7-status", "destination": destination}
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[channel_config]))
    channel = runtime.channel("ris-status")
    step = PerformedStep(sop_instance_uid="1.2.3", status="COMPLETED", accession_number="ACC1")
    sent = Envelope(step, source="mpps", idempotency_key="mpps|1.2.3|COMPLETED", correlation_id="1.2.3")
    new = Envelope(step, source="mpps", idempotency_key="mpps|1.2.3|DISCONTINUED", correlation_id="1.2.3")
    try:
        await channel.handle(Delivery("procedure.completed", sent.to_json(), sent.id))  # type: ignore[attr-defined]
        with pytest.raises(NotAccepted):  # a new event is sent: the closed port refuses it
            await channel.handle(Delivery("procedure.completed", new.to_json(), new.id))  # type: ignore[attr-defined]
    finally:
        await channel.stop()


# -- log context --------------------------------------------------------------------------------------------------


def records(err: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in err.splitlines() if line.strip()]


@pytest.fixture
def json_logs() -> Iterator[None]:
    """JSON log lines on stderr (set before a channel binds its logger), the console renderer again after."""
    tlog.configure("json", "info")
    try:
        yield
    finally:
        tlog.configure("console", "info")


@pytest.mark.usefixtures("json_logs")
async def test_a_deliverys_ids_are_bound_to_every_line_it_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hl7-documents logs a retry with no id passed by hand: the channel, message and correlation ids are bound
    around the delivery, and gone once it is handled."""
    destination = {"adapter": "mllp-sender", "host": "127.0.0.1", "port": free_port(), "timeout": 1}
    channel_config = {"name": "drimbox", "kind": "hl7-documents", "destination": destination, "retry_window": 0.6}
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[channel_config]))
    channel = runtime.channel("drimbox")
    env = Envelope(Document(id="1.2.250.1.9^doc1", content="PD94"), source="test", correlation_id="corr-42")
    try:
        with pytest.raises(NotAccepted):
            await channel.handle(Delivery("document.publish", env.to_json(), env.id))  # type: ignore[attr-defined]
        structlog.get_logger("t").info("after")
    finally:
        await channel.stop()
    lines = records(capsys.readouterr().err)
    (retry,) = [r for r in lines if r["event"] == "document.retry"]
    assert (retry["channel"], retry["message_id"], retry["correlation_id"]) == ("drimbox", env.id, "corr-42")
    assert retry["error"] == "NotAccepted" and retry["wait_s"] == 0.5  # its own fields, as before
    (after,) = [r for r in lines if r["event"] == "after"]
    assert not {"channel", "message_id", "correlation_id"} & after.keys()


@pytest.mark.usefixtures("json_logs")
async def test_a_batch_consumer_binds_each_events_ids_to_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runtime = Runtime(Config(data_dir=str(tmp_path), channels=[{"name": "worklist", "kind": "worklist"}]))
    channel = runtime.channel("worklist")
    envelopes = [
        Envelope(
            ImagingOrder(
                placer_order_number=Identifier(f"PLC{n}", "RIS"),
                accession_number=Identifier(f"ACC{n}"),
                patient=Patient(ids=[Identifier("IPP1", "HOSP")]),
                steps=[ScheduledStep(step_id="S1", modality="CT", start="20260105093000")],
            ),
            source="test",
            idempotency_key=f"order-{n}",
            correlation_id=f"corr-{n}",
        )
        for n in (1, 2)
    ]
    deliveries = [Delivery("order.new", e.to_json(), e.id, {"journal-id": str(n)}) for n, e in enumerate(envelopes, 1)]
    try:
        await channel.handle(deliveries)  # type: ignore[attr-defined]
        await channel.handle(deliveries[:1])  # type: ignore[attr-defined]  # a redelivery
    finally:
        channel.store.close()  # type: ignore[attr-defined]
    lines = [r for r in records(capsys.readouterr().err) if r["event"].startswith("worklist.")]
    seen = [(r["event"], r["channel"], r["message_id"], r["correlation_id"], r["topic"]) for r in lines]
    assert seen == [
        ("worklist.applied", "worklist", envelopes[0].id, "corr-1", "order.new"),
        ("worklist.applied", "worklist", envelopes[1].id, "corr-2", "order.new"),
        ("worklist.duplicate", "worklist", envelopes[0].id, "corr-1", "order.new"),
    ]
