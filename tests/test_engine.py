"""The engine as an operator sees it: restart recovery, HTTP, logs, and the CLI against a running process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import ports
from tests.conftest import ROOT
from tests.peer_dcmtk import findscu, free_port
from tests.test_flow import engine_config, fixture, send, store, until
from traboule.app import logging as tlog
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.metrics import REGISTRY as metrics_registry
from traboule.model import Envelope, Identifier, ImagingOrder, Patient, ScheduledStep
from traboule.stores.journal import Journal, JournalEntry, OutboxEvent


async def test_journaled_events_reach_the_worklist_after_a_restart(tmp_path: Path) -> None:
    """An order acknowledged just before a crash (in the journal, not yet on the bus) is scheduled at restart."""
    order = ImagingOrder(
        placer_order_number=Identifier("PLC-CRASH", "RIS"),
        accession_number=Identifier("ACC-CRASH"),
        patient=Patient(ids=[Identifier("IPP9", "CHU")]),
        steps=[ScheduledStep(step_id="S1", modality="CT", start="20261125100000")],
    )
    env = Envelope(order, idempotency_key="crash-1")
    journal = Journal(tmp_path / "journal.sqlite")
    await journal.append(
        JournalEntry(channel="ris-orders", raw=b"MSH|...", status="accepted", idempotency_key="crash-1"),
        [OutboxEvent("order.new", env.id, env.to_json())],
    )
    journal.close()  # the process dies here: the event never reached the bus

    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        await until(lambda: store(runtime).count() == 1)
        (key,) = store(runtime).keys_with_prefix("")
        assert store(runtime).get(key).AccessionNumber == "ACC-CRASH"
        await runtime.wait_idle()
    finally:
        await runtime.stop()


async def test_health_metrics_and_channels_over_http(tmp_path: Path) -> None:
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)

    def received(status: str) -> float:
        labels = {"channel": "ris-orders", "status": status}
        return metrics_registry.get_sample_value("traboule_messages_received_total", labels) or 0.0

    before = received("accepted"), received("rejected")
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), b"garbage")
        await until(lambda: store(runtime).count() == 1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text
            channels = (await client.get("/channels")).json()
        assert health["status"] == "ok" and health["bus"]["backend"] == "embedded" and health["outbox_pending"] == 0
        assert 'traboule_messages_received_total{channel="ris-orders",status="accepted"}' in metrics
        assert (received("accepted"), received("rejected")) == (before[0] + 1, before[1] + 1)
        assert "traboule_worklist_items 1.0" in metrics
        assert [c["name"] for c in channels] == ["ris-orders", "worklist"]
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


async def test_json_logs_carry_ids_but_no_patient_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tlog.configure("json", "info")
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: store(runtime).count() == 1)
        await asyncio.to_thread(findscu, runtime.channel("worklist").scps[0].port, "TRABOULE", ["PatientName=DUP*"])
    finally:
        await runtime.stop()
        tlog.configure("console", "info")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    accepted = next(line for line in lines if line["event"] == "message.accepted")
    assert accepted["channel"] == "ris-orders"
    assert accepted["correlation_id"] == "MSG0001"
    assert accepted["message_id"] == 1
    applied = next(line for line in lines if line["event"] == "worklist.applied")
    assert applied["correlation_id"] == "MSG0001"
    text = json.dumps(lines, ensure_ascii=False)
    for patient_data in ("DUPONT", "Hélène", "IPP0001", "279035121518989", "19790328"):
        assert patient_data not in text


# -- the command line against a running engine --------------------------------------------------------------


def free_port_run(count: int = 3) -> int:
    """A free port p with p + 1 ... p + count - 1 free too: each child process serves HTTP on the next port (the
    default engine has three processes: main, worker, fhir)."""
    return ports.free_port_run(count)


def engine_ports() -> dict[str, str]:
    """Free ports for every listener of the default configuration."""
    return {
        "TRABOULE_MLLP_PORT": str(free_port()),
        "TRABOULE_MWL_PORT": str(free_port()),
        "TRABOULE_MPPS_PORT": str(free_port()),
        "TRABOULE_HTTP_PORT": str(free_port_run()),
    }


def cli(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "traboule.app.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


@pytest.fixture
def running_engine(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "var"), TRABOULE_LOG_FORMAT="json", **engine_ports())
    proc = subprocess.Popen(
        [sys.executable, "-m", "traboule.app.cli", "run"], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60  # a loaded machine starts three processes slowly
    assert proc.stderr is not None
    for line in proc.stderr:
        if '"engine.ready"' in line and json.loads(line).get("process") == "main":  # the children say it too
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"engine did not start: {line}")
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_cli_send_worklist_journal_against_running_engine(running_engine: dict[str, str]) -> None:
    env = running_engine
    to = f"127.0.0.1:{env['TRABOULE_MLLP_PORT']}"
    sent = cli("send", "fixtures/hl7/orm_o01_nw_latin1.hl7", "fixtures/hl7/orm_o01_no_pid3.hl7", "--to", to, env=env)
    assert sent.returncode == 1  # one message was not accepted
    assert "orm_o01_nw_latin1.hl7: AA" in sent.stdout
    assert "orm_o01_no_pid3.hl7: AE" in sent.stdout
    assert "MSA|AE|MSG0041" in sent.stdout

    port = int(env["TRABOULE_MWL_PORT"])
    found: list = []
    for _ in range(50):
        found = findscu(port, "TRABOULE", ["AccessionNumber", "ScheduledProcedureStepSequence[0].Modality=CT"])
        if found:
            break
        time.sleep(0.1)
    assert [ds.AccessionNumber for ds in found] == ["ACC0001"]

    listing = cli("worklist", "list", env=env)
    assert listing.returncode == 0 and "ACC0001" in listing.stdout and "1 item(s)" in listing.stdout
    journal = cli("journal", "list", env=env)
    assert "rejected" in journal.stdout and "accepted" in journal.stdout
    shown = cli("journal", "show", "2", env=env)
    assert "PID-3" in shown.stdout and "MSG0041" in shown.stdout

    cancel = cli("send", "fixtures/hl7/orm_o01_ca.hl7", "--to", to, env=env)
    assert cancel.returncode == 0
    for _ in range(50):
        found = findscu(port, "TRABOULE", ["AccessionNumber", "ScheduledProcedureStepSequence[0].Modality=CT"])
        if not found:
            break
        time.sleep(0.1)
    assert found == []


def test_cli_channels_lists_installed_and_configured(tmp_path: Path) -> None:
    out = cli("channels", env=dict(os.environ))
    assert out.returncode == 0
    assert "hl7-orders" in out.stdout and "worklist" in out.stdout and "mwl-scp" in out.stdout
    assert "ris-orders" in out.stdout and "configured channels, from the built-in defaults:" in out.stdout
    # A file extends the defaults unless it says otherwise: the heading says which.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    extending = tmp_path / "extends.toml"
    extending.write_text('[[channels]]\nname = "audit"\nkind = "audit-log"\ntopics = ["order.#"]\n')
    out = cli("--config", str(extending), "channels", env=env)
    assert f"configured channels, from the built-in defaults + {extending.resolve()}:" in out.stdout
    assert "  ris-orders " in out.stdout and "  audit " in out.stdout
    alone = tmp_path / "alone.toml"
    alone.write_text("[engine]\ndefaults = false\n" + extending.read_text())
    out = cli("--config", str(alone), "channels", env=env)
    assert f"configured channels, from {alone.resolve()} alone ([engine] defaults = false):" in out.stdout
    assert "  audit " in out.stdout and "  ris-orders " not in out.stdout


def test_two_channels_serving_one_route_are_refused_before_start(tmp_path: Path) -> None:
    """On the one HTTP address only the first of two routes with the same path would answer: `check` and `run`
    refuse the configuration, naming the route and both channels."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    env["TRABOULE_DATA_DIR"] = str(tmp_path / "var")
    assert cli("check", env=env).returncode == 0  # the defaults: /fhir in its process, forwarded by main
    second_api = tmp_path / "second.toml"  # another FHIR API, in the main process: /fhir twice
    second_api.write_text('[[channels]]\nname = "fhir-copy"\nkind = "fhir"\napi = true\n')
    for command in ("check", "run"):
        refused = cli("--config", str(second_api), command, env=env)
        assert refused.returncode == 2, refused.stderr
        assert "route /fhir/metadata is served by channel fhir (process fhir) and by channel fhir-copy" in (
            refused.stderr
        )
    webhook = tmp_path / "webhook.toml"  # a webhook on an engine route
    webhook.write_text(
        '[engine]\ndefaults = false\n[[channels]]\nname = "pacs"\nkind = "archive"\nwebhook = "/metrics"\n'
        'process = "archive"\ndicomweb = "http://127.0.0.1:8042/dicom-web"\n'
    )
    refused = cli("--config", str(webhook), "check", env=env)
    assert refused.returncode == 2
    assert "route /metrics is served by the engine and by channel pacs (process archive)" in refused.stderr


def test_broken_mapping_stops_start_up_with_file_and_line(tmp_path: Path) -> None:
    mapping = tmp_path / "mwl.yaml"
    mapping.write_text((ROOT / "mappings" / "mwl.yaml").read_text().replace("PatientName:", "PatientNam:", 1))
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path / "var"}"

[[channels]]
name = "worklist"
kind = "worklist"
mapping = "{mapping}"
"""
    )
    out = cli("--config", str(config), "run", env=dict(os.environ), timeout=20)
    assert out.returncode == 2
    line = next(i for i, t in enumerate(mapping.read_text().splitlines(), 1) if "PatientNam:" in t)
    assert f"{mapping}:{line}: 'PatientNam' is not a DICOM keyword" in out.stderr
    assert cli("--config", str(config), "check", env=dict(os.environ)).returncode == 2


async def test_documented_custom_channel_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example channel of docs/architecture.md, plugged in as a site would (by kind name)."""
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    monkeypatch.setitem(
        __import__("traboule.app.runtime", fromlist=["BUILTIN_CHANNELS"]).BUILTIN_CHANNELS,
        "audit",
        "audit_channel:AuditChannel",
    )
    cfg = engine_config(tmp_path)
    audit_file = tmp_path / "audit.jsonl"
    cfg.channels.append({"name": "audit", "kind": "audit", "file": str(audit_file)})
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"), fixture("orm_o01_ca.hl7"))
        await until(lambda: audit_file.exists() and len(audit_file.read_text().splitlines()) == 2)
    finally:
        await runtime.stop()
    topics = [json.loads(line)["topic"] for line in audit_file.read_text().splitlines()]
    assert topics == ["order.new", "order.cancel"]


async def test_dead_letters_can_be_listed_and_replayed(tmp_path: Path) -> None:
    cfg = engine_config(tmp_path)
    cfg.channels[1]["max_attempts"] = 1
    runtime = Runtime(cfg)
    channel: Any = runtime.channel("worklist")
    original = channel._changes
    channel._changes = lambda env, view: (_ for _ in ()).throw(RuntimeError("mapping bug"))
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path))
    await runtime.start()
    try:
        await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        await until(lambda: "1 dead letter" in cli("dlq", "list", env=env).stdout)
        listing = cli("dlq", "list", env=env).stdout
        assert "RuntimeError: mapping bug" in listing and "order.new" in listing
        message_id = listing.splitlines()[1].split()[0]
        channel._changes = original  # the fix is deployed
        assert cli("dlq", "replay", message_id, env=env).returncode == 0
        await until(lambda: store(runtime).count() == 1)
        assert "0 dead letter" in cli("dlq", "list", env=env).stdout
    finally:
        await runtime.stop()


async def test_rejected_message_is_replayed_from_the_journal(tmp_path: Path) -> None:
    runtime = Runtime(engine_config(tmp_path))
    await runtime.start()
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path))
    to = f"127.0.0.1:{runtime.channel('ris-orders').listener.port}"  # type: ignore[attr-defined]
    try:
        await send(runtime, fixture("orm_o01_no_pid3.hl7"))
        replay = await asyncio.to_thread(cli, "journal", "replay", "1", "--to", to, env=env)
        assert replay.returncode == 1 and "journal entry 1: AE" in replay.stdout
        assert runtime.journal is not None and len(runtime.journal.recent(10, "rejected")) == 2
    finally:
        await runtime.stop()


def test_operations_guide_configuration_loads(tmp_path: Path) -> None:
    """The configuration example of docs/operations.md is valid as written."""
    from traboule.app.config import load

    text = (ROOT / "docs" / "operations.md").read_text()
    example = text.split("```toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "traboule.toml"
    path.write_text(example)
    cfg = load(str(path), env={})
    assert [c["name"] for c in cfg.channels] == ["ris-orders", "worklist", "fhir"]  # the defaults, mpps disabled
    assert cfg.processes() == ["main", "worker", "fhir"]
    assert [d["adapter"] for d in cfg.channel("worklist")["destinations"]] == ["mwl-scp", "worklist-files"]
    source = cfg.channel("ris-orders")["source"]
    assert (source["host"], source["port"], source["adapter"]) == ("0.0.0.0", 2575, "mllp-listener")  # merged


async def test_journal_prune_keeps_what_is_recent_or_not_yet_on_the_bus(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    try:
        old = "2026-01-01T00:00:00.000+00:00"
        await journal.append(JournalEntry("ch", b"old delivered", "accepted", received=old, idempotency_key="a"))
        pending = await journal.append(
            JournalEntry("ch", b"old pending", "accepted", received=old, idempotency_key="b"),
            [OutboxEvent("order.new", "e1", b"{}")],
        )
        await journal.append(JournalEntry("ch", b"recent", "rejected"))
        assert journal.prune("2026-06-01T00:00:00.000+00:00") == 1
        assert sorted(e.raw for e in journal.recent(10)) == [b"old pending", b"recent"]
        assert journal.get(pending.id) is not None and journal.outbox_depth() == 1
    finally:
        journal.close()


async def test_journal_prune_keeps_the_entries_of_reports_waiting_for_their_study(tmp_path: Path) -> None:
    """A waiting report writes its outcome into its message's entry (and is dropped when that entry is gone):
    `journal prune` keeps the entries the reports stores of the inbound channels still need, however old."""
    from tests.test_reports import report_of, study
    from traboule.stores.reports import ReportPublisher, Waiting
    from traboule.translate.cda import CDAMapping

    data = tmp_path / "var"
    data.mkdir()
    publisher = ReportPublisher(CDAMapping(), data / "ris-orders.reports.sqlite")  # the default inbound channel's
    held = publisher.prepare(report_of(fixture("oru_r01_report.hl7")), "report-1")
    assert isinstance(held, Waiting)
    journal = Journal(data / "journal.sqlite")
    old = "2026-01-01T00:00:00.000+00:00"
    entry = JournalEntry("ris-orders", b"old report", "accepted", received=old, idempotency_key="report-1")
    report = await journal.append(entry)
    await journal.append(JournalEntry("ris-orders", b"old order", "accepted", received=old, idempotency_key="order-1"))
    journal.close()
    env = dict(os.environ, TRABOULE_DATA_DIR=str(data))

    pruned = cli("journal", "prune", "--older-than", "1", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert pruned.stdout.startswith("1 message(s)") and "1 report message(s) held for their study kept" in pruned.stdout
    journal = Journal(data / "journal.sqlite")
    try:
        assert [e.raw for e in journal.recent(10)] == [b"old report"]
        # Its study comes, the document is published and its event written into the entry: nothing holds it now.
        publisher.remember([study()])
        assert publisher.publish_waiting("report-1") is not None
        assert publisher.unnoted()  # the outcome is not in the journal yet: still kept
        assert cli("journal", "prune", "--older-than", "1", env=env).stdout.startswith("0 message(s)")
        publisher.noted(held.n, report.id)
    finally:
        journal.close()
        publisher.close()
    assert cli("journal", "prune", "--older-than", "1", env=env).stdout.startswith("1 message(s)")
    journal = Journal(data / "journal.sqlite")
    try:
        assert journal.recent(10) == []
    finally:
        journal.close()


async def test_the_journal_keeps_a_disk_reserve_and_health_says_so(tmp_path: Path) -> None:
    """A sender flooding the journal (every message is kept, refused ones too) fills the disk up to the reserve,
    not to the last byte: below it messages are answered AR "not stored" and /health names the disk."""
    import shutil

    cfg = engine_config(tmp_path)
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        assert runtime.journal is not None
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack.segment("MSA").field(1) == "AA"  # type: ignore[union-attr]
        # The reserve set just above what is free now: the next message would go below it.
        runtime.journal.min_free_bytes = shutil.disk_usage(tmp_path).free + 1024 * 1024
        (refused,) = await send(runtime, fixture("orm_o01_ca.hl7"))
        assert refused.segment("MSA").field(1) == "AR"  # type: ignore[union-attr]
        assert "not stored" in refused.segment("MSA").field(3)  # type: ignore[union-attr]
        health = runtime.health()
        assert "disk" in health["problems"] and health["disk"]["free_bytes"] < health["disk"]["reserve_bytes"]
        assert [e.status for e in runtime.journal.recent(10)] == ["accepted"]  # the refused one was not written
    finally:
        await runtime.stop()
