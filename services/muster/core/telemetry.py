"""Tracing: an OpenTelemetry span for every RPC a server answers and every SQL statement it runs.

Configured by the standard ``OTEL_*`` variables: tracing is on when ``OTEL_TRACES_EXPORTER`` names
an exporter (``otlp``, ``console``) or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); ``OTEL_SERVICE_NAME`` names the service. Off otherwise, at
no cost. Health checks and reflection are not traced.

What spans carry: the RPC's method and status (and the domain error's message, which never holds
key material or tokens), and each statement's SQL text — never its parameters, which is why every
secret is passed to SQL as a parameter.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import trace

from muster.api.rules import tracing_requested
from muster.core import metrics

log = logging.getLogger(__name__)

__all__ = ["Tracing", "TracingInterceptor", "setup_tracing", "tracing_requested", "annotate"]

UNTRACED = ("/grpc.health.", "/grpc.reflection.")
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass
class Tracing:
    """An installed tracer provider and the server interceptor that opens a span per RPC."""

    provider: Any

    def server_interceptors(self) -> list[Any]:
        """The tracing interceptor (first, so that its span covers authentication too)."""
        return [TracingInterceptor(self.provider.get_tracer("muster.core.server"))]

    def shutdown(self) -> None:
        """Flushes and stops the exporters; stops tracing SQL."""
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor

        AsyncPGInstrumentor().uninstrument()
        self.provider.shutdown()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per RPC (with a tracer), child of the caller's W3C trace context
    (``traceparent`` metadata), and the RPC's duration and status in ``muster.rpc.duration``.

    OpenTelemetry's own aio interceptor supports only async-generator streaming handlers; ours
    (WatchEvents, KeepAlive, Session) write with ``context.write``, so this one wraps both shapes.
    The span is current while the handler runs, so SQL spans are its children. It records the
    method, the status code and the status message (domain errors' messages carry no secrets),
    never a request or response.
    """

    def __init__(self, tracer: Any | None) -> None:
        self._tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNTRACED):
            return handler
        carrier = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        name = method.lstrip("/")
        service, _, rpc = name.rpartition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}

        def start() -> Any:
            from opentelemetry import propagate
            from opentelemetry.trace import SpanKind

            if self._tracer is None:
                return contextlib.nullcontext(None)
            return self._tracer.start_as_current_span(
                name,
                context=propagate.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            )

        def wrap(behavior: Any, streaming_response: bool) -> Any:
            if streaming_response and inspect.isasyncgenfunction(behavior):

                async def traced_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    began = time.monotonic()
                    with start() as span:
                        try:
                            async for response in behavior(request, context):
                                yield response
                        finally:
                            _finish(span, context, rpc, began)

                return traced_stream

            async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
                began = time.monotonic()
                with start() as span:
                    try:
                        return await behavior(request, context)
                    finally:
                        _finish(span, context, rpc, began)

            return traced

        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
        )
        for attr, make, streaming_response in kinds:
            behavior = getattr(handler, attr)
            if behavior is not None:
                return make(
                    wrap(behavior, streaming_response),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def _finish(span: Any, context: grpc.aio.ServicerContext, method: str, began: float) -> None:
    from opentelemetry.trace import Status, StatusCode

    code = context.code()
    if isinstance(code, int):
        code = _CODES.get(code)
    code = code or grpc.StatusCode.OK
    metrics.rpc_duration.record(
        1000 * (time.monotonic() - began), {"rpc.method": method, "rpc.grpc.status_code": code.name}
    )
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        details = context.details()
        text = details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {text}" if text else code.name))


def _exporters(names: str) -> list[Any]:
    out: list[Any] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name in ("", "otlp"):
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported; use otlp or console", name)
    return out


def _sampler() -> Any:
    """Follows the caller's sampling decision; a root span is kept unless it is a lone SQL statement
    (the background loops — reaper, clock, health — would each make a one-span trace a second)."""
    from opentelemetry.sdk.trace.sampling import Decision, ParentBased, Sampler, SamplingResult
    from opentelemetry.trace import SpanKind

    class NoLoneSql(Sampler):
        def should_sample(
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
        ):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201, E501
            if kind == SpanKind.CLIENT and attributes and any(k.startswith("db.") for k in attributes):
                return SamplingResult(Decision.DROP)
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)

        def get_description(self) -> str:
            return "NoLoneSql"

    return ParentBased(root=NoLoneSql())


def setup_tracing(service_name: str, *, exporter: Any = None) -> Tracing | None:
    """Installs tracing when ``OTEL_*`` asks for it, or with ``exporter`` (tests: an in-memory one).

    Returns None when tracing is off.
    """
    if exporter is None and not tracing_requested():
        return None
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=_sampler())
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        for exp in _exporters(os.environ.get("OTEL_TRACES_EXPORTER", "otlp")):
            provider.add_span_processor(BatchSpanProcessor(exp))
    instrumentor = AsyncPGInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=provider)
    log.info("tracing on as service %s", name, extra={"event": "tracing_on"})
    return Tracing(provider)


def annotate(**attributes: str | int | float | bool) -> None:
    """Adds attributes (node id, lock name, strategy…) to the current span; nothing when not tracing.
    Never pass a key or a token."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({f"muster.{k}": v for k, v in attributes.items()})
