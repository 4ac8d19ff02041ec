"""Versioned schema per component (journal, worklist, ...) of the PostgreSQL backend.

Each store module registers its migrations at import: ``register("journal", [(1, "CREATE TABLE ..."), (2, ...)])``.
Versions are whole numbers from 1, in increasing order; a migration is never edited once released, a change is a
new one. ``upgrade(conn)`` brings the database to the latest version of each component:

* the table ``traboule_schema(component, version)`` records where each component stands (0: absent);
* each component's pending migrations run in one transaction with its new version: all of them or none;
* every transaction holds an advisory lock (`LOCK_KEY`), so two nodes starting together do not both migrate: the
  second waits, then finds nothing left to do;
* no statement timeout inside those transactions (an index on a large table takes what it takes); the wait for the
  advisory lock is bounded by `LOCK_WAIT_MS` (another node migrating longer than that: `TimeoutError`, saying so),
  a migration statement's wait for a table lock by the connection's ``lock_timeout`` (a busy table fails the
  migration rather than stalling every node queued behind it: run ``traboule db upgrade`` at a quiet time);
* a database whose version of a component is newer than this code knows is refused (``ConfigError``) before
  anything is changed: an older node must not write into a schema it does not understand.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import TYPE_CHECKING

from traboule.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

Migration = tuple[int, str]  # (version, SQL: one or more statements)

LOCK_KEY = 0x7472_6162_6F75  # "trabou": the advisory lock every schema change holds
LOCK_WAIT_MS = 600_000  # how long a node waits for another one's schema change before giving up

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS traboule_schema (
    component TEXT PRIMARY KEY,
    version INT NOT NULL
)
"""

_REGISTRY: dict[str, list[Migration]] = {}


def _too_new(component: str, found: int, known: int) -> ConfigError:
    """The database holds a component's schema in a version newer than this code knows (a newer node migrated it):
    the node must not start (``traboule check`` and ``run`` say "configuration error")."""
    return ConfigError(
        f"the database's {component} schema is version {found}, newer than the {known} this traboule knows:"
        " upgrade traboule on this node (it must not write into a schema it does not understand)"
    )


def register(component: str, migrations: list[tuple[int, str]]) -> None:
    """Declare a component's migrations (called by its store module at import). Registering the same list again
    is a no-op; a different one for a registered component is an error."""
    versions = [v for v, _ in migrations]
    if not migrations or versions != sorted(set(versions)) or versions[0] < 1:
        raise ValueError(f"{component}: migration versions must be increasing whole numbers from 1, got {versions}")
    known = _REGISTRY.get(component)
    if known is not None and known != list(migrations):
        raise ValueError(f"{component}: migrations registered twice with different contents")
    _REGISTRY[component] = list(migrations)


def registered() -> dict[str, int]:
    """Each registered component and the latest version this code knows."""
    return {component: migrations[-1][0] for component, migrations in sorted(_REGISTRY.items())}


def discover() -> None:
    """Import every module of the PostgreSQL backend so that each registers its migrations."""
    package = importlib.import_module("traboule.stores.postgres")
    for module in pkgutil.iter_modules(package.__path__):
        if module.name != "migrations":
            importlib.import_module(f"traboule.stores.postgres.{module.name}")


def versions(conn: psycopg.Connection) -> dict[str, int]:
    """The version of each component the database records (empty when it has no ``traboule_schema`` table)."""
    row = conn.execute("SELECT to_regclass('traboule_schema') IS NOT NULL").fetchone()
    if not row or not row[0]:
        return {}
    return {c: int(v) for c, v in conn.execute("SELECT component, version FROM traboule_schema ORDER BY component")}


def upgrade(conn: psycopg.Connection, components: Iterable[str] | None = None) -> dict[str, tuple[int, int]]:
    """Apply the pending migrations of ``components`` (default: every registered one); returns each component's
    ``(version before, version after)``. ``conn`` must be in autocommit mode (each component commits on its own).

    Raises ``ConfigError`` (nothing changed) when the database is ahead of this code, ``KeyError`` for a component
    nobody registered."""
    if not conn.autocommit:
        raise ValueError("upgrade needs a connection in autocommit mode: each component commits its own transaction")
    discover()
    names = sorted(_REGISTRY) if components is None else list(dict.fromkeys(components))
    for name in names:
        if name not in _REGISTRY:
            raise KeyError(f"no migrations registered for {name!r} (known: {', '.join(sorted(_REGISTRY))})")
    with conn.transaction():
        _lock(conn)
        conn.execute(_SCHEMA_TABLE)
        found = _recorded(conn)
    for name in names:  # refuse before changing anything
        if found.get(name, 0) > _REGISTRY[name][-1][0]:
            raise _too_new(name, found[name], _REGISTRY[name][-1][0])
    result: dict[str, tuple[int, int]] = {}
    for name in names:
        with conn.transaction():
            _lock(conn)
            current = _recorded(conn).get(name, 0)  # another node may have migrated while we waited
            known = _REGISTRY[name][-1][0]
            if current > known:
                raise _too_new(name, current, known)
            for version, sql in _REGISTRY[name]:
                if version > current:
                    conn.execute(sql.encode())  # bytes: no parameter parsing, several statements allowed
            if known > current:
                conn.execute(
                    "INSERT INTO traboule_schema (component, version) VALUES (%s, %s)"
                    " ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                    (name, known),
                )
        result[name] = (current, max(current, known))
    return result


def check(conn: psycopg.Connection, component: str) -> None:
    """Make sure the database holds ``component`` at exactly the version this code knows: upgrade it when it is
    older (or absent), refuse it when it is newer. What a store calls when it opens."""
    latest = _REGISTRY[component][-1][0]
    if versions(conn).get(component, 0) != latest:
        upgrade(conn, [component])


def _lock(conn: psycopg.Connection) -> None:
    """Inside a schema transaction: no statement timeout, then the advisory lock (waited for `LOCK_WAIT_MS` at
    most, then the connection's own ``lock_timeout`` again for the migration statements)."""
    import psycopg

    lock_timeout = conn.execute("SHOW lock_timeout").fetchone()
    conn.execute("SET LOCAL statement_timeout = 0")
    conn.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    except psycopg.errors.LockNotAvailable as exc:
        raise TimeoutError(
            f"another node has been changing the database schema for over {LOCK_WAIT_MS // 1000} s (it holds the"
            " schema lock): wait for it to finish, or see pg_stat_activity for a stuck session"
        ) from exc
    conn.execute("SELECT set_config('lock_timeout', %s, true)", (str(lock_timeout[0]) if lock_timeout else "0",))


def _recorded(conn: psycopg.Connection) -> dict[str, int]:
    return {c: int(v) for c, v in conn.execute("SELECT component, version FROM traboule_schema")}
