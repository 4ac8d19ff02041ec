"""A complete custom channel: a wire tap that appends every order event to a JSON-lines file.

Declared in a site package's pyproject.toml:

    [project.entry-points."traboule.channels"]
    audit = "mysite.audit_channel:AuditChannel"

and configured in traboule.toml:

    [[channels]]
    name = "audit"
    kind = "audit"
    file = "/var/log/traboule/orders.jsonl"
"""

from __future__ import annotations

import json
from typing import Any

from traboule.bus import Delivery
from traboule.model import Envelope


class AuditChannel:
    kind = "audit"

    def __init__(self, config: dict[str, Any], runtime: Any):
        self.name = config["name"]
        self.runtime = runtime
        self.path = config.get("file", "audit.jsonl")

    async def start(self) -> None:
        await self.runtime.bus.subscribe(self.name, ["order.#"], self.handle, max_attempts=3)

    async def stop(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": ["bus:order.#"], "destinations": [self.path]}

    async def handle(self, delivery: Delivery) -> None:
        env = Envelope.from_json(delivery.body)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": env.id, "topic": delivery.topic, "order": env.payload.key}) + "\n")
