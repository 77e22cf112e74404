"""serve(): the lifecycle every service process shares.

Open the pool (waiting for the database), apply migrations under the advisory lock, start the
event bus, mount the components' servicers with health checking and reflection, and on SIGTERM
shut down in order: health NOT_SERVING, end watch streams with UNAVAILABLE (clients resume
elsewhere), stop the server within the grace period, close the pool under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from muster.core import auth, clock, config, db, events, metrics, migrate, periodic, telemetry
from muster.core.config import Settings
from muster.core.watch import Streams

log = logging.getLogger(__name__)

# Components by name: module:attribute of a class implementing Component. Imported lazily, so a
# process loads only the services it runs.
COMPONENTS = {
    "registry": "muster.registry.component:RegistryComponent",
    "locks": "muster.locks.component:LocksComponent",
    "keys": "muster.keys.component:KeysComponent",
    "balancer": "muster.balancer.component:BalancerComponent",
}

_LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
]


@dataclass
class Runtime:
    """What a component gets from the process: settings, pool, event bus, health."""

    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    bus: events.EventBus
    streams: Streams
    health: health.aio.HealthServicer
    security: auth.Security | None = None  # tokens and TLS; ``call_metadata()`` for calls to other services
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    components: dict[str, Any] = field(default_factory=dict)  # the components in this process, by name
    address: str = ""  # where this process serves (a wildcard host as 127.0.0.1), known before start()

    def spawn(self, coro: Any, name: str) -> None:
        """Starts a background task that shutdown cancels."""
        self.tasks.append(asyncio.create_task(coro, name=name))


class Component(Protocol):
    """A service mounted in a server process."""

    service_name: str

    def __init__(self, runtime: Runtime) -> None: ...

    def mount(self, server: grpc.aio.Server) -> list[str]:
        """Adds the servicer; returns the full service names it serves."""
        ...

    async def start(self) -> None:
        """Starts background work."""
        ...

    async def stop(self) -> None:
        """Stops background work (after the server stopped)."""
        ...


def load_component(name: str) -> type[Component]:
    """The component class for a service name (``registry``, …)."""
    try:
        target = COMPONENTS[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(sorted(COMPONENTS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


async def run_migrations(dsn: str, components: list[str], *, wait: float) -> list[migrate.Migration]:
    """Applies pending migrations of core and the components (safe with many processes at once)."""
    await db.wait_for_database(dsn, timeout=wait)
    con = await db.connect(dsn)
    try:
        return await migrate.apply(con, migrate.all_migrations(components))
    finally:
        await con.close()


async def _watch_database(runtime: Runtime, names: list[str]) -> None:
    """Health follows the database: NOT_SERVING while no primary can be reached.

    A pooled connection to a server that is now a standby (demoted without a restart) makes the
    pool drop every connection: new ones go to whichever host of the URL is the primary.
    """
    serving: bool | None = None
    while True:
        try:
            async with asyncio.timeout(2):
                async with runtime.pool.acquire() as con:
                    ok = not await con.fetchval("SELECT pg_is_in_recovery()")
            if not ok:
                log.warning("the database is a standby now; reconnecting", extra={"event": "db_standby"})
                await runtime.pool.expire_connections()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - any failure means the store is not usable
            ok = False
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for n in ["", *names]:
                await runtime.health.set(n, status)
            if serving is not None:
                log.warning(
                    "database %s",
                    "reachable again" if ok else "unreachable",
                    extra={"event": "db_health", "serving": ok},
                )
            serving = ok
        await asyncio.sleep(0.5 if not ok else 1.0)


async def _maintain(runtime: Runtime) -> None:
    """Ticks the outage clock every second and compacts the event log now and then."""
    s = runtime.settings
    loop = asyncio.get_running_loop()
    next_compaction = loop.time() + s.compaction_interval.total_seconds()

    async def once() -> None:
        nonlocal next_compaction
        async with runtime.pool.acquire() as con, con.transaction():
            await clock.tick(con, threshold=s.outage_threshold, cap=s.max_outage_credit)
        runtime.bus.numberer.kick()
        if loop.time() >= next_compaction:
            next_compaction = loop.time() + s.compaction_interval.total_seconds()
            await events.compact(runtime.pool, keep_events=s.event_retention_events, keep_for=s.event_retention)

    await periodic.every(1.0, once, name="maintenance")


async def serve(
    settings: Settings,
    dsn: str,
    components: list[str],
    *,
    on_ready: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    tracing: telemetry.Tracing | None = None,
    reuse_port: bool = False,
) -> None:
    """Runs the given components in this process until SIGTERM/SIGINT (or ``stop`` is set).

    ``reuse_port`` turns SO_REUSEPORT on, for worker processes that share one port on purpose
    (``--workers``); off, a second server on a taken port fails instead of silently sharing it.

    Tracing follows the ``OTEL_*`` variables (see :mod:`muster.core.telemetry`) unless ``tracing``
    is given (tests pass one with an in-memory exporter; the caller then shuts it down).

    Raises:
        auth.AuthConfigError: the authentication or TLS settings are unusable (before anything starts).
    """
    security = auth.load_security(settings)
    classes = [load_component(c) for c in components]
    own_tracing = tracing is None
    if tracing is None:
        tracing = telemetry.setup_tracing("muster-" + "-".join(components))
    meters = metrics.setup_metrics("muster-" + "-".join(components), settings.metrics_listen)
    # LISTEN and migrations need a real session: behind a transaction pooler they take the direct URL.
    direct = dsn
    if settings.database_direct_url is not None or settings.database_pooled:
        direct = config.database_direct_dsn(settings) or dsn
    applied = await run_migrations(direct, components, wait=settings.database_wait.total_seconds())
    if applied:
        log.info("applied %d migrations", len(applied), extra={"event": "migrated"})
    pool = await db.create_pool(
        dsn,
        min_size=settings.pool_min_size,
        max_size=settings.pool_max_size,
        wait=settings.database_wait.total_seconds(),
        pooled=settings.database_pooled,
    )
    bus = events.EventBus(pool, direct, poll_interval=settings.poll_interval)
    health_servicer = health.aio.HealthServicer()
    runtime = Runtime(settings, dsn, pool, bus, Streams(), health_servicer, security)
    observed: list[Any] = []
    if tracing is not None:
        observed = tracing.server_interceptors()
    elif meters is not None:
        observed = [telemetry.TracingInterceptor(None)]  # durations and statuses, no spans
    interceptors = [*observed, *security.interceptors()]
    if meters is not None:
        _gauges(runtime)
    options = [(k, int(reuse_port) if k == "grpc.so_reuseport" else v) for k, v in SERVER_OPTIONS]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    instances = [cls(runtime) for cls in classes]
    runtime.components.update(zip(components, instances, strict=True))
    names: list[str] = []
    for inst in instances:
        names += inst.mount(server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    credentials = security.server_credentials()
    if credentials is not None:
        port = server.add_secure_port(settings.listen, credentials)
    else:
        port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise RuntimeError(f"cannot listen on {settings.listen}; is the port taken? choose another with --listen")
    host = settings.listen.rpartition(":")[0]
    runtime.address = f"{_LOOPBACK.get(host, host)}:{port}"
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await bus.start()
        for inst in instances:
            await inst.start()
        runtime.spawn(_watch_database(runtime, names), "muster-db-health")
        runtime.spawn(_maintain(runtime), "muster-maintain")
        await server.start()
        host = settings.listen.rpartition(":")[0]
        address = f"{host}:{port}"
        log.info(
            "serving %s on %s (%s)", ", ".join(components), address, security.describe(), extra={"event": "serving"}
        )
        security.announce()
        if on_ready:
            on_ready(address)
        await stop.wait()
        log.info("shutting down", extra={"event": "shutdown"})
    finally:
        await _shutdown(runtime, server, instances)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if own_tracing and tracing is not None:
            tracing.shutdown()
        if meters is not None:
            meters.shutdown()


def _gauges(runtime: Runtime) -> None:
    """The gauges read at each scrape: pool use, open watch streams, the event head."""
    pool = runtime.pool

    def pool_use() -> list[tuple[float, dict[str, str]]]:
        idle = pool.get_idle_size()
        return [(pool.get_size() - idle, {"state": "in_use"}), (idle, {"state": "idle"})]

    metrics.observe("muster.db.pool.connections", "Database connections of this process", pool_use)
    metrics.observe("muster.watch.streams", "Open watch streams", lambda: [(runtime.streams.count, {})])
    metrics.observe("muster.events.head_revision", "The newest revision seen", lambda: [(runtime.bus.head, {})])


async def _shutdown(runtime: Runtime, server: grpc.aio.Server, instances: list[Any]) -> None:
    grace = runtime.settings.grace_period.total_seconds()
    await runtime.health.enter_graceful_shutdown()
    runtime.streams.closing = True
    runtime.bus.wake_streams()  # watch streams end with UNAVAILABLE now, not at the grace deadline
    await server.stop(grace)
    for inst in instances:
        with contextlib.suppress(Exception):
            await inst.stop()
    for t in runtime.tasks:
        t.cancel()
    for t in runtime.tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await t
    await runtime.bus.close()
    try:
        await asyncio.wait_for(runtime.pool.close(), timeout=max(1.0, grace / 2))
    except (TimeoutError, Exception):  # noqa: BLE001
        runtime.pool.terminate()


def configure_logging(level: str, fmt: str = "text") -> None:
    """Logs on stderr: ``text`` lines, or ``json`` — one object per line with the time, level,
    logger, message, the record's structured fields (``event``, ``node``…) and, inside a traced
    RPC, its ``trace_id`` and ``span_id``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("asyncpg").setLevel(logging.ERROR)


_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the current span's trace and span ids."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import UTC, datetime

        from opentelemetry import trace

        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = f"{ctx.trace_id:032x}"
            out["span_id"] = f"{ctx.span_id:016x}"
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) or value is None else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)
