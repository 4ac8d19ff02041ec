"""The default configuration is the whole local loop, a configuration file extends it, and one HTTP address serves
every route whichever process runs the channel behind it."""

from __future__ import annotations

import asyncio
import contextlib
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
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep

import traboule.app.http
from tests.conftest import ROOT
from tests.peer_dcmtk import findscu
from tests.test_engine import cli, engine_ports, free_port_run
from tests.test_http_limits import exchange, head, read_answer
from tests.test_mpps import completed, in_progress
from traboule.app.config import DEFAULT_CHANNELS, Config, ConfigError, load
from traboule.app.http import create_app, serve
from traboule.app.runtime import ProcessState, Runtime, check_listeners

TOKEN = "0123456789abcdef0123456789abcdef"
REMOTE_KINDS = {"archive", "hl7-status", "xds", "hl7-documents"}


# -- the defaults -----------------------------------------------------------------------------------------------


def test_the_default_configuration_is_the_whole_local_loop() -> None:
    cfg = load(env={})
    assert [(c["name"], c["kind"], c.get("process", "main")) for c in cfg.channels] == [
        ("ris-orders", "hl7-orders", "main"),
        ("worklist", "worklist", "worker"),
        ("mpps", "mpps", "main"),
        ("fhir", "fhir", "fhir"),
    ]
    assert cfg.processes() == ["main", "worker", "fhir"]
    assert [cfg.http_port_of(p) for p in cfg.processes()] == [8080, 8081, 8082]
    orders = cfg.channel("ris-orders")
    assert orders["source"] == {"adapter": "mllp-listener", "host": "127.0.0.1", "port": 2575}
    assert orders["reports"] == {"validate": "auto"}
    assert cfg.channel("worklist")["destinations"][0] | {"adapter": "mwl-scp"} == {
        "adapter": "mwl-scp",
        "host": "127.0.0.1",
        "port": 11112,
        "ae_title": "TRABOULE",
    }
    assert cfg.channel("mpps")["destinations"] == [
        {"adapter": "mpps-scp", "host": "127.0.0.1", "port": 11113, "ae_title": "TRABOULE"}
    ]
    fhir = cfg.channel("fhir")
    assert fhir["api"] is True and "destination" not in fhir  # no FHIR server unless configured
    assert not REMOTE_KINDS & {c["kind"] for c in cfg.channels}
    # Every address is loopback.
    hosts = [cfg.http_host, orders["source"]["host"]]
    hosts += [d["host"] for c in cfg.channels for d in c.get("destinations", [])]
    assert set(hosts) == {"127.0.0.1"}


def test_the_mpps_listener_follows_its_environment_variables() -> None:
    cfg = load(env={"TRABOULE_MPPS_PORT": "4104", "TRABOULE_MPPS_AE_TITLE": "RADIO_MPPS"})
    (scp,) = cfg.channel("mpps")["destinations"]
    assert (scp["port"], scp["ae_title"]) == (4104, "RADIO_MPPS")
    assert cfg.channel("worklist")["destinations"][0]["port"] == 11112  # the MWL SCP is another listener
    with pytest.raises(ConfigError, match="environment"):
        load(env={"TRABOULE_MPPS_PORT": "eleven"})


# -- a file extends the defaults --------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "traboule.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_a_file_adds_changes_and_removes_channels(tmp_path: Path) -> None:
    cfg = load(
        write(
            tmp_path,
            """
[[channels]]
name = "archive"                       # a new name: added
kind = "archive"
dicomweb = "http://127.0.0.1:8042/dicom-web"

[[channels]]
name = "ris-orders"                    # a default's name: merged over it
source = {port = 3575, max_connections = 8}
reports = {validators = "/opt/testContenuCDA"}

[[channels]]
name = "worklist"
kind = "worklist"
destinations = [{adapter = "worklist-files", folder = "/srv/wl"}]

[[channels]]
name = "mpps"
enabled = false
""",
        ),
        env={},
    )
    assert [c["name"] for c in cfg.channels] == ["ris-orders", "worklist", "fhir", "archive"]
    orders = cfg.channel("ris-orders")
    # Tables merged key by key: the default's host and adapter stay.
    assert orders["source"] == {"adapter": "mllp-listener", "host": "127.0.0.1", "port": 3575, "max_connections": 8}
    assert orders["reports"] == {"validate": "auto", "validators": "/opt/testContenuCDA"}
    assert orders["mapping"] == "mappings/hl7_inbound.yaml" and orders["kind"] == "hl7-orders"
    worklist = cfg.channel("worklist")
    assert worklist["destinations"] == [{"adapter": "worklist-files", "folder": "/srv/wl"}]  # a list is replaced
    assert worklist["process"] == "worker" and worklist["topics"] == ["order.#", "patient.#", "procedure.#"]
    assert cfg.channel("archive")["dicomweb"] == "http://127.0.0.1:8042/dicom-web"
    assert "enabled" not in cfg.channel("archive")
    # The defaults themselves are untouched for the next load.
    assert DEFAULT_CHANNELS[0]["source"]["port"] == 2575 and "validators" not in DEFAULT_CHANNELS[0]["reports"]
    assert len(DEFAULT_CHANNELS) == 4


def test_a_file_with_only_a_new_channel_keeps_the_whole_loop(tmp_path: Path) -> None:
    path = write(tmp_path, '[[channels]]\nname = "archive"\nkind = "archive"\ndicomweb = "http://pacs/dicom-web"\n')
    names = [c["name"] for c in load(path, env={}).channels]
    assert names == ["ris-orders", "worklist", "mpps", "fhir", "archive"]


def test_defaults_false_runs_only_the_files_channels(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[engine]
defaults = false

[[channels]]
name = "ris-orders"
kind = "hl7-orders"
source = {adapter = "mllp-listener", port = 2575}
""",
    )
    cfg = load(path, env={"TRABOULE_MWL_PORT": "4000", "TRABOULE_MPPS_PORT": "4001"})
    assert cfg.channels == [
        {"name": "ris-orders", "kind": "hl7-orders", "source": {"adapter": "mllp-listener", "port": 2575}}
    ]
    assert cfg.processes() == ["main"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[channels]]\nname = "worklist"\nkind = "fhir"\n', "is a default worklist channel, not fhir"),
        ('[[channels]]\nname = "a"\nkind = "fhir"\n[[channels]]\nname = "a"\nkind = "fhir"\n', "appears twice"),
        ('[[channels]]\nname = "mpps"\nenabled = "no"\n', "enabled must be true or false"),
        ('[engine]\ndefaults = "no"\n', "defaults must be true or false"),
        ('[[channels]]\nkind = "fhir"\n', "needs 'name' and 'kind'"),
    ],
)
def test_an_ambiguous_file_is_refused_with_the_reason(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load(write(tmp_path, text), env={})


FORMER_DEFAULTS = """
[[channels]]
name = "orders"
kind = "hl7-orders"
source = { adapter = "mllp-listener", host = "127.0.0.1", port = 2575 }

[[channels]]
name = "mwl"
kind = "worklist"
process = "worker"
destinations = [{adapter = "mwl-scp", host = "127.0.0.1", port = 11112, ae_title = "TRABOULE"}]
"""


def test_two_listeners_on_one_address_are_refused_before_start(tmp_path: Path) -> None:
    """A file written for the former defaults adds its channels beside today's, on their ports: `check` said ok
    and `run` stopped on "address already in use". Now both refuse it, naming both channels and the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    env["TRABOULE_DATA_DIR"] = str(tmp_path / "var")
    former = write(tmp_path, FORMER_DEFAULTS)
    for command in ("check", "run"):
        refused = cli("--config", former, command, env=env)
        assert refused.returncode == 2, refused.stderr
        text = " ".join(refused.stderr.split())
        assert "channel ris-orders (MLLP) and channel orders (MLLP) both listen on 127.0.0.1:2575" in text
        assert "channel worklist (MWL) and channel mwl (MWL) both listen on 127.0.0.1:11112" in text
        assert "`[engine] defaults = false`" in text
    assert check_listeners(load(write(tmp_path, "[engine]\ndefaults = false\n" + FORMER_DEFAULTS), env={})) is None
    renamed = FORMER_DEFAULTS.replace('"orders"', '"ris-orders"').replace('"mwl"', '"worklist"')
    assert check_listeners(load(write(tmp_path, renamed), env={})) is None  # the defaults changed, not doubled

    cfg = load(env={})
    cfg.channel("ris-orders")["source"]["port"] = cfg.http_port_of("fhir")
    with pytest.raises(ConfigError, match=r"the HTTP port of process fhir and channel ris-orders \(MLLP\) both"):
        check_listeners(cfg)
    cfg = load(env={})
    cfg.channel("mpps")["destinations"][0].update(host="0.0.0.0", port=11112)  # every address: 127.0.0.1's too
    with pytest.raises(ConfigError, match=r"channel worklist \(MWL\) and channel mpps \(MPPS\) both listen"):
        check_listeners(cfg)
    cfg.channel("mpps")["destinations"][0].update(host="127.0.0.2")  # another address: both can bind
    assert check_listeners(cfg) is None


# -- one HTTP address: forwarding, in one test process ----------------------------------------------------------


async def test_the_main_address_forwards_with_its_own_limits_and_tokens(tmp_path: Path) -> None:
    """The main app answers the fhir process's routes: forwarded after its own token check and body limit, 503
    while that process is not ready or not answering."""
    cfg = Config(data_dir=str(tmp_path), http_port=free_port_run(), api_tokens=[TOKEN])
    cfg.channels = [c for c in cfg.channels if c["name"] == "fhir"]  # alone in its process: the main one has none
    cfg.channels[0]["mapping"] = str(ROOT / "mappings" / "fhir.yaml")
    assert cfg.processes() == ["main", "fhir"]
    main, child = Runtime(cfg, process="main"), Runtime(cfg, process="fhir")
    await main.start()
    await child.start()
    main_server = await serve(create_app(main), "127.0.0.1", cfg.http_port)
    child_server = await serve(create_app(child), "127.0.0.1", cfg.http_port_of("fhir"))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.http_port}", trust_env=False) as client:
            metadata = await client.get("/fhir/metadata", headers=auth)
            assert metadata.status_code == 200 and metadata.json()["resourceType"] == "CapabilityStatement"
            # Links name the address the client used, not the child's port.
            assert metadata.json()["implementation"]["url"] == f"http://127.0.0.1:{cfg.http_port}/fhir"
            assert metadata.headers["content-type"] == "application/fhir+json"
            assert len(metadata.headers.get_list("date")) == 1
            search = await client.get("/fhir/Patient", params={"identifier": "urn:oid:1.2|IPP 1"}, headers=auth)
            assert search.status_code == 200 and search.json()["total"] == 0
            assert "identifier=urn%3Aoid%3A1.2%7CIPP+1" in search.json()["link"][0]["url"]
            assert (await client.get("/fhir/Patient/nobody", headers=auth)).status_code == 404
            refused = await client.post("/fhir/Patient", json={"resourceType": "Patient"}, headers=auth)
            assert refused.status_code == 405 and refused.json()["resourceType"] == "OperationOutcome"

            unauthorized = await client.get("/fhir/metadata")
            assert unauthorized.status_code == 401 and unauthorized.json()["resourceType"] == "OperationOutcome"
            too_big = await client.post("/fhir/Patient", content=b"x" * (2 * 1024 * 1024), headers=auth)
            assert too_big.status_code == 413 and too_big.json()["issue"][0]["code"] == "too-long"
            assert await chunked_until_answered(cfg.http_port, "/fhir/Patient") == 413  # counted while forwarded

            everything = (await client.get("/metrics", headers=auth)).text
            families = [line.split()[2] for line in everything.splitlines() if line.startswith("# TYPE")]
            assert len(families) == len(set(families))  # each family once, its samples from every process
            assert 'traboule_process_up{process="fhir"} 1.0' in everything
            assert 'traboule_outbox_pending{process="main"}' in everything
            assert 'traboule_outbox_pending{process="fhir"}' in everything

            main.processes["fhir"] = ProcessState("fhir", cfg.http_port_of("fhir"), state="restarting")
            restarting = await client.get("/fhir/metadata", headers=auth)
            assert restarting.status_code == 503 and restarting.headers["retry-after"] == "1"
            assert restarting.json()["issue"][0]["code"] == "transient"
            assert "fhir process" in restarting.json()["issue"][0]["diagnostics"]

            main.processes["fhir"].set("ready")
            child_server.should_exit = True
            await child_server.task  # the child's port closes: it died without its supervisor knowing yet
            gone = await client.get("/fhir/Patient", params={"identifier": "x"}, headers=auth)
            assert gone.status_code == 503 and gone.json()["resourceType"] == "OperationOutcome"
            assert 'traboule_process_up{process="fhir"} 0.0' in (await client.get("/metrics", headers=auth)).text
            assert (await client.get("/health/live", headers=auth)).status_code == 200  # the main one still answers
    finally:
        child_server.should_exit = True
        main_server.should_exit = True
        await main_server.task
        await child.stop()
        await main.stop()


async def chunked_until_answered(port: int, path: str) -> int:
    """POST a chunked body (no Content-Length) until the server answers; its status. At most 16 MiB sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head("POST", path, "Transfer-Encoding: chunked", f"Authorization: Bearer {TOKEN}"))
    chunk, sent, answer = b"x" * 65536, 0, None
    try:
        while sent < 16 * 1024 * 1024 and answer is None:
            with contextlib.suppress(ConnectionError):
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
            with contextlib.suppress(TimeoutError):
                answer = await read_answer(reader, timeout=0.01)
    finally:
        writer.close()
    assert answer is not None and sent < 4 * 1024 * 1024, (answer, sent)  # the 1 MiB limit and what was in flight
    return answer.status


@contextlib.asynccontextmanager
async def forwarding(tmp_path: Path) -> Any:
    """The fhir channel alone in its process, served by a main app that forwards to it (no tokens: loopback)."""
    cfg = Config(data_dir=str(tmp_path), http_port=free_port_run())
    cfg.channels = [c for c in cfg.channels if c["name"] == "fhir"]
    cfg.channels[0]["mapping"] = str(ROOT / "mappings" / "fhir.yaml")
    main, child = Runtime(cfg, process="main"), Runtime(cfg, process="fhir")
    await main.start()
    await child.start()
    main_server = await serve(create_app(main), "127.0.0.1", cfg.http_port)
    child_server = await serve(create_app(child), "127.0.0.1", cfg.http_port_of("fhir"))
    try:
        yield cfg
    finally:
        child_server.should_exit = main_server.should_exit = True
        await main_server.task
        await child_server.task
        await child.stop()
        await main.stop()


async def test_slow_request_bodies_do_not_hold_the_connections_to_a_child(tmp_path: Path) -> None:
    """110 clients trickling a search body hold their own server slots only: a quick request is forwarded at
    once (the bodies were streamed to the child, 100 connections at most: 504 after 5 s)."""
    async with forwarding(tmp_path) as cfg:
        form = ("Content-Type: application/x-www-form-urlencoded", "Content-Length: 10000")
        slow = []
        for _ in range(110):
            reader, writer = await asyncio.open_connection("127.0.0.1", cfg.http_port)
            writer.write(head("POST", "/fhir/Patient/_search", *form) + b"i")
            slow.append((reader, writer))
        try:
            await asyncio.sleep(0.5)  # every slow request is in the forwarder, waiting for its body
            started = time.monotonic()
            async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
                metadata = await client.get(f"http://127.0.0.1:{cfg.http_port}/fhir/metadata")
            assert metadata.status_code == 200 and time.monotonic() - started < 2, metadata.text
            # A whole body is forwarded as before.
            reader, writer = slow[0]
            writer.write(b"dentifier=x&unknown=".ljust(9999, b"y"))  # an unknown parameter: ignored
            answer = await read_answer(reader, timeout=10)
            assert answer.status == 200 and b'"total":0' in answer.body.replace(b" ", b"")
            # A GET with a body is refused at once, the body unread.
            got = await exchange(cfg.http_port, head("GET", "/fhir/metadata", "Content-Length: 100000") + b"a")
            assert got.status == 400 and got.headers["connection"] == "close"
            assert b"carries no body" in got.body
            chunked = head("GET", "/fhir/Patient", "Transfer-Encoding: chunked") + b"1\r\na\r\n0\r\n\r\n"
            assert (await exchange(cfg.http_port, chunked)).status == 400
        finally:
            for _, writer in slow:
                writer.close()


async def test_the_bodies_the_forwarder_holds_are_bounded_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each body is read whole before it is forwarded: beyond FORWARD_BUFFER bytes for all requests in progress,
    503 with Retry-After, until the bodies held are sent on."""
    monkeypatch.setattr(traboule.app.http, "FORWARD_BUFFER", 20_000)
    form = ("Content-Type: application/x-www-form-urlencoded", "Content-Length: 12000")
    body = b"identifier=x&unknown=".ljust(12000, b"y")
    async with forwarding(tmp_path) as cfg:
        reader, writer = await asyncio.open_connection("127.0.0.1", cfg.http_port)
        writer.write(head("POST", "/fhir/Patient/_search", *form) + body[:11000])  # held: 11,000 bytes
        await asyncio.sleep(0.3)
        busy = await exchange(cfg.http_port, head("POST", "/fhir/Patient/_search", *form) + body)
        assert busy.status == 503 and busy.headers["retry-after"] == "1"
        writer.write(body[11000:])
        assert (await read_answer(reader, timeout=10)).status == 200
        writer.close()
        assert (await exchange(cfg.http_port, head("POST", "/fhir/Patient/_search", *form) + body)).status == 200


@pytest.mark.parametrize(
    "target",
    [
        "/fhir/../health",
        "/fhir/Patient/../../channels",
        "/fhir/./metadata",
        "/fhir/%2e%2e/health",
        "/fhir/Patient/%2E%2E/.%2e/channels",
        "/fhir/Patient%2F..%2F..%2Fchannels",
    ],
)
async def test_a_forwarded_path_never_leaves_its_route(tmp_path: Path, target: str) -> None:
    """Dot segments, literal or encoded, are refused: resolved on the way, they reached the child's own
    /health and /channels."""
    async with forwarding(tmp_path) as cfg:
        answer = await exchange(cfg.http_port, head("GET", target))
        assert answer.status == 400, answer.body
        assert json.loads(answer.body)["resourceType"] == "OperationOutcome"
        # A dot inside a segment is a value like another: the child says it does not know it.
        assert (await exchange(cfg.http_port, head("GET", "/fhir/Patient/a..b"))).status == 404


async def test_proxy_headers_from_a_client_are_not_trusted(tmp_path: Path) -> None:
    """X-Forwarded-* and Forwarded from a client go nowhere: links keep the scheme served and a host the
    client may use; a Host that is not one gives the main address, never the child's port."""
    async with forwarding(tmp_path) as cfg:
        spoofed = (
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil.example",
            "X-Forwarded-For: 10.6.6.6",
            "Forwarded: for=10.6.6.6;proto=https;host=evil.example",
        )
        for port in (cfg.http_port, cfg.http_port_of("fhir")):  # through the main address, and the child's own
            answer = await exchange(port, head("GET", "/fhir/metadata", *spoofed))
            assert json.loads(answer.body)["implementation"]["url"] == "http://127.0.0.1/fhir"
        hostile = b"GET /fhir/metadata HTTP/1.1\r\nHost: evil.example@x\r\n\r\n"
        answer = await exchange(cfg.http_port, hostile)
        assert json.loads(answer.body)["implementation"]["url"] == f"http://127.0.0.1:{cfg.http_port}/fhir"


# -- the whole loop, `traboule run` with no configuration --------------------------------------------------------


@pytest.fixture
def default_engine(tmp_path: Path) -> Iterator[dict[str, str]]:
    """``traboule run`` with no configuration file: the defaults, on free ports."""
    env = dict(os.environ, TRABOULE_DATA_DIR=str(tmp_path / "var"), TRABOULE_LOG_FORMAT="json", **engine_ports())
    env.pop("TRABOULE_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "traboule.app.cli", "run"], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        if '"engine.ready"' in line and '"process": "main"' in line:
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"engine did not start: {line}")
    else:
        raise AssertionError("the engine exited before it was ready")
    drain = subprocess.Popen(["cat"], stdin=proc.stderr, stdout=subprocess.DEVNULL)  # keeps the pipe from filling
    try:
        yield env
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        drain.wait(10)


def until(predicate: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def fhir_search(http: httpx.Client, rtype: str, **params: str) -> list[dict[str, Any]]:
    answer = http.get(f"/fhir/{rtype}", params=params)
    assert answer.status_code == 200, answer.text
    return [e["resource"] for e in answer.json().get("entry", [])]


def mpps(port: int, item: Dataset) -> list[int]:
    """A modality performs the item: N-CREATE IN PROGRESS, then N-SET COMPLETED (pynetdicom as the MPPS SCU)."""
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRABOULE")
    assert assoc.is_established
    try:
        uid = generate_uid()
        created, _ = assoc.send_n_create(in_progress(item), ModalityPerformedProcedureStep, uid)
        done, _ = assoc.send_n_set(completed(), ModalityPerformedProcedureStep, uid)
        return [int(created.Status), int(done.Status)]
    finally:
        assoc.release()


def test_the_default_engine_runs_the_loop_on_one_http_address(default_engine: dict[str, str]) -> None:
    env = default_engine
    main_port = int(env["TRABOULE_HTTP_PORT"])
    with httpx.Client(base_url=f"http://127.0.0.1:{main_port}", timeout=10, trust_env=False) as http:
        metadata = http.get("/fhir/metadata")  # served by the fhir process, answered on the main port
        assert metadata.status_code == 200 and metadata.json()["resourceType"] == "CapabilityStatement"
        assert fhir_search(http, "Patient", identifier="IPP0001") == []
        assert [c["name"] for c in http.get("/channels").json()] == ["ris-orders", "worklist", "mpps", "fhir"]

        # An order over MLLP: on the worklist, and a ServiceRequest through the main port's /fhir.
        sent = cli("send", str(ROOT / "fixtures" / "hl7" / "orm_o01_nw_latin1.hl7"), env=env)
        assert sent.returncode == 0 and ": AA" in sent.stdout, sent.stderr
        (request,) = until(lambda: fhir_search(http, "ServiceRequest", identifier="ACC0001"))
        assert request["status"] == "active"
        keys = ["AccessionNumber", "StudyInstanceUID", "RequestedProcedureID", "PatientName", "PatientID"]
        keys += ["PatientBirthDate", "PatientSex", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"]
        (item,) = until(lambda: findscu(int(env["TRABOULE_MWL_PORT"]), "TRABOULE", keys))
        assert item.AccessionNumber == "ACC0001"

        # The modality reports the exam on the default MPPS port: the ServiceRequest is completed.
        assert mpps(int(env["TRABOULE_MPPS_PORT"]), item) == [0x0000, 0x0000]
        until(lambda: fhir_search(http, "ServiceRequest", identifier="ACC0001")[0]["status"] == "completed")
        (study,) = fhir_search(http, "ImagingStudy", identifier=f"urn:dicom:uid|urn:oid:{item.StudyInstanceUID}")
        assert study["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]

        # A report: a CDA document, its DocumentReference and bytes through the same address.
        report = cli("send", str(ROOT / "fixtures" / "hl7" / "oru_r01_pdf.hl7"), env=env)
        assert report.returncode == 0 and ": AA" in report.stdout, report.stderr
        (reference,) = until(lambda: fhir_search(http, "DocumentReference", related="ACC0002"))
        url = reference["content"][0]["attachment"]["url"]
        assert url.startswith(f"http://127.0.0.1:{main_port}/fhir/Binary/")
        cda = http.get(url)
        assert cda.status_code == 200 and b"urn:hl7-org:v3" in cda.content and b"<ClinicalDocument" in cda.content

        everything = http.get("/metrics").text
        assert 'traboule_process_up{process="worker"} 1.0' in everything
        assert 'traboule_process_up{process="fhir"} 1.0' in everything
        assert 'traboule_messages_received_total{channel="mpps",process="main",status="accepted"} 2.0' in everything

        # The fhir process dies: its routes say so on the main port until the supervisor has it back.
        fhir_pid = http.get("/health").json()["processes"]["fhir"]["pid"]
        os.kill(fhir_pid, signal.SIGKILL)
        until(lambda: http.get("/health").json()["processes"]["fhir"]["state"] != "ready")
        down = http.get("/fhir/metadata")
        assert down.status_code == 503 and down.json()["resourceType"] == "OperationOutcome"
        until(lambda: http.get("/fhir/metadata").status_code == 200, timeout=30)
        assert fhir_search(http, "ServiceRequest", identifier="ACC0001")[0]["status"] == "completed"
