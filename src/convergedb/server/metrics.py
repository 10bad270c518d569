"""Metrics in the Prometheus format, read from the server's own counters at scrape time.

Nothing here runs on the write path: the engine and the connections keep plain integer
counters, and a custom collector turns them into metric families when /metrics is scraped.
The only metric observed as it happens is the flush-duration histogram (once per flush).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..protocol.codes import ErrorCode, Opcode

if TYPE_CHECKING:
    from .app import Server

FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerCollector(Collector):
    """Reads the server's counters when scraped."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        engine = server.engine
        writes = CounterMetricFamily(
            "convergedb_writes", "Write operations applied, by operation.", labels=["op"]
        )
        for op, count in engine.writes.items():
            writes.add_metric([Opcode(op).name.lower()], count)
        yield writes
        rejected = CounterMetricFamily(
            "convergedb_rejected_writes",
            "Write operations rejected, by error code.",
            labels=["code"],
        )
        for code, count in sorted(server.rejected.items()):
            rejected.add_metric([ErrorCode(code).name], count)
        yield rejected
        yield CounterMetricFamily("convergedb_flushes", "Flushes run.", value=engine.flushes)
        yield GaugeMetricFamily("convergedb_seq", "The last committed flush seq.", value=engine.seq)
        yield GaugeMetricFamily(
            "convergedb_log_backlog",
            "Flushes in the store's log not yet checkpointed (replayed at start-up).",
            value=server.store.log_backlog(),
        )
        yield from self._kinds()
        yield from self._connections()
        yield from self._subscriptions()

    def _kinds(self) -> Iterator[Metric]:
        entities = GaugeMetricFamily(
            "convergedb_entities", "Alive entities, by kind.", labels=["kind"]
        )
        tombstones = GaugeMetricFamily(
            "convergedb_tombstones", "Tombstones awaiting compaction, by kind.", labels=["kind"]
        )
        for kind in self.server.catalog.by_id.values():
            entities.add_metric([kind.name], kind.alive)
            tombstones.add_metric([kind.name], kind.tombstones)
        yield entities
        yield tombstones

    def _connections(self) -> Iterator[Metric]:
        server = self.server
        connections = GaugeMetricFamily(
            "convergedb_connections", "Open client connections, by role.", labels=["role"]
        )
        connected = [c for c in server.connections if c.connected]
        writers = sum(1 for c in connected if not c.read_only)
        connections.add_metric(["writer"], writers)
        connections.add_metric(["reader"], len(connected) - writers)
        yield connections
        yield GaugeMetricFamily(
            "convergedb_sources_in_grace",
            "Sources whose connection is lost and whose liveness countdown runs.",
            value=len(server.sources.grace),
        )
        yield CounterMetricFamily(
            "convergedb_sources_expired",
            "Sources declared dead by liveness (their entities were retracted).",
            value=server.liveness.expired_sources,
        )

    def _subscriptions(self) -> Iterator[Metric]:
        hub = self.server.subscriptions
        yield CounterMetricFamily(
            "convergedb_notifications",
            "Notification frames sent to subscribers.",
            value=hub.notifications,
        )
        yield GaugeMetricFamily(
            "convergedb_subscriptions",
            "Live state and event subscriptions.",
            value=hub.subscriber_count,
        )
        yield GaugeMetricFamily(
            "convergedb_pending_merged",
            "Merged notifications held for backed-up subscribers (bounded by entities).",
            value=hub.pending_merged(),
        )
        yield CounterMetricFamily(
            "convergedb_slow_subscriber_closes",
            "Connections closed with SLOW_SUBSCRIBER (read nothing for the subscriber timeout).",
            value=hub.slow_closes,
        )


class Metrics:
    """The server's metric registry."""

    def __init__(self, server: Server) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(server))
        self.flush_seconds = Histogram(
            "convergedb_flush_duration_seconds",
            "Time from the start of a flush to its commit and apply.",
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
        server.engine.on_flushed = self.flush_seconds.observe

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
