"""What the channels that send HL7 v2 messages to one MLLP destination share: the sender, its health, the parties
of the MSH and the marks of what the receiver accepted.

`HL7SenderChannel` is the base of ``hl7-status`` (procedure status to the RIS) and ``hl7-documents`` (CDA reports
to a DRIMbox feed): both consume bus events, turn each into one message, send it and mark the event done once the
receiver acknowledged it (at least once: a crash between the ACK and the mark sends the message again). The marks
and the channel's own rows (known orders, pending documents) are its `traboule.stores.SenderState`: in
``<data_dir>/<name>.sqlite``, or the PostgreSQL database every node shares. Its calls go through `state_call`: in a
worker thread when the store allows it (always on PostgreSQL: a slow or unreachable server never stalls the event
loop, nor the bus connection's heartbeats it serves).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from traboule.adapters.mllp import MLLPSender
from traboule.app.health import DestinationHealth, channel_health
from traboule.channel import ChannelRuntime, ConsumerChannel
from traboule.formats import hl7
from traboule.stores.factory import stores_of
from traboule.stores.idempotency import Legacy

T = TypeVar("T")


class HL7SenderChannel(ConsumerChannel):
    """A consumer channel sending HL7 v2 over MLLP to ``destination``; subclasses say who receives and what."""

    receiver: ClassVar[str]  # MSH-5 when the configuration names none
    legacy_sent: ClassVar[Legacy]  # the table an earlier version kept its marks in, moved into ``applied`` at open

    def __init__(self, config: dict[str, Any], runtime: ChannelRuntime) -> None:
        super().__init__(config, runtime)
        self.parties = hl7.Parties.from_config(config, receiver=self.receiver)
        self.sender = MLLPSender.from_config(self.name, config.get("destination"), runtime.config.tls)
        self.destination = DestinationHealth(self.sender.address)
        # What was sent decides what is sent again: a mark must survive a power cut.
        self.state = stores_of(runtime).sender_state(self.name, legacy=[self.legacy_sent])

    async def stop(self) -> None:
        await self.sender.close()
        self.state.close()

    async def state_call(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call(*args, **kwargs)``, a method of the channel's state: in a worker thread when the store may be
        called from one (its ``threads``), else on the event loop (a SQLite connection opened for this thread)."""
        if getattr(self.state, "threads", False):
            return await asyncio.to_thread(call, *args, **kwargs)
        return call(*args, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "destinations": [self.sender.address], "message": self.message}

    def health(self) -> dict[str, Any]:
        return channel_health(self.destination)
