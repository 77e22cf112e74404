"""Metrics through OpenTelemetry: instruments every part of the server records into, and the readers
that expose them — a Prometheus scrape endpoint (``metrics_listen``) and/or OTLP
(``OTEL_METRICS_EXPORTER=otlp``). Off (no-op instruments, no cost) when neither is configured.

The series (Prometheus names; OpenTelemetry turns dots into underscores and adds unit suffixes):

- ``muster_rpc_duration_milliseconds`` (histogram; ``rpc_method``, ``rpc_grpc_status_code``): every RPC
  answered, so rates and latencies per method;
- ``muster_heartbeats_total`` and ``muster_heartbeat_gap_seconds`` (histogram: time since the node's
  previous heartbeat — compare with ``heartbeat_interval``), ``muster_heartbeat_commit_milliseconds``
  (time a heartbeat waited for its group commit);
- ``muster_watch_streams`` (gauge), ``muster_watch_messages_total``, ``muster_watch_lag_events``
  (histogram: how far behind the head a stream's message was when sent), ``muster_events_head_revision``;
- ``muster_lock_wait_milliseconds`` (acquire to grant), ``muster_lock_hold_milliseconds`` (grant to
  release);
- ``muster_placements_total`` (``strategy``), ``muster_sessions_moved_total``,
  ``muster_placement_batches_total`` (``attempt``: ``first``, ``again``, ``locked``);
- ``muster_node_sessions`` (gauge; ``state`` = ``placed`` or ``started``): the nodes' sessions as the
  registry's node view counts them (the balancer's sessions that have not ended; see README "Nodes and
  leases"), the same count `muster list-nodes` shows;
- ``muster_db_pool_connections`` (gauge; ``state`` = ``in_use`` or ``idle``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import metrics

log = logging.getLogger(__name__)

_meter = metrics.get_meter("muster")

rpc_duration = _meter.create_histogram("muster.rpc.duration", unit="ms", description="RPCs answered")
heartbeats = _meter.create_counter("muster.heartbeats", description="Heartbeats committed")
heartbeat_gap = _meter.create_histogram(
    "muster.heartbeat.gap", unit="s", description="Time since the node's previous heartbeat"
)
heartbeat_commit = _meter.create_histogram(
    "muster.heartbeat.commit", unit="ms", description="Time a heartbeat waited for its group commit"
)
watch_messages = _meter.create_counter("muster.watch.messages", description="Watch stream messages sent")
watch_lag = _meter.create_histogram(
    "muster.watch.lag", unit="events", description="Events between the head and a message's last revision when sent"
)
lock_wait = _meter.create_histogram("muster.lock.wait", unit="ms", description="From acquire to grant")
lock_hold = _meter.create_histogram("muster.lock.hold", unit="ms", description="From grant to release")
placements = _meter.create_counter("muster.placements", description="Sessions placed, by strategy")
sessions_moved = _meter.create_counter("muster.sessions.moved", description="Sessions moved off failed nodes")
placement_batches = _meter.create_counter(
    "muster.placement.batches",
    description="Placement batches written, by attempt: first (decided on an unlocked read), again (after "
    "another batch changed the counts first), locked (decided under the placement lock)",
)


def observe(
    name: str, description: str, read: Callable[[], Iterable[tuple[float, dict[str, str]]]], unit: str = ""
) -> None:
    """Registers a gauge read when scraped (``read`` yields (value, attributes))."""

    def callback(_options: Any) -> Iterable[metrics.Observation]:
        try:
            return [metrics.Observation(v, a) for v, a in read()]
        except Exception:  # noqa: BLE001 - a scrape must not fail for one gauge
            return []

    _meter.create_observable_gauge(name, callbacks=[callback], unit=unit, description=description)


def metrics_requested(listen: str | None) -> bool:
    """Whether a scrape endpoint or ``OTEL_METRICS_EXPORTER`` asks for metrics."""
    exporter = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    return bool(listen) or exporter not in ("", "none")


def setup_metrics(service_name: str, listen: str | None) -> Any:
    """Installs the global meter provider with a Prometheus reader (serving ``listen``, ``host:port``)
    and/or an OTLP reader; returns it (``shutdown()`` at the end), or None when metrics are off."""
    if not metrics_requested(listen):
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    readers: list[Any] = []
    if listen:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
        readers.append(PrometheusMetricReader())
        log.info("metrics on http://%s/metrics", listen, extra={"event": "metrics_on"})
    exporter = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    if exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = MeterProvider(metric_readers=readers, resource=Resource.create({"service.name": name}))
    metrics.set_meter_provider(provider)
    return provider
