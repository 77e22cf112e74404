"""The WatchEvents stream: replay from a revision, then follow; Resync first when history is gone.

The servicer that mounts it supplies the snapshot (a Resync of its own entities); this module owns
the rest: filtering before sending, batching events that arrive together into one message,
``through_revision`` on every message, progress marks when idle, cutting a consumer that falls
too far behind, and ending every stream with UNAVAILABLE when the replica shuts down.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import grpc

from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.core import metrics
from muster.core.errors import FailedPreconditionError, InvalidArgumentError, ShuttingDownError, SlowConsumerError
from muster.core.events import EventBus, StoredEvent

_MAX_BATCH = 1_000
_MAX_MESSAGE_BYTES = 1024 * 1024  # well under gRPC's default 4 MB receive limit
_MAX_FILTER = 1_000

Snapshot = Callable[[frozenset[int]], Awaitable[pb.Resync]]


@dataclass(frozen=True)
class WatchLimits:
    """Stream settings from the server configuration."""

    progress_interval: timedelta
    max_lag: int
    write_timeout: timedelta


@dataclass(frozen=True)
class WatchFilter:
    """What a stream wants: kinds and nodes (empty: all)."""

    kinds: frozenset[str]
    node_ids: frozenset[int]

    def matches(self, ev: StoredEvent) -> bool:
        """Whether the stream wants this event."""
        return (not self.kinds or ev.kind in self.kinds) and (not self.node_ids or ev.node_id in self.node_ids)


class FutureRevisionError(FailedPreconditionError):
    """A watch asked for a revision the cluster has not reached."""

    reason = "FUTURE_REVISION"

    def __init__(self, start_revision: int, head: int) -> None:
        super().__init__(
            "start_revision is ahead of the cluster's head; watch from a revision you have seen",
            domain="muster.registry",
            start_revision=start_revision,
            head_revision=head,
        )


def parse_request(request: pb.WatchEventsRequest, limits: WatchLimits) -> tuple[WatchFilter, float]:
    """Validates a WatchEventsRequest; returns its filter and progress interval in seconds."""
    if request.start_revision < 0:
        raise InvalidArgumentError("start_revision", "must be 0 (snapshot first) or a revision")
    if len(request.kinds) > _MAX_FILTER:
        raise InvalidArgumentError("kinds", f"at most {_MAX_FILTER} kinds")
    if len(request.node_ids) > _MAX_FILTER:
        raise InvalidArgumentError("node_ids", f"at most {_MAX_FILTER} node ids")
    for kind in request.kinds:
        if not kind or len(kind) > 200 or not all(part.isidentifier() for part in kind.split(".")):
            raise InvalidArgumentError(
                "kinds", "each kind is a full message name such as muster.api.registry.v1.NodeJoined"
            )
    if any(n <= 0 for n in request.node_ids):
        raise InvalidArgumentError("node_ids", "node ids are positive")
    interval = limits.progress_interval.total_seconds()
    if request.HasField("progress_interval"):
        asked = request.progress_interval.ToTimedelta().total_seconds()
        if asked != 0:
            if not 0.1 <= asked <= 60:
                raise InvalidArgumentError("progress_interval", "must be 0 (default) or between 100ms and 60s")
            interval = asked
    return WatchFilter(frozenset(request.kinds), frozenset(request.node_ids)), interval


class Streams:
    """The live watch streams of this process, so shutdown can end them."""

    def __init__(self) -> None:
        self.closing = False
        self.count = 0


async def run_watch(
    request: pb.WatchEventsRequest,
    context: grpc.aio.ServicerContext,
    *,
    bus: EventBus,
    snapshot: Snapshot,
    limits: WatchLimits,
    streams: Streams,
) -> None:
    """Serves one WatchEvents call until the client goes away or the replica shuts down."""
    flt, progress_every = parse_request(request, limits)
    head, compacted = await bus.read_head()
    if request.start_revision > head:
        raise FutureRevisionError(request.start_revision, head)
    write_timeout = limits.write_timeout.total_seconds()

    async def send(msg: pb.WatchEventsResponse) -> None:
        try:
            async with asyncio.timeout(write_timeout):  # not wait_for: it can swallow a cancellation
                await context.write(msg)
        except TimeoutError:
            raise SlowConsumerError(cursor, bus.head - cursor, _retry_after()) from None

    async def resync() -> int:
        snap = await snapshot(flt.node_ids)
        await send(pb.WatchEventsResponse(through_revision=snap.revision, resync=snap))
        return snap.revision

    streams.count += 1
    try:
        cursor = request.start_revision
        if cursor == 0 or cursor < compacted or cursor < bus.epoch_floor:
            cursor = await resync()
        last_sent = time.monotonic()
        prev_lag = bus.head - cursor
        while True:
            if streams.closing:
                raise ShuttingDownError()
            if cursor < bus.epoch_floor:  # a failover: what this stream had may not have survived
                cursor = await resync()
                last_sent = time.monotonic()
                continue
            if bus.head > cursor:
                events = await bus.read(cursor, _MAX_BATCH)
                if not events:
                    await bus.wait(cursor, 0.05)
                    continue
                if events[0].revision != cursor + 1:
                    cursor = await resync()  # the history we needed was compacted while we lagged
                    last_sent = time.monotonic()
                    continue
                wanted = [e for e in events if flt.matches(e)]
                for chunk in _chunks(wanted):
                    through = chunk[-1].revision if chunk[-1] is not wanted[-1] else events[-1].revision
                    batch = pb.EventBatch(events=[e.proto for e in chunk])
                    await send(pb.WatchEventsResponse(through_revision=through, events=batch))
                    metrics.watch_messages.add(1)
                    metrics.watch_lag.record(max(0, bus.head - through))
                    last_sent = time.monotonic()
                cursor = events[-1].revision
                # Cut a stream that falls further behind, not one catching up from history.
                lag = bus.head - cursor
                if lag > limits.max_lag and lag >= prev_lag:
                    raise SlowConsumerError(cursor, lag, _retry_after())
                prev_lag = lag
                continue
            idle = time.monotonic() - last_sent
            if idle >= progress_every:
                mark = pb.Progress(head_revision=bus.head)
                mark.server_time.FromDatetime(bus.db_now())
                await send(pb.WatchEventsResponse(through_revision=cursor, progress=mark))
                last_sent = time.monotonic()
                continue
            await bus.wait(cursor, progress_every - idle)
    finally:
        streams.count -= 1


def _chunks(events: list[StoredEvent]) -> list[list[StoredEvent]]:
    """Splits events into messages of at most ~1 MB (one oversized event goes alone)."""
    out: list[list[StoredEvent]] = []
    size = 0
    for ev in events:
        n = ev.proto.ByteSize()
        if not out or size + n > _MAX_MESSAGE_BYTES:
            out.append([])
            size = 0
        out[-1].append(ev)
        size += n
    return out


def _retry_after() -> timedelta:
    return timedelta(milliseconds=random.randint(500, 1500))
