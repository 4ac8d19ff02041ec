"""The push message of a ``fhir`` channel: which of its resources to mirror to the FHIR server, on the bus.

The channel publishes one after an event's resources are committed (topic ``fhir.<channel>.push``); its FHIR server
destination consumes them (queue ``<channel>.push``) and sends the current version of each resource named. The body
is a JSON list of ``[resource type, id]`` pairs. ``traboule fhir resend`` publishes the same messages.
"""

from __future__ import annotations

import json

Key = tuple[str, str]  # (resource type, id)


def push_topic(channel: str) -> str:
    return f"fhir.{channel}.push"


def push_queue(channel: str) -> str:
    return f"{channel}.push"


def push_message(keys: list[Key]) -> bytes:
    return json.dumps([list(k) for k in keys]).encode()


def push_keys(body: bytes) -> list[Key]:
    """The resources a push message names (the inverse of `push_message`)."""
    return [(str(t), str(i)) for t, i in json.loads(body)]
