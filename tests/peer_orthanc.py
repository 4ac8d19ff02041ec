"""A real Orthanc (Debian package, DICOMweb plugin, Lua ``OnStableStudy`` webhook) on loopback, for tests.

Orthanc has no bind-address option (PEERS.md gotcha 3): its DICOM and HTTP ports are free random ports and
``RemoteAccessAllowed`` is false; tests only talk to it on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.peer_dcmtk import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = Path("/usr/share/orthanc/plugins")

LUA = """
function OnStableStudy(studyId, tags, metadata)
  local body = {}
  body['event'] = 'StudyStable'
  body['StudyInstanceUID'] = tags['StudyInstanceUID']
  body['AccessionNumber'] = tags['AccessionNumber']
  body['OrthancId'] = studyId
  -- DumpJson(x, true) keeps strings as strings (accession numbers keep their leading zeros)
  HttpPost('%(webhook)s', DumpJson(body, true), {['Content-Type'] = 'application/json'})
end
"""


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[object]:
    """Factory: ``start(webhook_url)`` runs Orthanc whose stable-study callback posts to ``webhook_url``."""
    if not Path(ORTHANC).exists() or not (PLUGINS / "libOrthancDicomWeb.so").exists():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)")
    servers: list[OrthancServer] = []

    def start(webhook_url: str, *, stable_age: int = 1) -> OrthancServer:
        base = tmp_path / f"orthanc-{len(servers)}"
        (base / "db").mkdir(parents=True)
        (base / "log").mkdir()
        lua = base / "notify.lua"
        lua.write_text(LUA % {"webhook": webhook_url})
        http_port, dicom_port = free_port(), free_port()
        config = {
            "Name": "traboule-test",
            "StorageDirectory": str(base / "db"),
            "IndexDirectory": str(base / "db"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "StableAge": stable_age,
            "SaveJobs": False,
            "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{http_port}"},
            "LuaScripts": [str(lua)],
        }
        (base / "orthanc.json").write_text(json.dumps(config))
        process = subprocess.Popen(
            [ORTHANC, f"--logdir={base / 'log'}", str(base / "orthanc.json")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = OrthancServer(http_port, dicom_port, "ORTHANC", process)
        servers.append(server)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{server.url}/system", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"Orthanc did not start (logs in {base / 'log'})")

    yield start
    for server in servers:
        # SIGKILL, not SIGTERM: its database is a throwaway folder, and a polite stop waits ~3 s for its servers.
        server.process.kill()
        server.process.wait(timeout=10)
