"""Which bus the engine runs on: chosen at start-up from the configuration (the core names the contract only)."""

from __future__ import annotations

from traboule.bus import Bus
from traboule.bus.embedded import EmbeddedBus


def make_bus(
    amqp_url: str,
    data_dir: str,
    *,
    exchange: str = "traboule",
    shared: bool = False,
    queue_type: str = "classic",
    partitions: int = 1,
) -> Bus:
    """RabbitMQ when an AMQP URL is configured (several brokers of one cluster comma-separated, ``queue_type``
    ``classic`` or ``quorum``, ``partitions`` queues per subscriber), otherwise the embedded durable bus (one
    process: its queues are already delivered in order, ``partitions`` does not apply).

    ``shared``: other engine processes publish to the same embedded bus file; their publishes cannot wake this
    process's consumers, so consumers poll every 20 ms (an indexed query) instead of every 0.5 s.
    """
    if amqp_url:
        from traboule.adapters.rabbitmq import RabbitMQBus  # aio-pika is imported only by engines that use it

        if queue_type not in ("classic", "quorum"):
            raise ValueError(f"queue_type {queue_type!r}: use 'classic' or 'quorum'")
        return RabbitMQBus(
            amqp_url,
            exchange=exchange,
            queue_type="quorum" if queue_type == "quorum" else "classic",
            partitions=partitions,
        )
    return EmbeddedBus(f"{data_dir}/bus.sqlite", poll_interval=0.02 if shared else 0.5)
