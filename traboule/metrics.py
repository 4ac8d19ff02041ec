"""Prometheus metrics of the engine (served on ``/metrics`` by `traboule.app.http`).

The counters live in the core so that every layer may count (the MWL SCP counts its queries), the composition
root only serves them.
"""

from __future__ import annotations

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
mwl_queries = Counter("traboule_mwl_queries", "MWL C-FIND queries answered", registry=REGISTRY)
