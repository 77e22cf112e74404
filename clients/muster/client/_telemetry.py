"""Tracing for client processes (the agent, the commands): on when the ``OTEL_*`` variables ask for
it and the OpenTelemetry SDK is installed (it comes with the server extra); the base install traces
nothing and propagates nothing, at no cost.

Every call the client makes is a CLIENT span (``muster.client``), and its W3C trace context goes
with the call, so the servers' spans join the caller's trace.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from muster.api.rules import tracing_requested

log = logging.getLogger(__name__)


def setup_tracing(service_name: str) -> Any:
    """Installs the global tracer provider exporting over OTLP; returns it (``shutdown()`` flushes), or
    None when tracing is off or the SDK is missing (said once in the log)."""
    if not tracing_requested():
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("OTEL_* asks for traces but the OpenTelemetry SDK is not installed: pip install 'muster[server]'")
        return None
    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
