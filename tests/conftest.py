"""Shared test set-up: paths, and the real peers (each in its own module, registered as plugins)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

pytest_plugins = [
    "tests.peer_rabbitmq",
    "tests.peer_rabbitmq_cluster",
    "tests.peer_dcmtk",
    "tests.peer_orthanc",
    "tests.peer_fhir_server",
    "tests.peer_postgres",
]


@pytest.fixture(autouse=True)
def _no_cda_validators_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines started by a test (in process or as ``traboule run``) validate reports only when the test says so:
    with ``TRABOULE_CDA_VALIDATORS`` inherited from the shell, every default engine would compile the schematrons
    at start (seconds each)."""
    monkeypatch.delenv("TRABOULE_CDA_VALIDATORS", raising=False)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test with a clear reason when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference corpus and standards (../shared) are not beside this clone")
    return path
