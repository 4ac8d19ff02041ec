"""A real FHIR R4 server on loopback, for tests: medplum's in-memory FhirRouter served by ``tests/fhir_server``.

``fhir_server_url`` (session) installs the pinned npm packages when ``node_modules`` is absent (``npm ci``, the
same as ``make fhir-peer``), runs ``node server.mjs <port>`` on a free 127.0.0.1 port and yields its base URL,
``http://127.0.0.1:<port>/fhir/R4``. Tests are skipped with the reason when node/npm are absent or the
install fails. The server keeps its state in memory for the session: tests use their own identifiers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.peer_dcmtk import free_port

SERVER_DIR = Path(__file__).resolve().parent / "fhir_server"
INSTALL_TIMEOUT = 300
START_TIMEOUT = 30


def _install(npm: str) -> str | None:
    """``npm ci`` (or ``npm install`` without a lock file) when node_modules is missing; the failure, if any."""
    if (SERVER_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        return None
    command = "ci" if (SERVER_DIR / "package-lock.json").exists() else "install"
    try:
        result = subprocess.run(
            [npm, command, "--no-audit", "--no-fund"],
            cwd=SERVER_DIR,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"npm {command} in {SERVER_DIR} took more than {INSTALL_TIMEOUT} s"
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        return f"npm {command} in {SERVER_DIR} failed: " + " | ".join(tail)
    return None


def require_fhir_server() -> str:
    """The node binary, once the test server's packages are installed; skips the test otherwise."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the FHIR test server (tests/fhir_server)")
    failure = _install(npm)
    if failure:
        pytest.skip(failure)
    return node


def start_fhir_server(node: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """Run the server on 127.0.0.1:``port``; returns once it answers ``metadata``."""
    base_url = f"http://127.0.0.1:{port}/fhir/R4"
    with log.open("ab") as out:
        process = subprocess.Popen([node, "server.mjs", str(port)], cwd=SERVER_DIR, stdout=out, stderr=out)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if httpx.get(f"{base_url}/metadata", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_fhir_server(process)
            raise RuntimeError(f"the FHIR test server did not start: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def stop_fhir_server(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="session")
def fhir_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a fresh in-memory FHIR R4 server (medplum fhir-router) on 127.0.0.1."""
    node = require_fhir_server()
    port = free_port()
    process = start_fhir_server(node, port, tmp_path_factory.mktemp("fhir-server") / "server.log")
    try:
        yield f"http://127.0.0.1:{port}/fhir/R4"
    finally:
        stop_fhir_server(process)
