"""The deployment files of deploy/ (docs/operations.md, "Deployment"): the systemd unit passes `systemd-analyze
verify` and carries the hardening the docs promise; HAProxy accepts its configuration and, run for real in front of
an engine started with deploy/node.toml, passes MLLP and C-FIND through its health checks (bearer token, the
worker's own port) while skipping a node that is down, and takes the node out of MLLP and MPPS while its database
is stopped; `traboule check` accepts node.toml with a real PostgreSQL;
a libpq multi-host URL with ``target_session_attrs=read-write`` reaches the writable server through the engine's
`connect`; and PostgreSQL down, then back, behaves as the failure table says."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import psycopg
import pytest

from tests.conftest import ROOT
from tests.peer_dcmtk import findscu, require_dcmtk
from tests.peer_postgres import PostgresServer, _bin_dir, _free_port, _run_as, _wait_ready, run_postgres
from tests.test_engine import cli, free_port_run
from tests.test_flow import CT_QUERY, ack_code, engine_config, fixture, free_port, send, store, until
from traboule.adapters.mllp import MLLPClient
from traboule.app.config import load
from traboule.app.http import create_app
from traboule.app.runtime import Runtime
from traboule.formats import hl7
from traboule.stores.postgres import connect, redact

pytestmark = pytest.mark.timeout(120)

DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "traboule.service"
NODE = DEPLOY / "node.toml"
HAPROXY = DEPLOY / "haproxy.cfg"
TOKEN = "deploy-test-token-0123456789"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


def test_the_unit_has_what_the_docs_promise() -> None:
    unit = _unit()
    service = unit["Service"]
    assert service["ExecStart"].endswith("traboule --config /etc/traboule/node.toml run")
    assert service["EnvironmentFile"] == "/etc/traboule/traboule.env"
    assert service["User"] == "traboule" and service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict" and service["PrivateTmp"] == "true"
    assert service["Restart"] == "always" and 1 <= float(service["RestartSec"]) <= 30
    assert service["RestartPreventExitStatus"] == "2" and service["KillMode"] == "mixed"
    assert int(service["LimitNOFILE"]) >= 65536
    # The one writable place is the data folder node.toml names.
    data_dir = load(str(NODE), env={"TRABOULE_API_TOKENS": TOKEN}).data_dir
    assert service["ReadWritePaths"].split() == [data_dir]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    example = (DEPLOY / "traboule.env.example").read_text(encoding="utf-8")
    assert re.search(r"^TRABOULE_DATABASE_URL=postgresql://.*target_session_attrs=read-write", example, re.M)


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's program exists: this checkout's instead of /opt/traboule's.
    local = tmp_path / "traboule.service"
    traboule = Path(sys.executable).parent / "traboule"
    local.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/traboule/.venv/bin/traboule", str(traboule)))
    verified = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr
    broken = tmp_path / "broken.service"  # the check itself sees a mistake
    broken.write_text(local.read_text(encoding="utf-8").replace("KillMode=mixed", "KillMode=gently"))
    refused = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse kill mode" in refused.stderr


def test_haproxy_balances_every_port_with_health_checks() -> None:
    text = HAPROXY.read_text(encoding="utf-8")
    backends = dict(re.findall(r"^backend (\S+)\n(.*?)(?=^\S|\Z)", text, re.M | re.S))
    assert set(backends) == {"mllp_nodes", "mwl_nodes", "mpps_nodes"}
    for name, body in backends.items():
        servers = re.findall(r"^\s+server (\S+) \S+ (.*)$", body, re.M)
        assert [s for s, _ in servers] == ["node-1", "node-2"] and all("check" in o for _, o in servers), name
        assert "uri /health/live" in body and 'hdr Authorization "Bearer ' in body, name
    assert "uri /health " in backends["mllp_nodes"] and "connect port 8081" in backends["mwl_nodes"]
    for name in ("mllp_nodes", "mpps_nodes"):  # out when "database" is among the problems of /health
        assert 'http-check expect ! rstring "\\"problems\\"' in backends[name], name
    assert re.findall(r"^\s+bind :(\d+)$", text, re.M) == ["2575", "11112", "11113"]
    if shutil.which("haproxy") is None:
        return
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_node_toml_passes_traboule_check_with_a_database(pg_url: str) -> None:
    env = dict(os.environ, TRABOULE_DATABASE_URL=pg_url, TRABOULE_API_TOKENS=TOKEN)
    for name in ("TRABOULE_CONFIG", "TRABOULE_DATA_DIR", "TRABOULE_AMQP_URL", "TRABOULE_HTTP_HOST"):
        env.pop(name, None)
    checked = cli("--config", str(NODE), "check", env=env, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for channel in ("ris-orders", "worklist", "mpps", "fhir"):
        assert f"ok  {channel} (" in checked.stdout
    (database,) = re.findall(r"^ok  database: (.*) on postgresql \(", checked.stdout, re.M)
    assert {"journal", "worklist", "fhir", "patients"} <= set(database.split(", "))
    # No warning: a broker list is configured (check does not reach it), the database answers.
    assert not re.search(r"^warn ", checked.stdout, re.M)
    cfg = load(str(NODE), env={"TRABOULE_API_TOKENS": TOKEN})
    assert cfg.queue_type == "quorum" and len(cfg.amqp_url.split(",")) == 3
    listeners = [cfg.channel("ris-orders")["source"]] + [
        d for name in ("worklist", "mpps") for d in cfg.channel(name)["destinations"]
    ]
    assert [(d["host"], d["port"]) for d in listeners] == [("0.0.0.0", 2575), ("0.0.0.0", 11112), ("0.0.0.0", 11113)]
    without_token = cli("--config", str(NODE), "check", env={**env, "TRABOULE_API_TOKENS": ""}, timeout=60)
    assert without_token.returncode == 2 and "without access control" in without_token.stderr


def test_a_multi_host_url_reaches_the_writable_server(pg_url: str) -> None:
    """libpq tries the hosts in turn: a dead first host is skipped; ``target_session_attrs=read-write`` refuses a
    read-only server (what a standby is), the URL's password is never shown."""
    live = psycopg.conninfo.conninfo_to_dict(pg_url)
    dead = _free_port()
    url = (
        f"postgresql://{live['user']}:secret-pw@127.0.0.1:{dead},127.0.0.1:{live['port']}/{live['dbname']}"
        "?target_session_attrs=read-write"
    )
    with connect(url) as conn:
        assert conn.info.port == int(live["port"])
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    assert redact(url) == (
        f"postgresql://{live['user']}:***@127.0.0.1:{dead},127.0.0.1:{live['port']}/{live['dbname']}"
        "?target_session_attrs=read-write"
    )
    with connect(pg_url) as conn:
        conn.execute(f"ALTER DATABASE {live['dbname']} SET default_transaction_read_only = on")
    with pytest.raises(psycopg.OperationalError, match="read-only"):
        connect(url).close()
    with connect(url.replace("read-write", "any")) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)


# -- HAProxy for real, in front of an engine run with node.toml -------------------------------------------------


@contextlib.contextmanager
def _engine_with_node_toml(tmp_path: Path, pg_url: str) -> Iterator[dict[str, str]]:
    env = dict(
        os.environ,
        TRABOULE_DATA_DIR=str(tmp_path / "var"),
        TRABOULE_DATABASE_URL=pg_url,
        TRABOULE_API_TOKENS=TOKEN,
        TRABOULE_AMQP_URL="",  # the embedded bus: one node in this test
        TRABOULE_HTTP_HOST="127.0.0.1",
        TRABOULE_LOG_FORMAT="json",
        TRABOULE_MLLP_PORT=str(free_port()),
        TRABOULE_MWL_PORT=str(free_port()),
        TRABOULE_MPPS_PORT=str(free_port()),
        TRABOULE_HTTP_PORT=str(free_port_run()),
    )
    env.pop("TRABOULE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "traboule.app.cli", "--config", str(NODE), "run"],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if '"engine.ready"' in line and json.loads(line).get("process") == "main":  # the children say it too
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"the engine did not start: {line}")
    _drain(proc.stderr)
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def _drain(stream: IO[str]) -> None:
    """Keep reading a child's output so that it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()


def _server_states(socket_path: Path) -> dict[tuple[str, str], str]:
    """(backend, server) → UP / DOWN..., from HAProxy's stats socket (``show stat``)."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(socket_path))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {(r["pxname"], r["svname"]): r["status"] for r in rows if r["svname"].startswith("node-")}


def _until_states(stats: Path, expected: dict[tuple[str, str], str], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (states := _server_states(stats)) != expected:
        assert time.monotonic() < deadline, states
        time.sleep(0.2)


def _haproxy_config(env: dict[str, str], ports: dict[str, int], stats: Path) -> str:
    """deploy/haproxy.cfg on loopback: its frontends on free ports, node-1 the engine (127.0.0.1), node-2 down
    (127.0.0.2: neither its service nor its health check port answers)."""
    http = int(env["TRABOULE_HTTP_PORT"])
    text = HAPROXY.read_text(encoding="utf-8").replace("CHANGE-ME", TOKEN)
    text = text.replace("log stdout format raw local0", "log stderr format raw local0")
    text = text.replace("global\n", f"global\n    stats socket {stats} mode 600 level admin\n", 1)
    for service, (listen, engine) in {
        "2575": (ports["mllp"], env["TRABOULE_MLLP_PORT"]),
        "11112": (ports["mwl"], env["TRABOULE_MWL_PORT"]),
        "11113": (ports["mpps"], env["TRABOULE_MPPS_PORT"]),
    }.items():
        text = text.replace(f"bind :{service}\n", f"bind 127.0.0.1:{listen}\n")
        text = text.replace(f"10.0.0.11:{service} ", f"127.0.0.1:{engine} ")
        text = text.replace(f"10.0.0.12:{service} ", f"127.0.0.2:{ports['dead']} ")  # nothing listens there
    text = text.replace("connect port 8080", f"connect port {http}").replace(
        "connect port 8081", f"connect port {http + 1}"
    )
    return text.replace("inter 2s", "inter 200ms")


async def _send_through(port: int, message: bytes) -> str:
    async with MLLPClient("127.0.0.1", port, timeout=10) as client:
        return ack_code(hl7.parse(hl7.decode(await client.send(message)).text))


def test_haproxy_passes_mllp_and_c_find_to_the_node_its_checks_find_up(tmp_path: Path) -> None:
    """node-1 (the engine) up and node-2 (nothing) down on every backend; MLLP and C-FIND pass. The database
    stopped: node-1 out of the MLLP and MPPS backends ("database" among the problems of /health), still in the MWL
    one (its worker is alive); the database back: in again, without a restart."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed")
    require_dcmtk("findscu")
    with run_postgres() as server, _engine_with_node_toml(tmp_path, server.url(server.create_database())) as env:
        ports = {"mllp": free_port(), "mwl": free_port(), "mpps": free_port(), "dead": free_port()}
        config = tmp_path / "haproxy.cfg"
        stats = tmp_path / "haproxy.sock"
        config.write_text(_haproxy_config(env, ports, stats), encoding="utf-8")
        log = tmp_path / "haproxy.log"
        with log.open("w") as out:
            proxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            codes: list[str] = []
            while time.monotonic() < deadline:  # until a connection reaches node-1 (node-2 refuses them)
                with contextlib.suppress(Exception):
                    codes.append(asyncio.run(_send_through(ports["mllp"], fixture("orm_o01_nw_latin1.hl7"))))
                    if codes[-1] == "AA":
                        break
                time.sleep(0.2)
            assert codes and codes[-1] == "AA", (codes, log.read_text())
            # The checks (a bearer token, the main process's and the worker's ports) find node-1 up, node-2 down.
            expected = {(b, n): "UP" if n == "node-1" else "DOWN" for b in ("mllp_nodes", "mwl_nodes", "mpps_nodes")
                        for n in ("node-1", "node-2")}  # fmt: skip
            _until_states(stats, expected)
            for _ in range(4):  # every connection goes to node-1
                assert asyncio.run(_send_through(ports["mllp"], fixture("omi_o23_nw_utf8.hl7"))) == "AA"

            def found() -> list[str]:
                try:
                    return [str(ds.AccessionNumber) for ds in findscu(ports["mwl"], "TRABOULE", CT_QUERY)]
                except Exception:  # the MWL backend not up yet
                    return []

            deadline = time.monotonic() + 20
            while found() != ["ACC0001"]:  # through the MWL backend, checked on the worker's own port
                assert time.monotonic() < deadline, "no C-FIND answer through HAProxy"
                time.sleep(0.2)

            assert server.process is not None
            server.process.send_signal(signal.SIGINT)  # the database stops
            server.process.wait(15)
            without_database = {**expected, ("mllp_nodes", "node-1"): "DOWN", ("mpps_nodes", "node-1"): "DOWN"}
            _until_states(stats, without_database)
            _start_again(server)
            _until_states(stats, expected, timeout=30)
        finally:
            proxy.send_signal(signal.SIGTERM)
            proxy.wait(10)


# -- PostgreSQL down, then back ---------------------------------------------------------------------------------


def _start_again(server: PostgresServer) -> None:
    """Start the stopped cluster again on its data folder and port (as `run_postgres` first did)."""
    bin_dir = _bin_dir()
    assert bin_dir is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C", "TZ": "UTC"}
    settings = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(server.base), "fsync": "on"}
    with (server.base / "server.log").open("ab") as log:
        server.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(server.base / "data"), "-p", str(server.port)]
            + [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")],
            cwd=server.base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **_run_as(),  # type: ignore[arg-type]
        )
    _wait_ready(server)


async def test_postgres_down_answers_ar_fails_health_and_recovers_without_restart(tmp_path: Path) -> None:
    with run_postgres() as server:
        cfg = engine_config(tmp_path)
        cfg.database_url = server.url(server.create_database())
        runtime = Runtime(cfg)
        await runtime.start()
        try:
            (ack,) = await send(runtime, fixture("orm_o01_nw_latin1.hl7"))
            assert ack_code(ack) == "AA"
            await until(lambda: store(runtime).count() == 1)
            assert server.process is not None
            server.process.send_signal(signal.SIGINT)  # fast shutdown: every session is closed
            server.process.wait(15)

            transport = httpx.ASGITransport(app=create_app(runtime), raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                assert (await client.get("/health/live")).status_code == 200
                health = await client.get("/health")  # what takes the node out of HAProxy's MLLP backend
                assert health.status_code == 503 and "database" in health.json()["problems"], health.text
            (ack,) = await send(runtime, fixture("omi_o23_nw_utf8.hl7"))
            msa = ack.segment("MSA")
            assert msa is not None and (msa.field(1), msa.field(3)) == ("AR", "message not stored, send it again later")

            await asyncio.to_thread(_start_again, server)
            (ack,) = await send(runtime, fixture("omi_o23_nw_utf8.hl7"))
            assert ack_code(ack) == "AA"

            def items() -> int:
                try:
                    return int(store(runtime).count())
                except psycopg.OperationalError:  # a pooled connection the restart cut: fails once, then reopened
                    return -1

            await until(lambda: items() == 2, timeout=30)
            async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
                deadline = asyncio.get_running_loop().time() + 15
                while (health := await client.get("/health")).status_code != 200:  # its last answer kept a moment
                    assert asyncio.get_running_loop().time() < deadline, health.text
                    await asyncio.sleep(0.2)
        finally:
            await runtime.stop()
