"""A report end to end, every destination at once: ORU^R01 over MLLP → CDA validated by the ANS validators before
the ACK → the DMP (ITI-41 to a loopback XDS.b endpoint over mutual TLS, schema-checked, hash-checked, signed VIHF),
the DRIMbox feed (ORU^R01 with the CDA over MLLP), and the MHD pull API (search, then retrieve the same bytes);
then the correction (RPLC, superseded) and the deletion (ITI-57; PDSm: found by no search)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import shared_path
from tests.test_flow import ack_code, engine_config, fixture, free_port, send, until
from tests.test_mpps import Ris
from tests.test_reports import TCC, report_of, study
from tests.test_xds import channel_config
from tests.xds_endpoint import XDSEndpoint, make_pki
from traboule.adapters.mllp import MLLPListener
from traboule.app.http import create_app, serve
from traboule.app.runtime import Runtime
from traboule.model import Envelope

pytestmark = pytest.mark.timeout(180)
INS = "urn:oid:1.2.250.1.213.1.4.10|279035121518989"


@pytest.fixture
async def site(tmp_path: Path, validator: Any) -> AsyncIterator[tuple[Runtime, XDSEndpoint, Ris, str]]:
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    dmp = XDSEndpoint(pki, shared_path("standards", "xds", "xds-b-offline.xsd")).start()
    drimbox = Ris()
    drimbox.listener = MLLPListener(drimbox.handle, port=0, name="drimbox")
    await drimbox.listener.start()
    cfg = engine_config(tmp_path / "var")
    cfg.channels[0]["reports"] = {"validate": True, "validators": str(TCC), "cache": str(validator.cache_dir)}
    cfg.channels.append({"name": "fhir", "kind": "fhir", "api": True})
    cfg.channels.append(channel_config(pki, dmp))
    cfg.channels.append(
        {
            "name": "drimbox",
            "kind": "hl7-documents",
            "destination": {"adapter": "mllp-sender", "host": "127.0.0.1", "port": drimbox.listener.port},
        }
    )
    runtime = Runtime(cfg)
    await runtime.start()
    port = free_port()
    http = await serve(create_app(runtime), "127.0.0.1", port)
    try:
        yield runtime, dmp, drimbox, f"http://127.0.0.1:{port}/fhir"
    finally:
        http.should_exit = True
        await http.task
        await runtime.stop()
        await drimbox.listener.stop()
        dmp.stop()


@pytest.fixture(scope="module")
def validator(cda_validator: Any) -> Any:
    return cda_validator


async def test_a_report_reaches_the_dmp_the_drimbox_and_the_pull_api(
    site: tuple[Runtime, XDSEndpoint, Ris, str],
) -> None:
    runtime, dmp, drimbox, base = site
    assert ack_code((await send(runtime, fixture("orm_o01_nw_latin1.hl7")))[0]) == "AA"
    env = Envelope(study())
    await runtime.bus.publish("study.stable", env.to_json(), message_id=env.id)
    publisher = runtime.channel("ris-orders").reports  # type: ignore[attr-defined]
    await until(lambda: publisher.study_for(report_of(fixture("oru_r01_report.hl7"))) is not None)

    assert ack_code((await send(runtime, fixture("oru_r01_report.hl7")))[0]) == "AA"
    await until(lambda: len(dmp.accepted()) == 1 and len(drimbox.accepted()) == 1, timeout=30)
    (submitted,) = dmp.accepted()
    assert submitted.errors == [] and submitted.signature_valid  # schema, hash/size, VIHF checked by the endpoint
    (cda,) = submitted.documents.values()
    fed = drimbox.accepted()[0].segment("OBX")
    assert fed is not None and base64.b64decode(fed.field(5).split("^")[4]) == cda

    async with httpx.AsyncClient(timeout=10) as client:

        async def references(status: str) -> list[dict[str, Any]]:
            params = {"patient.identifier": INS, "status": status, "type": "http://loinc.org|18748-4"}
            bundle = (await client.get(f"{base}/DocumentReference", params=params)).json()
            return [e["resource"] for e in bundle.get("entry", [])]

        await until_async(lambda: references("current"), 1)
        (reference,) = await references("current")
        attachment = reference["content"][0]["attachment"]
        retrieved = (await client.get(attachment["url"])).content
        assert retrieved == cda  # the same bytes the DMP and the DRIMbox got
        assert base64.b64encode(hashlib.sha1(retrieved).digest()).decode() == attachment["hash"]

        assert ack_code((await send(runtime, fixture("oru_r01_report_corrected.hl7")))[0]) == "AA"
        await until(lambda: len(dmp.accepted()) == 2 and len(drimbox.accepted()) == 2, timeout=30)
        assert any(a.get("associationType", "").endswith("RPLC") for a in dmp.accepted()[1].objects("Association"))
        await until_async(lambda: references("superseded"), 1)
        (current,) = await references("current")
        assert current["relatesTo"][0]["target"]["reference"] == f"DocumentReference/{reference['id']}"

        assert ack_code((await send(runtime, fixture("oru_r01_report_deleted.hl7")))[0]) == "AA"
        await until(lambda: len(dmp.accepted()) == 3 and len(drimbox.accepted()) == 3, timeout=30)
        assert dmp.accepted()[2].path == "/registry"  # ITI-57
        await until_async(lambda: references("current"), 0)  # PDSm: a deleted entry is found by no search
        assert await references("superseded") == []


async def until_async(fetch: Any, count: int, timeout: float = 20) -> None:
    """Poll an async query until it returns ``count`` items."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while len(await fetch()) != count:
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
