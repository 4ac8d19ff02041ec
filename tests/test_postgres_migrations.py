"""The PostgreSQL schema migrations (`traboule.stores.postgres.migrations`) on a real server, a fresh database each;
the ``[database]`` setting and the ``traboule db`` command."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ROOT
from traboule.app import config
from traboule.errors import ConfigError
from traboule.stores.postgres import connect, migrations, redact

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def component() -> Iterator[str]:
    """A component name of this test only; its registration is forgotten afterwards (a plain pop: monkeypatch
    would put it back when it undoes its own changes, and later tests would migrate it)."""
    name = f"demo_{uuid.uuid4().hex[:8]}"
    yield name
    migrations._REGISTRY.pop(name, None)


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection]:
    with connect(pg_url) as db:
        yield db


def _tables(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_a_fresh_database_gets_every_migration_once(conn: psycopg.Connection, component: str) -> None:
    migrations.register(
        component,
        [
            (1, "CREATE TABLE demo_items (id INT PRIMARY KEY); CREATE TABLE demo_log (n INT)"),
            (2, "ALTER TABLE demo_items ADD COLUMN name TEXT NOT NULL DEFAULT '%'"),  # a % is no placeholder
        ],
    )
    assert migrations.upgrade(conn, [component]) == {component: (0, 2)}
    assert {"traboule_schema", "demo_items", "demo_log"} <= _tables(conn)
    assert migrations.versions(conn)[component] == 2
    conn.execute("INSERT INTO demo_items (id) VALUES (1)")
    assert conn.execute("SELECT name FROM demo_items").fetchone() == ("%",)
    # Run again (CREATE TABLE without IF NOT EXISTS would fail): nothing to do.
    assert migrations.upgrade(conn, [component]) == {component: (2, 2)}
    # A new release adds a migration: only that one runs.
    migrations._REGISTRY[component].append((3, "INSERT INTO demo_log VALUES (3)"))
    assert migrations.upgrade(conn, [component]) == {component: (2, 3)}
    assert migrations.upgrade(conn, [component]) == {component: (3, 3)}
    assert conn.execute("SELECT n FROM demo_log").fetchall() == [(3,)]


def test_every_registered_component_by_default(conn: psycopg.Connection) -> None:
    """Without a list, every store module of the backend is imported and migrated (the journal's at least)."""
    result = migrations.upgrade(conn)
    assert "journal" in result and result["journal"][0] == 0
    assert migrations.versions(conn) == {name: after for name, (_, after) in result.items()}
    assert migrations.upgrade(conn) == {name: (after, after) for name, (_, after) in result.items()}


def test_a_failing_migration_leaves_its_component_untouched(conn: psycopg.Connection, component: str) -> None:
    migrations.register(component, [(1, "CREATE TABLE half_done (id INT)"), (2, "SELECT * FROM no_such_table")])
    with pytest.raises(psycopg.errors.UndefinedTable):
        migrations.upgrade(conn, [component])
    assert "half_done" not in _tables(conn)  # migration 1 was rolled back with 2
    assert migrations.versions(conn).get(component, 0) == 0


def test_two_nodes_upgrading_together_migrate_once(pg_url: str, component: str) -> None:
    """The second node waits on the advisory lock, then finds the schema current: the migration ran once."""
    migrations.register(
        component,
        [(1, "CREATE TABLE runs (at TIMESTAMPTZ); SELECT pg_sleep(0.5); INSERT INTO runs VALUES (now())")],
    )
    results: list[dict[str, tuple[int, int]]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def node() -> None:
        try:
            with connect(pg_url) as db:
                start.wait()
                results.append(migrations.upgrade(db, [component]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(r[component] for r in results) == [(0, 1), (1, 1)]
    with connect(pg_url) as db:
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (1,)


def test_a_database_newer_than_the_code_is_refused_before_any_change(
    conn: psycopg.Connection, component: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = f"{component}_other"
    monkeypatch.setitem(migrations._REGISTRY, other, [(1, "CREATE TABLE other_items (id INT)")])
    migrations.register(component, [(1, "CREATE TABLE items (id INT)")])
    migrations.upgrade(conn, [component])
    conn.execute("UPDATE traboule_schema SET version = 7 WHERE component = %s", (component,))  # a newer node's
    with pytest.raises(ConfigError, match=rf"{component} schema is version 7, newer than the 1"):
        migrations.upgrade(conn, [other, component])
    assert "other_items" not in _tables(conn)  # nothing changed, not even the component that was behind
    with pytest.raises(ConfigError):
        migrations.check(conn, component)  # what a store does when it opens


def test_registration_is_checked(component: str) -> None:
    for wrong in ([], [(0, "SELECT 1")], [(2, "SELECT 1"), (1, "SELECT 1")], [(1, "SELECT 1"), (1, "SELECT 2")]):
        with pytest.raises(ValueError):
            migrations.register(component, wrong)
    migrations.register(component, [(1, "SELECT 1")])
    migrations.register(component, [(1, "SELECT 1")])  # a module imported again
    with pytest.raises(ValueError):
        migrations.register(component, [(1, "SELECT 2")])


def test_an_unknown_component_and_a_transaction_connection_are_refused(pg_url: str) -> None:
    with connect(pg_url) as db, pytest.raises(KeyError):
        migrations.upgrade(db, ["no-such-component"])
    with connect(pg_url, autocommit=False) as db, pytest.raises(ValueError):
        migrations.upgrade(db)


def test_connections_say_who_they_are_and_commit_durably(conn: psycopg.Connection) -> None:
    name, sync, timeout = conn.execute(
        "SELECT current_setting('application_name'), current_setting('synchronous_commit'),"
        " current_setting('statement_timeout')"
    ).fetchone()  # type: ignore[misc]
    assert (name, sync) == ("traboule", "on") and timeout != "0"
    assert conn.autocommit


def test_a_url_for_messages_has_no_password() -> None:
    assert redact("postgresql://traboule:s3cr%40t@db.example:5432/engine") == (
        "postgresql://traboule:***@db.example:5432/engine"
    )
    assert redact("postgresql://db/engine?user=x&password=s3cret&sslmode=require") == (
        "postgresql://x:***@db/engine?sslmode=require"
    )
    assert redact("postgresql://traboule@db/engine") == "postgresql://traboule@db/engine"
    # what libpq reads as the password, not what a URL parser would: ? and # inside it, an sslpassword
    assert redact("postgresql://u:pa?ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u:pa#ss@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://u@h/db?sslpassword=KEYPW&sslmode=verify-full") == (
        "postgresql://u@h/db?sslmode=verify-full"
    )
    assert redact("host=h1,h2 port=5432,5433 dbname=db user=u password=pw") == "postgresql://u:***@h1:5432,h2:5433/db"
    for leaky in ("postgresql://u:pa?ss@h/db", "postgresql://u:pa#ss@h/db", "postgresql://u@h/db?sslpassword=KEYPW"):
        assert "ss@" not in redact(leaky) and "KEYPW" not in redact(leaky) and "pa" not in redact(leaky).split("@")[0]
    assert redact("postgresql://u:pw@h/db?options=%") == "postgresql://***"  # libpq cannot read it


# -- configuration and command line -------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str, database_url: str = "", config: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_")}
    env["TRABOULE_DATA_DIR"] = str(tmp_path)
    if database_url:
        env["TRABOULE_DATABASE_URL"] = database_url
    command = [sys.executable, "-m", "traboule.app.cli", *(["--config", str(config)] if config else []), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_database_url_comes_from_the_file_and_the_environment_wins(tmp_path: Path) -> None:
    path = tmp_path / "traboule.toml"
    path.write_text('[database]\nurl = "postgresql://traboule:file-secret@db1/engine"\n')
    assert config.load(env={}).database_url == ""  # the default: embedded SQLite
    assert config.load(env={}).database_description.startswith("sqlite")
    from_file = config.load(str(path), env={})
    assert from_file.database_url == "postgresql://traboule:file-secret@db1/engine"
    assert from_file.database_description == "postgresql (postgresql://traboule:***@db1/engine)"
    env = {"TRABOULE_DATABASE_URL": "postgresql://other:env-secret@db2/engine"}
    assert config.load(str(path), env=env).database_url == env["TRABOULE_DATABASE_URL"]
    assert config.load(str(path), env={"TRABOULE_DATABASE_URL": " "}).database_url == from_file.database_url
    path.write_text('[database]\nurl = "mysql://u:not-shown@db/engine"\n')
    with pytest.raises(ConfigError) as wrong:
        config.load(str(path), env={})
    assert "PostgreSQL" in str(wrong.value) and "not-shown" not in str(wrong.value)
    path.write_text('[database]\nhost = "db"\n')
    with pytest.raises(ConfigError, match=r"\[database\]"):
        config.load(str(path), env={})


def test_db_upgrade_creates_the_schema_once_and_says_so(tmp_path: Path, pg_url: str) -> None:
    first = _cli(tmp_path, "db", "upgrade", database_url=pg_url)
    assert first.returncode == 0, first.stderr
    assert re.search(r"^journal\s+0 -> 3$", first.stdout, re.M), first.stdout
    again = _cli(tmp_path, "db", "upgrade", database_url=pg_url)
    assert again.returncode == 0 and re.search(r"^journal\s+3 \(current\)$", again.stdout, re.M), again.stdout
    status = _cli(tmp_path, "db", "status", database_url=pg_url)
    assert re.search(r"^journal\s+database 3\s+traboule 3\s+current$", status.stdout, re.M), status.stdout
    listed = _cli(tmp_path, "journal", "list", database_url=pg_url)  # the journal commands read the database
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    with connect(pg_url) as db:
        db.execute("UPDATE traboule_schema SET version = 99 WHERE component = 'journal'")
    newer = _cli(tmp_path, "db", "upgrade", database_url=pg_url)
    assert newer.returncode == 1 and "newer" in newer.stderr


def test_db_without_a_database_or_with_a_wrong_password_says_why_and_hides_it(
    tmp_path: Path, postgres_server: Any
) -> None:
    none = _cli(tmp_path, "db", "upgrade")
    assert none.returncode == 2 and "no database configured" in none.stderr
    unreachable = f"postgresql://traboule:hidden-secret@127.0.0.1:{_closed_port()}/engine"
    failed = _cli(tmp_path, "db", "upgrade", database_url=unreachable)
    assert failed.returncode == 1 and "traboule:***@127.0.0.1" in failed.stderr
    assert "hidden-secret" not in failed.stdout + failed.stderr


def test_check_names_the_database(tmp_path: Path) -> None:
    embedded = _cli(tmp_path, "check")
    assert embedded.returncode == 0, embedded.stderr
    assert f"ok  database: sqlite (files in {tmp_path})" in embedded.stdout
    configured = _cli(tmp_path, "check", database_url="postgresql://traboule:hidden-secret@db.example/engine")
    assert configured.returncode == 0, configured.stderr
    assert "postgresql (postgresql://traboule:***@db.example/engine)" in configured.stdout
    assert "hidden-secret" not in configured.stdout + configured.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_check_tells_a_wrong_setting_from_a_database_out_of_reach(tmp_path: Path, pg_url: str) -> None:
    """A database that does not answer is a warning (``run`` waits for it); one that answers "no such database" or
    "no such role" is a configuration error (exit 2), the password never shown."""
    from traboule.stores.factory import database_error

    base, _ = pg_url.split("?", 1)[0].rsplit("/", 1)
    host = base.split("@", 1)[1]
    missing_db = f"postgresql://postgres:hidden-secret@{host}/no_such_database"
    missing_role = f"postgresql://nobody_here:hidden-secret@{host}/postgres"
    for url in (missing_db, missing_role):
        with pytest.raises(psycopg.OperationalError) as raised:
            connect(url)
        assert isinstance(database_error(url, raised.value), ConfigError)
        refused = _cli(tmp_path, "check", database_url=url)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "configuration error" in refused.stderr and "does not exist" in refused.stderr
        assert "hidden-secret" not in refused.stdout + refused.stderr
    down = f"postgresql://postgres:hidden-secret@127.0.0.1:{_closed_port()}/postgres"
    with pytest.raises(psycopg.OperationalError) as raised:
        connect(down)
    assert type(database_error(down, raised.value)) is ConnectionError
    for sqlstate, expected in (("3D000", ConfigError), ("28P01", ConfigError), ("42501", ConfigError)):
        error = psycopg.errors.lookup(sqlstate)("refused")
        assert isinstance(database_error(down, error), expected), sqlstate
    assert type(database_error(down, psycopg.errors.lookup("08006")("gone"))) is ConnectionError
    assert type(database_error(down, psycopg.errors.lookup("53300")("too many clients"))) is ConnectionError
    unreachable = _cli(tmp_path, "check", database_url=down)
    assert unreachable.returncode == 0 and "not reachable from here" in unreachable.stdout
    assert "hidden-secret" not in unreachable.stdout + unreachable.stderr
