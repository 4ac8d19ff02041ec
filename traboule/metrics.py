"""Prometheus metrics of the engine (served on ``/metrics`` by `traboule.app.http`).

The counters live in the core so that every layer may count (the MWL SCP counts its queries), the composition
root only serves them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

messages_received = Counter(
    "traboule_messages_received", "Inbound messages by channel and outcome", ["channel", "status"], registry=REGISTRY
)
events_processed = Counter(
    "traboule_events_processed",
    "Bus events handled by channel and outcome",
    ["channel", "outcome"],
    registry=REGISTRY,
)
ack_seconds = Histogram(
    "traboule_ack_seconds",
    "Time from message received to ACK written",
    ["channel"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
outbox_pending = Gauge("traboule_outbox_pending", "Journaled events not yet on the bus", registry=REGISTRY)
worklist_items = Gauge("traboule_worklist_items", "Items in the worklist", registry=REGISTRY)
journal_index_lag = Gauge(
    "traboule_journal_index_lag",
    "Journal entries not in the search index yet (the journal's last id less the last indexed; on the node indexing)",
    registry=REGISTRY,
)
audit_queue_depth = Gauge(
    "traboule_audit_queue_depth",
    "Audit messages waiting for the audit record repository (on the node's main process, which sends them)",
    registry=REGISTRY,
)
audit_dropped = Counter(
    "traboule_audit_dropped",
    "Audit events lost: the trail's buffer full (the disk not taking them) or recorded after the trail closed",
    registry=REGISTRY,
)
mwl_queries = Counter("traboule_mwl_queries", "MWL C-FIND queries answered", registry=REGISTRY)
alerts_open = Gauge(
    "traboule_alerts_open", "Alert incidents open (on the node evaluating the rules)", registry=REGISTRY
)
alert_notifications = Counter(
    "traboule_alert_notifications",
    "Alert notifications by notifier and outcome (sent, failed: an attempt to retry)",
    ["notifier", "outcome"],
    registry=REGISTRY,
)
deliveries = Counter(
    "traboule_deliveries",
    "Bus deliveries handled by the channel consuming them, by queue (a channel's name, or <fhir channel>.push for its"
    " FHIR server) and outcome (ok; error: the bus retries it, then dead-letters it)",
    ["queue", "outcome"],
    registry=REGISTRY,
)
delivery_seconds = Histogram(
    "traboule_delivery_seconds",
    "Time a channel took to handle one bus delivery (a batch consumer: one batch), by queue",
    ["queue"],
    registry=REGISTRY,
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
queue_depth = Gauge(
    "traboule_queue_depth",
    "Messages waiting in a channel's bus queue (measured when /metrics is read)",
    ["queue"],
    registry=REGISTRY,
)
dead_letters = Gauge(
    "traboule_dead_letters",
    "Messages in a channel queue's dead letters (measured when /metrics is read)",
    ["queue"],
    registry=REGISTRY,
)
process_restarts = Counter(
    "traboule_process_restarts",
    "Restarts of a child process by the main process's supervisor",
    ["child"],
    registry=REGISTRY,
)

QUEUE_TIMEOUT = 2.0  # seconds the bus has to count one queue for a scrape


@contextmanager
def delivering(queue: str, messages: int = 1) -> Iterator[None]:
    """Count ``messages`` deliveries of ``queue`` handled (ok, or error when the block raises) and time the block.
    ``queue`` comes from the configuration (a channel's name), never from a received value."""
    started = time.perf_counter()
    try:
        yield
    except asyncio.CancelledError:  # the engine stopping: not an outcome of the delivery
        raise
    except BaseException:
        deliveries.labels(queue, "error").inc(messages)
        delivery_seconds.labels(queue).observe(time.perf_counter() - started)
        raise
    deliveries.labels(queue, "ok").inc(messages)
    delivery_seconds.labels(queue).observe(time.perf_counter() - started)


async def measure_queues(bus: Any, queues: Iterable[str], timeout: float = QUEUE_TIMEOUT) -> None:
    """Set `queue_depth` and `dead_letters` of ``queues`` (configured names) from ``bus``; a queue the bus does not
    count within ``timeout`` (broker unreachable) keeps its last values."""
    from traboule.bus import dlq_name

    async def one(queue: str) -> None:
        try:
            waiting, dead = await asyncio.wait_for(
                asyncio.gather(bus.depth(queue), bus.depth(dlq_name(queue))), timeout
            )
        except Exception:  # a scrape answers with what it has
            return
        queue_depth.labels(queue).set(waiting)
        dead_letters.labels(queue).set(dead)

    await asyncio.gather(*(one(q) for q in dict.fromkeys(queues)))
