"""Shared test set-up: paths, and the real peers (each in its own module, registered as plugins)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture(scope="session", autouse=True)
def _one_validation_process_unless_asked() -> Iterator[None]:
    """Engines started by the tests validate CDA with one worker process (each compiles the schematrons: seconds of
    CPU and ~0.7 GB), unless a test asks for more (``validation_processes``, ``processes=``) or sets the variable."""
    if os.environ.get("TRABOULE_CDA_PROCESSES"):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRABOULE_CDA_PROCESSES", "1")
        yield


@pytest.fixture(scope="session", autouse=True)
def _bytecode_kept_for_the_processes_tests_start() -> Iterator[None]:
    """With ``PYTHONDONTWRITEBYTECODE`` set, every engine process and command a test starts (hundreds in a run)
    compiles the project's modules again (~0.15 s of CPU each): they keep their bytecode in the user's cache
    instead (``PYTHONPYCACHEPREFIX``, ``~/.cache/traboule/test-bytecode``; nothing is written in the tree)."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        yield
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "traboule" / "test-bytecode"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        usable = os.access(cache, os.W_OK)
    except OSError:
        usable = False
    if not usable:  # a prefix it cannot write would hide every cached module: each process would compile them all
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE")
        patch.setenv("PYTHONPYCACHEPREFIX", str(cache))
        yield


BACKENDS = ("sqlite", "postgresql")  # the store backends a flow test runs on (test ids)


def database_url_of(backend: str, request: pytest.FixtureRequest) -> str:
    """The engine's ``[database] url`` for ``backend``: "" (SQLite files in the data folder) or the URL of a fresh
    PostgreSQL database for this test (fixture ``pg_url``)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown store backend {backend!r}")
    return str(request.getfixturevalue("pg_url")) if backend == "postgresql" else ""


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A test that takes this fixture runs once per store backend (ids ``sqlite``, ``postgresql``): the
    ``[database] url`` to give its engine (`database_url_of`)."""
    return database_url_of(request.param, request)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test with a clear reason when the folder is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference corpus and standards (../shared) are not beside this clone")
    return path


@pytest.fixture(scope="session")
def cda_validator(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One CI-SIS validator for the whole run: compiling the ANS schematrons takes seconds, so the tests that
    validate in this process share it (skipped with a clear reason when ../shared is absent)."""
    from traboule.formats.cda_validation import CDAValidator

    return CDAValidator(shared_path("standards", "ans-testcontenucda"), tmp_path_factory.mktemp("cda-cache"))


# Run in parallel (pytest-xdist, ``-n 2 --dist loadgroup``: the Makefile's test command), the tests of a peer that is
# costly to start once per worker go to one worker: the three-node RabbitMQ cluster (tens of seconds and three
# Erlang VMs), the browser.
_GROUPS = {"rabbitmq_cluster": "rabbitmq-cluster", "console_browser": "browser"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, group in _GROUPS.items():
            if fixture in names or (item.module is not None and item.module.__name__.endswith(f"test_{fixture}")):
                item.add_marker(pytest.mark.xdist_group(group))
                break
