"""The engine's process tree comes back on its own, tells the truth about its health, and stops when asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.peer_dcmtk import free_port
from tests.test_engine import cli, engine_ports

FIXTURES = ROOT / "fixtures" / "hl7"


class Engine:
    """``traboule run`` in a child process, its JSON log lines gathered as they come."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "traboule.app.cli", *args, "run"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def events(self, name: str, process: str | None = None) -> list[dict]:
        """The log events called ``name`` (of one child's supervision when ``process`` is given)."""
        out = []
        for line in list(self.lines):
            if f'"{name}"' in line:
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if process is None or event.get("process") == process:
                        out.append(event)
        return out

    def wait_for(self, name: str, count: int = 1, timeout: float = 30.0, process: str | None = None) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name, process)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {count} x {name} in time; log tail: {''.join(self.lines[-15:])}")

    def health(self) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.env['TRABOULE_HTTP_PORT']}/health", timeout=5)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)


def engine_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ, TRABOULE_DATA_DIR=str(tmp_path / "var"), TRABOULE_LOG_FORMAT="json", **engine_ports(), **extra
    )


def fast_restarts(tmp_path: Path, reset_after: float = 60.0) -> Path:
    """Short restart delays (0.05 s doubling up to 0.5 s), and the worker as the only child (the fhir channel
    disabled: one start less each)."""
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"[engine]\nrestart_backoff = 0.05\nrestart_backoff_max = 0.5\nrestart_reset_after = {reset_after}\n"
        '\n[[channels]]\nname = "fhir"\nenabled = false\n',
        encoding="utf-8",
    )
    return config


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    started: list[Engine] = []
    yield started
    for engine in started:
        engine.stop()


def test_killing_the_main_process_takes_the_worker_with_it_and_a_restart_gets_its_ports(
    tmp_path: Path, engines: list[Engine]
) -> None:
    env = engine_env(tmp_path)
    first = Engine(env)
    engines.append(first)
    first.wait_for("engine.ready", process="main")
    children = {e["process"]: e["pid"] for e in first.events("process.started")}
    assert sorted(children) == ["fhir", "worker"]
    mwl, fhir_http = int(env["TRABOULE_MWL_PORT"]), int(env["TRABOULE_HTTP_PORT"]) + 2
    assert port_open(mwl) and port_open(fhir_http)

    first.proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
    first.proc.wait(10)
    until(lambda: not any(_alive(pid) for pid in children.values()), timeout=10)
    until(lambda: not port_open(mwl) and not port_open(fhir_http), timeout=10)

    second = Engine(env)
    engines.append(second)
    second.wait_for("engine.ready", process="main")
    assert port_open(mwl)
    assert second.health().status_code == 200
    assert second.stop() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_restart_delay_starts_again_after_a_healthy_period(tmp_path: Path, engines: list[Engine]) -> None:
    env = engine_env(tmp_path)
    engine = Engine(env, "--config", str(fast_restarts(tmp_path, reset_after=0.2)))
    engines.append(engine)
    engine.wait_for("engine.ready", process="main")
    for crash in range(1, 4):  # without the reset, the delays would be 0.05, 0.1, 0.2
        pid = engine.events("process.started", "worker")[-1]["pid"]
        until(lambda: engine.health().json()["processes"]["worker"]["state"] == "ready")
        time.sleep(0.3)  # healthy for longer than restart_reset_after
        os.kill(pid, signal.SIGKILL)
        engine.wait_for("process.started", count=crash + 1, process="worker")
    delays = [e["restart_in"] for e in engine.events("process.exited", "worker")]
    assert delays == [0.05, 0.05, 0.05]


def test_a_crash_loop_backs_off_up_to_the_cap(tmp_path: Path, engines: list[Engine]) -> None:
    env = engine_env(tmp_path)
    engine = Engine(env, "--config", str(fast_restarts(tmp_path)))
    engines.append(engine)
    engine.wait_for("engine.ready", process="main")
    for crash in range(1, 6):
        pid = engine.events("process.started", "worker")[-1]["pid"]
        os.kill(pid, signal.SIGKILL)
        engine.wait_for("process.started", count=crash + 1, process="worker")
    delays = [e["restart_in"] for e in engine.events("process.exited", "worker")]
    assert {e["process"] for e in engine.events("process.started")} == {"worker"}  # fhir disabled by the file
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.5]  # doubling, then the cap


def test_health_is_503_naming_the_worker_while_it_is_down(tmp_path: Path, engines: list[Engine]) -> None:
    env = engine_env(tmp_path)
    config = tmp_path / "traboule.toml"
    config.write_text("[engine]\nrestart_backoff = 5\n", encoding="utf-8")
    engine = Engine(env, "--config", str(config))
    engines.append(engine)
    engine.wait_for("engine.ready", process="main")
    # Ready means listening; the first /health may still see a child's bus connecting on a loaded machine.
    healthy = engine.health()
    deadline = time.monotonic() + 20
    while healthy.status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
        healthy = engine.health()
    assert healthy.status_code == 200, healthy.text
    body = healthy.json()
    assert body["status"] == "ok" and body["processes"]["worker"]["status"] == "ok"
    assert body["processes"]["fhir"]["status"] == "ok"
    assert body["bus"]["connected"] is True and body["outbox_pending"] == 0

    os.kill(body["processes"]["worker"]["pid"], signal.SIGKILL)
    engine.wait_for("process.exited")
    down = engine.health()
    assert down.status_code == 503
    assert down.json()["status"] == "degraded" and down.json()["problems"] == ["worker"]
    assert down.json()["processes"]["worker"]["state"] == "restarting"


def test_a_mapping_error_in_a_worker_channel_stops_the_start_before_anything_listens(tmp_path: Path) -> None:
    mapping = tmp_path / "mwl.yaml"
    mapping.write_text((ROOT / "mappings" / "mwl.yaml").read_text().replace("PatientName:", "PatientNam:", 1))
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"""
[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {{adapter = "mllp-listener", host = "127.0.0.1", port = 2575}}

[[channels]]
name = "worklist"
kind = "worklist"
process = "worker"
mapping = "{mapping}"
destinations = [{{adapter = "mwl-scp", port = 11112}}]
""",
        encoding="utf-8",
    )
    env = engine_env(tmp_path)
    started = time.monotonic()
    out = cli("--config", str(config), "run", env=env, timeout=30)
    assert out.returncode == 2
    assert time.monotonic() - started < 20
    assert "PatientNam" in out.stderr and str(mapping) in out.stderr
    assert '"listening"' not in out.stderr and "http.listening" not in out.stderr
    assert not port_open(int(env["TRABOULE_MLLP_PORT"]))


def test_sigterm_is_honoured_while_a_worker_cannot_start(tmp_path: Path, engines: list[Engine]) -> None:
    env = engine_env(tmp_path)
    blocker = socket.socket()  # the worker's HTTP port is taken: it exits at start, again and again
    blocker.bind(("127.0.0.1", int(env["TRABOULE_HTTP_PORT"]) + 1))
    blocker.listen()
    try:
        engine = Engine(env, "--config", str(fast_restarts(tmp_path)))
        engines.append(engine)
        engine.wait_for("process.exited", count=2, process="worker")
        assert engine.events("engine.ready", "main") == []
        health = httpx.get(f"http://127.0.0.1:{env['TRABOULE_HTTP_PORT']}/health", timeout=5)
        assert health.status_code == 503 and health.json()["processes"]["worker"]["status"] != "ok"
        asked = time.monotonic()
        assert engine.stop() == 0
        assert time.monotonic() - asked < 10
    finally:
        blocker.close()


def test_send_uses_the_configured_listener_and_says_where(tmp_path: Path, engines: list[Engine]) -> None:
    env = engine_env(tmp_path)
    engine = Engine(env)
    engines.append(engine)
    engine.wait_for("engine.ready", process="main")
    out = cli("send", str(FIXTURES / "orm_o01_nw_latin1.hl7"), env=env)
    assert out.returncode == 0, out.stderr
    assert "orm_o01_nw_latin1.hl7: AA" in out.stdout
    assert f"mllp://127.0.0.1:{env['TRABOULE_MLLP_PORT']}" in out.stderr


@pytest.mark.rabbitmq
def test_dlq_refuses_to_read_another_bus_than_the_engines_running_or_stopped(
    tmp_path: Path, engines: list[Engine], rabbitmq_url: str
) -> None:
    env = engine_env(tmp_path, TRABOULE_AMQP_URL=rabbitmq_url)
    engine = Engine(env)
    engines.append(engine)
    engine.wait_for("engine.ready", process="main")
    on_rabbitmq = cli("dlq", "list", env=env)
    assert on_rabbitmq.returncode == 0 and "0 dead letter(s)" in on_rabbitmq.stdout
    assert "rabbitmq amqp://127.0.0.1:" in on_rabbitmq.stderr and "guest" not in on_rabbitmq.stderr
    without = {k: v for k, v in env.items() if k != "TRABOULE_AMQP_URL"}
    refused = cli("dlq", "list", env=without)
    assert refused.returncode == 2
    assert "uses the bus rabbitmq" in refused.stderr and "dead letter" not in refused.stdout
    # Stopped, the engine's dead letters are still on RabbitMQ: the embedded bus is still the wrong one to read.
    assert engine.stop() == 0
    refused = cli("dlq", "list", env=without)
    assert refused.returncode == 2 and "last run on" in refused.stderr and "uses the bus rabbitmq" in refused.stderr
    assert not (tmp_path / "var" / "bus.sqlite").exists()  # nothing created by looking


async def test_health_is_degraded_with_the_backlog_while_the_broker_is_unreachable(tmp_path: Path) -> None:
    from tests.test_flow import engine_config, fixture, send
    from traboule.app.http import create_app, serve
    from traboule.app.runtime import Runtime

    closed = free_port()  # nothing listens there: the broker is down for the whole test
    runtime = Runtime(engine_config(tmp_path, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/"))
    await runtime.start()
    port = free_port()
    server = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
        assert ack.segment("MSA").field(1) == "AA"  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            health = await client.get("/health")
            live = await client.get("/health/live")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "degraded" and body["problems"] == ["bus"]
        assert body["bus"]["connected"] is False and body["bus"]["backend"] == "rabbitmq"
        assert body["outbox_pending"] == 1
        assert "guest" not in health.text
        assert live.status_code == 200 and live.json()["started"] is True
    finally:
        server.should_exit = True
        await server.task
        await runtime.stop()


def test_dlq_on_a_folder_no_engine_used_says_so(tmp_path: Path) -> None:
    out = cli("dlq", "list", env=dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "nothing")))
    assert out.returncode == 2 and "no engine has run" in out.stderr
    assert not (tmp_path / "nothing" / "bus.sqlite").exists()
