"""A real PostgreSQL server for the tests: one temporary cluster per session, a fresh database per test.

The Debian binaries (``/usr/lib/postgresql/<version>/bin``) run a cluster in a temp dir: loopback only, on a free
port, its unix socket in the temp dir, fsync on (durability is what the tests check), trust authentication.
``initdb`` and ``postgres`` refuse to run as root: as root they run as the ``postgres`` system user (the temp dir is
theirs). The server is stopped by its PID at the end of the session. See ../shared/PEERS.md section 4.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import ports

POSTGRES_BIN = os.environ.get("TRABOULE_POSTGRES_BIN", "")  # a bin folder; default: the newest Debian version
STARTUP_TIMEOUT = 30.0  # seconds; initdb + start take ~1.5 s on 2 cores
STOP_TIMEOUT = 15.0
SUPERUSER = "postgres"


def _bin_dir() -> Path | None:
    if POSTGRES_BIN:
        return Path(POSTGRES_BIN) if (Path(POSTGRES_BIN) / "initdb").exists() else None
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0
    )
    return found[-1].parent if found else None


_free_port = ports.free_port  # one allocator for every test (tests/ports.py)


@dataclass
class PostgresServer:
    """A running temporary cluster: ``url(dbname)`` for a database on it, ``admin_url`` for the ``postgres`` one."""

    base: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    databases: list[str] = field(default_factory=list)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    @property
    def socket_dir(self) -> Path:
        return self.base

    def log_tail(self, lines: int = 40) -> str:
        path = self.base / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def create_database(self) -> str:
        """A new empty database (``t_<random>``); returns its name."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return name

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _run_as() -> dict[str, object]:
    """Popen arguments that run a server binary as a non-root user (``postgres``) when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(SUPERUSER)
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' system user to run PostgreSQL as")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def run_postgres(*, settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """Start a temporary cluster and stop it (by PID) on exit, also on errors. ``settings``: server settings added
    to (or replacing) the defaults below, e.g. ``{"shared_preload_libraries": "pg_stat_statements"}`` for a bench."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (apt install postgresql)")
    as_user = _run_as()
    # Not under pytest's tmp dir: its parents are private to the current user, and the socket path must stay short.
    base = Path(tempfile.mkdtemp(prefix="traboule-pg-"))
    data = base / "data"
    if as_user:
        os.chown(base, as_user["user"], as_user["group"])  # type: ignore[arg-type]
    server = PostgresServer(base=base, port=_free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C", "TZ": "UTC"}
    try:
        # --no-sync: the cluster's creation need not survive a power loss; the server below runs with fsync on.
        init = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"],
            cwd=base,
            env=env,
            capture_output=True,
            timeout=STARTUP_TIMEOUT,
            check=False,
            **as_user,  # type: ignore[arg-type]
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout.decode()}\n{init.stderr.decode()}")
        log = (base / "server.log").open("wb")
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(base),
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": "200",
            "logging_collector": "off",
        } | (settings or {})
        server.process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(data), "-p", str(server.port)]
            + [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **as_user,  # type: ignore[arg-type]
        )
        log.close()
        _wait_ready(server)
        yield server
    finally:
        _stop(server)
        shutil.rmtree(base, ignore_errors=True)


def _wait_ready(server: PostgresServer) -> None:
    import psycopg

    deadline = time.monotonic() + STARTUP_TIMEOUT
    assert server.process is not None
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.process.returncode}\n{server.log_tail()}")
        try:
            with psycopg.connect(server.admin_url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {STARTUP_TIMEOUT} s\n{server.log_tail()}") from None
            time.sleep(0.05)


def _stop(server: PostgresServer) -> None:
    """Fast shutdown (SIGINT to the postmaster: clients are disconnected), then any survivor of its group."""
    proc = server.process
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGQUIT)  # immediate shutdown
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the backends of a killed postmaster, if any (the group is ours)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (started on first use only: ~1.5 s)."""
    with run_postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The ``postgresql://`` URL of a fresh, empty database for this test (dropped afterwards)."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
