"""Helpers for testing a channel plug-in against the real engine, in the test's own process.

An engine here is the one ``traboule run`` starts (`Runtime`, the embedded durable bus, the journal), with its data
in a temporary folder and only the channels the test names. No pytest dependency: a plug-in's ``conftest.py``
builds its fixtures from these (``traboule new channel`` writes one). See docs/plugins.md.

    async with running_engine(engine_config(tmp_path, [{"name": "audit", "kind": "audit"}])) as runtime:
        event = await publish(runtime, "order.new", ImagingOrder(...))
        await until(lambda: ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from traboule.app import runtime as runtime_mod
from traboule.app.config import Config
from traboule.app.runtime import Runtime
from traboule.model import Envelope, Payload

GROUPS = {"traboule.channels": runtime_mod.BUILTIN_CHANNELS, "traboule.adapters": runtime_mod.BUILTIN_ADAPTERS}


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_config(data_dir: Path, channels: list[dict[str, Any]], *, orders: bool = False) -> Config:
    """A configuration with its data in ``data_dir`` and these ``[[channels]]`` tables only. ``orders`` adds the
    default ``hl7-orders`` channel (``ris-orders``, the shipped mappings) on a free port, for `send_hl7`."""
    config = Config(data_dir=str(data_dir))
    if orders:
        (ris,) = [c for c in config.channels if c["kind"] == "hl7-orders"]
        ris["source"]["port"] = free_port()
        config.channels = [ris, *channels]
    else:
        config.channels = list(channels)
    return config


@contextlib.asynccontextmanager
async def running_engine(config: Config, process: str | None = None) -> AsyncIterator[Runtime]:
    """The engine started with ``config`` (every channel in this process unless ``process`` names one), stopped
    on the way out."""
    engine = Runtime(config, process=process)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def publish(
    runtime: Runtime,
    topic: str,
    payload: Payload,
    *,
    event_id: str = "",
    source: str = "test",
    correlation_id: str = "",
    idempotency_key: str = "",
) -> Envelope:
    """Put an event on the bus as the outbox does (the Envelope's JSON, message id = event id). The same
    ``event_id`` twice is what a redelivery looks like to a consumer."""
    env = Envelope(payload, source=source, correlation_id=correlation_id, idempotency_key=idempotency_key)
    if event_id:
        env.id = event_id
    await runtime.bus.publish(topic, env.to_json(), message_id=env.id)
    return env


async def send_hl7(runtime: Runtime, *messages: bytes, channel: str = "ris-orders") -> list[bytes]:
    """Send HL7 v2 messages to the MLLP listener of an ``hl7-orders`` channel (see `engine_config`); the ACKs."""
    from traboule.adapters.mllp import MLLPClient

    port = runtime.channel(channel).listener.port  # type: ignore[attr-defined]
    async with MLLPClient("127.0.0.1", port, timeout=10) as client:
        return [await client.send(m) for m in messages]


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def entry_points(pyproject: Path) -> dict[str, dict[str, str]]:
    """The ``traboule.channels`` / ``traboule.adapters`` entry points a package's pyproject.toml declares."""
    with pyproject.open("rb") as fh:
        declared = tomllib.load(fh).get("project", {}).get("entry-points", {})
    return {group: dict(declared.get(group, {})) for group in GROUPS}


@contextlib.contextmanager
def use_entry_points(pyproject: Path) -> Iterator[dict[str, dict[str, str]]]:
    """Make the engine find the kinds a package declares, as ``pip install`` would (for its tests, installed or
    not); each ``module:Class`` target must import. Undone on the way out."""
    declared = entry_points(pyproject)
    saved = {group: dict(table) for group, table in GROUPS.items()}
    try:
        for group, found in declared.items():
            for name, target in found.items():
                module, _, attr = target.partition(":")
                getattr(__import__(module, fromlist=[attr]), attr)  # a wrong target fails here, by name
                GROUPS[group][name] = target
        yield declared
    finally:
        for group, table in GROUPS.items():
            table.clear()
            table.update(saved[group])
