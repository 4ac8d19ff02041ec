"""How the engine's PostgreSQL connections are set up, whatever the server's defaults and the URL say: durable
commits, statement / lock / idle-in-transaction timeouts, TCP keepalives (a real server)."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from traboule.stores.postgres import (
    IDLE_IN_TRANSACTION_MS,
    LOCK_TIMEOUT_MS,
    SERVER_KEEPALIVES,
    STATEMENT_TIMEOUT_MS,
    async_connect,
    connect,
)
from traboule.stores.postgres.migrations import LOCK_KEY, _lock

_SETTINGS = (
    "SELECT current_setting('synchronous_commit'), current_setting('statement_timeout'),"
    " current_setting('lock_timeout'), current_setting('idle_in_transaction_session_timeout'),"
    " current_setting('search_path')"
)


def _with_options(url: str, options: str) -> str:
    return url + ("&" if "?" in url else "?") + "options=" + options.replace(" ", "%20").replace("=", "%3D")


def test_commits_are_durable_even_when_the_database_says_otherwise(pg_url: str) -> None:
    """A DBA's ``ALTER DATABASE ... SET synchronous_commit = off`` (or the URL's own option) does not reach the
    engine's sessions, blocking or asyncio: an acknowledged message is on the server's disk."""
    dbname = pg_url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
        with psycopg.connect(pg_url) as plain:  # what a session gets from the database's settings
            assert plain.execute("SHOW synchronous_commit").fetchone() == ("off",)
    for url in (pg_url, _with_options(pg_url, "-c synchronous_commit=off")):
        with connect(url) as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)

        async def show(url: str = url) -> tuple[str, ...]:
            aconn = await async_connect(url)
            try:
                return await (await aconn.execute("SHOW synchronous_commit")).fetchone()  # type: ignore[return-value]
            finally:
                await aconn.close()

        assert asyncio.run(show()) == ("on",)


def test_a_url_with_its_own_options_keeps_the_timeouts(pg_url: str) -> None:
    with connect(_with_options(pg_url, "-c search_path=public")) as conn:
        sync, statement, lock, idle, path = conn.execute(_SETTINGS).fetchone()  # type: ignore[misc]
    assert (sync, path) == ("on", "public")
    assert statement == f"{STATEMENT_TIMEOUT_MS // 1000}s" and lock == f"{LOCK_TIMEOUT_MS // 1000}s"
    assert idle == f"{IDLE_IN_TRANSACTION_MS // 1000}s" and LOCK_TIMEOUT_MS < STATEMENT_TIMEOUT_MS
    with connect(_with_options(pg_url, "-c statement_timeout=5s")) as conn:  # the URL's own timeout wins
        assert conn.execute(_SETTINGS).fetchone()[:2] == ("on", "5s")  # type: ignore[index]


def test_connections_have_tcp_keepalives(pg_url: str) -> None:
    with connect(pg_url) as conn:
        params = conn.info.get_parameters()
        dsn = conn.pgconn.info  # every connection option, with the value in force
        values = {o.keyword.decode(): (o.val or b"").decode() for o in dsn}
    assert params.get("application_name") == "traboule"
    assert (values["keepalives"], values["keepalives_idle"]) == ("1", "10")
    assert (values["keepalives_interval"], values["keepalives_count"]) == ("5", "3")
    if "tcp_user_timeout" in values and psycopg.pq.version() >= 120000:
        assert values["tcp_user_timeout"] == "30000"


_KEEPALIVE_NAMES = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
_SERVER_KEEPALIVES = "SELECT " + ", ".join(f"current_setting('{name}')" for name in _KEEPALIVE_NAMES)


def test_the_server_notices_a_silent_node_in_seconds(pg_url: str) -> None:
    """The server's side of each session has its own keepalives and user timeout (a host lost without closing its
    sockets: its session, and the outbox lease it holds, end in seconds, not after 2 hours), set per session by a
    role that is not a superuser, blocking or asyncio."""
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DROP ROLE IF EXISTS traboule_node")
        admin.execute("CREATE ROLE traboule_node LOGIN NOSUPERUSER")
    try:
        url = pg_url.replace("postgresql://postgres@", "postgresql://traboule_node@")
        assert url != pg_url
        expected = tuple(str(SERVER_KEEPALIVES[name]) for name in _KEEPALIVE_NAMES)  # seconds; ms for the last
        assert expected == ("5", "1", "3", "10000")
        with connect(url) as conn:
            role = conn.execute("SELECT usename, usesuper FROM pg_user WHERE usename = current_user").fetchone()
            assert role == ("traboule_node", False)
            assert conn.execute(_SERVER_KEEPALIVES).fetchone() == expected

        async def show() -> tuple[str, ...]:
            aconn = await async_connect(url)
            try:
                return await (await aconn.execute(_SERVER_KEEPALIVES)).fetchone()  # type: ignore[return-value]
            finally:
                await aconn.close()

        assert asyncio.run(show()) == expected
        with psycopg.connect(pg_url) as plain:  # what a session gets without them: the OS's (hours)
            assert plain.execute(_SERVER_KEEPALIVES).fetchone() != expected
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("DROP ROLE IF EXISTS traboule_node")


def test_a_url_keeps_its_own_server_keepalives(pg_url: str) -> None:
    url = _with_options(pg_url, "-c tcp_keepalives_idle=60 --tcp-user-timeout=0 -c search_path=public")
    with connect(url) as conn:
        assert conn.execute(_SERVER_KEEPALIVES).fetchone() == ("60", "1", "3", "0")
        assert conn.execute(_SETTINGS).fetchone()[::4] == ("on", "public")  # type: ignore[index]


def test_a_session_idle_in_a_transaction_is_ended(pg_url: str) -> None:
    """A node gone quiet in the middle of a transaction (holding the journal's lock) does not hold it forever."""
    url = _with_options(pg_url, "-c idle_in_transaction_session_timeout=300ms")
    with connect(url) as stuck, connect(pg_url) as other:
        stuck.execute("BEGIN")
        stuck.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        time.sleep(0.6)
        with other.transaction():  # the lock is free again: the server ended the idle session
            other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        with pytest.raises(psycopg.Error, match="idle-in-transaction"):
            stuck.execute("SELECT 1")


def test_a_lock_wait_fails_before_the_statement_timeout(pg_url: str) -> None:
    url = _with_options(pg_url, "-c lock_timeout=200ms")
    with connect(pg_url) as holder, connect(url) as waiter, holder.transaction():
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY + 1,))
        with pytest.raises(psycopg.errors.LockNotAvailable), waiter.transaction():
            waiter.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY + 1,))


def test_a_schema_change_runs_without_the_statement_timeout(pg_url: str) -> None:
    """Inside a migration's transaction: no statement timeout, and the connection's lock timeout back for the
    migration statements once the schema lock is held."""
    with connect(_with_options(pg_url, "-c statement_timeout=1s")) as conn, conn.transaction():
        _lock(conn)
        conn.execute("SELECT pg_sleep(1.2)")  # would be cancelled at 1 s outside
        assert conn.execute("SHOW lock_timeout").fetchone() == (f"{LOCK_TIMEOUT_MS // 1000}s",)
