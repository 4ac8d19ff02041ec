"""``traboule new channel NAME``: a channel plug-in package that installs beside the engine.

It writes ``traboule-NAME/`` with a pyproject.toml declaring the kind in the ``traboule.channels`` entry point
group, ``traboule_NAME/channel.py`` (a documented channel on ``traboule.channel.ConsumerChannel`` consuming bus
topics into its own SQLite table, idempotent per event), a README, and a test that runs the channel in a real
engine (``traboule.testing``) and passes as written. See docs/plugins.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from traboule.errors import ScaffoldError

NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def names(kind: str) -> dict[str, str]:
    """The kind, its distribution, package and class names: ``audit-log`` → traboule-audit-log,
    traboule_audit_log, AuditLogChannel."""
    if not NAME.fullmatch(kind) or len(kind) > 40:
        raise ScaffoldError(f"{kind!r}: a channel kind is lower-case words joined by '-' (e.g. audit-log), 40 at most")
    package = "traboule_" + kind.replace("-", "_")
    return {
        "kind": kind,
        "dist": f"traboule-{kind}",
        "package": package,
        "cls": "".join(part.capitalize() for part in kind.split("-")) + "Channel",
    }


def new_channel(kind: str, parent: Path) -> Path:
    """Write the package folder ``parent/traboule-KIND``; refuses a kind the engine already has, or an existing
    folder (nothing is overwritten). Returns the folder."""
    from traboule.app.runtime import installed

    n = names(kind)
    taken = installed("traboule.channels")
    if kind in taken:
        raise ScaffoldError(f"channel kind {kind!r} is already installed ({taken[kind]}): choose another name")
    root = parent / n["dist"]
    if root.exists():
        raise ScaffoldError(f"{root} already exists")
    files = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{n['package']}/__init__.py": INIT,
        f"{n['package']}/channel.py": CHANNEL,
        "tests/__init__.py": "",
        "tests/conftest.py": CONFTEST,
        "tests/test_channel.py": TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**n) if template else "", encoding="utf-8")
    return root


PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "traboule channel plug-in: {kind}"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["traboule"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.23"]

# How the engine finds the kind: `kind = "{kind}"` in a [[channels]] table loads this class.
[project.entry-points."traboule.channels"]
{kind} = "{package}.channel:{cls}"

[tool.setuptools]
packages = ["{package}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
"""

README = """\
# {dist}

A traboule channel plug-in: kind `{kind}`. It consumes events from the engine's bus
(`order.#` by default) and records each one (event id, topic, payload kind, key) in its own SQLite table,
`<data_dir>/<channel name>.sqlite`, once per event. Replace `on_event` in `{package}/channel.py` with what your
site needs; the engine's plug-in guide (traboule `docs/plugins.md`) says what a channel receives and must do.

## Install beside the engine

```sh
/path/to/traboule/.venv/bin/pip install -e .      # the engine's environment
/path/to/traboule/.venv/bin/traboule channels     # lists `{kind}`
```

## Configure

```toml
[[channels]]
name = "{kind}"
kind = "{kind}"
topics = ["order.#"]       # bus topics to consume (AMQP patterns)
max_attempts = 5           # then the event goes to the dead-letter queue {kind}.dlq
# process = "worker"       # run it in another engine process (default: main)
```

`traboule check` builds the channel as `traboule run` would, and reports a configuration error.

## Test

```sh
/path/to/traboule/.venv/bin/python -m pytest            # installed, or with this folder on PYTHONPATH
```

The tests start a real engine in the test process (`traboule.testing`), with the embedded bus in a temporary
folder, and publish events to it.
"""

INIT = '''\
"""traboule channel plug-in: {kind}."""
'''

CHANNEL = '''\
"""Channel ``{kind}``: bus events → one row per event in the channel's own SQLite table.

A skeleton to make your own, on ``traboule.channel.ConsumerChannel``: the base binds the channel's queue to its
``topics`` setting, subscribes with ``max_attempts``, decodes each delivery and calls ``on_event`` with the
channel, the message id and the correlation id bound to every log line written meanwhile. ``on_event`` is called
once per delivery (at least once per event: after a crash or a failed attempt the same event comes again, so it
records by event id and a second delivery changes nothing). Raising makes the bus retry with backoff, then
dead-letter the event to ``<name>.dlq`` after ``max_attempts`` (``traboule dlq list --channel <name>``); raise
``traboule.bus.PermanentError`` when a retry cannot help.

Settings are declared on the class with ``traboule.channel.Setting`` (type, default, allowed values, bounds): a
wrong value stops ``traboule check`` and ``traboule run`` with ``channel NAME: KEY must be ...``.

Configuration::

    [[channels]]
    name = "{kind}"
    kind = "{kind}"
    topics = ["order.#"]      # what to consume (AMQP topic patterns: order.new, patient.*, #)
    max_attempts = 5
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from traboule.bus import Delivery
from traboule.channel import ChannelRuntime, ConsumerChannel, Setting
from traboule.model import Envelope
from traboule.stores.sqlite import Durability, open_database

log = structlog.get_logger("{package}")


class {cls}(ConsumerChannel):
    kind = "{kind}"
    topics = Setting(list, ["order.#"])  # the default; the channel's ``topics`` setting replaces it
    max_attempts = Setting(int, 5, minimum=1)

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime):
        """Built from the channel's [[channels]] table, in every engine process and by ``traboule check``: the base
        reads and checks the settings; open only local files here, nothing that listens until ``start``."""
        super().__init__(config, runtime)
        # POWER_LOSS: a committed row survives a power cut (what was recorded decides what is recorded again).
        self._db = open_database(runtime.data_dir / f"{{self.name}}.sqlite", Durability.POWER_LOSS)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events "
            "(event_id TEXT PRIMARY KEY, topic TEXT, kind TEXT, key TEXT, received TEXT)"
        )

    async def stop(self) -> None:
        self._db.close()

    def describe(self) -> dict[str, Any]:
        """What ``/channels`` and the start-up log show."""
        return {{**super().describe(), "destinations": ["sqlite:events"]}}

    async def on_event(self, env: Envelope, delivery: Delivery) -> None:
        key = getattr(env.payload, "key", "")  # an ImagingOrder's placer / filler / accession key
        done = self._db.execute(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?)",
            (env.id, delivery.topic, env.kind, key, datetime.now(UTC).isoformat(timespec="milliseconds")),
        ).rowcount
        # Ids only in logs, never patient data: the channel, message id and correlation id are bound already.
        log.info("event.recorded" if done else "event.duplicate", topic=delivery.topic, attempt=delivery.attempt)

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def topics_recorded(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT topic FROM events ORDER BY rowid")]
'''

CONFTEST = '''\
"""The engine finds this package's channel kinds (its pyproject's entry points) whether it is installed or not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from traboule.testing import use_entry_points

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.fixture(autouse=True)
def plugin_kinds() -> Iterator[dict[str, dict[str, str]]]:
    with use_entry_points(PYPROJECT) as declared:
        yield declared
'''

TEST = '''\
"""The ``{kind}`` channel in a real engine: embedded bus and journal in a temporary folder, in this process."""

from __future__ import annotations

from pathlib import Path

from traboule.model import Identifier, ImagingOrder, Patient, PatientUpdate, ScheduledStep
from traboule.testing import engine_config, publish, running_engine, until


def order(accession: str) -> ImagingOrder:
    return ImagingOrder(
        placer_order_number=Identifier(f"PLC-{{accession}}", "RIS"),
        accession_number=Identifier(accession),
        patient=Patient(ids=[Identifier("IPP1", "HOSP")]),
        steps=[ScheduledStep(step_id="S1", modality="CT", start="20260105093000")],
    )


def test_the_kind_is_declared(plugin_kinds: dict[str, dict[str, str]]) -> None:
    assert plugin_kinds["traboule.channels"] == {{"{kind}": "{package}.channel:{cls}"}}


async def test_each_order_event_is_recorded_once(tmp_path: Path) -> None:
    config = engine_config(tmp_path, [{{"name": "{kind}", "kind": "{kind}", "topics": ["order.#"]}}])
    async with running_engine(config) as runtime:
        channel = runtime.channel("{kind}")
        first = await publish(runtime, "order.new", order("ACC1"))
        await publish(runtime, "order.new", order("ACC1"), event_id=first.id)  # a redelivery of the same event
        await publish(runtime, "patient.update", PatientUpdate(patient=Patient(ids=[Identifier("IPP1", "HOSP")])))
        await publish(runtime, "order.cancel", order("ACC1"))
        await until(lambda: "order.cancel" in channel.topics_recorded())  # the queue is in order: all seen
        assert channel.topics_recorded() == ["order.new", "order.cancel"]  # once each; not subscribed to patient.*
'''
