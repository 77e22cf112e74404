"""The WatchEvents stream: replay from a revision, then follow; Resync first when history is gone.

The servicer that mounts it supplies the snapshot (a Resync of its own entities); this module owns
the rest: filtering before sending, batching events that arrive together into one message,
``through_revision`` on every message, progress marks when idle, cutting a consumer that falls
too far behind, and ending every stream with UNAVAILABLE when the replica shuts down.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

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


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# Wire tags (field number << 3 | wire type) of the parts a pre-encoded message is joined from.
_TAG_THROUGH = b"\x08"  # WatchEventsResponse.through_revision = 1, varint
_TAG_BATCH = b"\x12"  # WatchEventsResponse.events = 2, length-delimited (EventBatch)
_TAG_EVENT = b"\x0a"  # EventBatch.events = 1, length-delimited (Event)

Message = tuple[int, bytes]  # (through_revision, an encoded WatchEventsResponse)
_BatchKey = tuple[int, int, WatchFilter]  # (after, through, filter)


def encode_events(through: int, frames: list[bytes]) -> bytes:
    """An encoded ``WatchEventsResponse(through_revision=through, events=EventBatch(events=…))``.

    ``frames`` are events already encoded as ``EventBatch.events`` entries (tag, length, event):
    protobuf messages concatenate, so the batch is joined from them without parsing or copying an
    event into a message object.
    """
    size = sum(len(f) for f in frames)
    return b"".join([_TAG_THROUGH, _varint(through), _TAG_BATCH, _varint(size), *frames])


def response_bytes(msg: bytes | pb.WatchEventsResponse) -> bytes:
    """WatchEvents' response serializer: streams write pre-encoded bytes, which pass through."""
    return msg if type(msg) is bytes else msg.SerializeToString()


def method_handler(behavior: Callable[..., Awaitable[None]]) -> grpc.RpcMethodHandler:
    """The WatchEvents method handler: requests parsed as usual, responses written as bytes.

    Registered after the generated ``add_…Servicer_to_server`` (a registered method handler takes
    precedence), so only this one method changes.
    """
    return grpc.unary_stream_rpc_method_handler(
        behavior, request_deserializer=pb.WatchEventsRequest.FromString, response_serializer=response_bytes
    )


class _Watchdog:
    """One timer for every write of the process: a stream whose write is still pending at its deadline
    is cancelled (and told so: :meth:`was_cut`), instead of one ``asyncio.timeout`` per write."""

    def __init__(self) -> None:
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._cut: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def arm(self, task: asyncio.Task[Any], timeout: float) -> None:
        """Starts (or restarts) the deadline of ``task``'s pending writes."""
        loop = task.get_loop()
        when = loop.time() + timeout
        self._deadlines.pop(task, None)
        self._deadlines[task] = when
        if when < self._timer_at:
            self._set_timer(loop, when)

    def disarm(self, task: asyncio.Task[Any]) -> None:
        """Ends ``task``'s deadline (its writes are done)."""
        self._deadlines.pop(task, None)

    def was_cut(self, task: asyncio.Task[Any]) -> bool:
        """Whether the watchdog cancelled ``task`` (and forgets it)."""
        if task in self._cut:
            self._cut.discard(task)
            return True
        return False

    def _set_timer(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire, loop), when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, math.inf
        now, nxt = loop.time() + 0.001, math.inf  # a timer may fire up to a clock tick early
        for task, when in list(self._deadlines.items()):
            if when <= now:
                del self._deadlines[task]
                self._cut.add(task)
                task.cancel()
            elif when < nxt:
                nxt = when
        if nxt < math.inf:
            self._set_timer(loop, nxt)


class _Bounded:
    """A first-in-first-out cache bounded by entries and by bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._items: dict[Any, tuple[Any, int]] = {}
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes

    def get(self, key: Any) -> Any:
        hit = self._items.get(key)
        return None if hit is None else hit[0]

    def put(self, key: Any, value: Any, size: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while len(self._items) > self._max_entries or (self._bytes > self._max_bytes and len(self._items) > 1):
            _, gone = self._items.pop(next(iter(self._items)))  # the oldest
            self._bytes -= gone


class Streams:
    """The live watch streams of this process: shutdown ends them, and they share encoded messages.

    A batch of events is encoded once per distinct (resume point, through revision, filter) and
    the same bytes go to every stream that needs them; each event is encoded once per process.
    """

    def __init__(self) -> None:
        self.closing = False
        self.count = 0
        self.watchdog = _Watchdog()
        self._frames = _Bounded(50_000, 64 * 1024 * 1024)  # revision -> (event, its EventBatch entry)
        self._batches = _Bounded(4_096, 64 * 1024 * 1024)  # (after, through, filter) -> messages

    def cached(self, after: int, through: int, flt: WatchFilter) -> tuple[Message, ...] | None:
        """The messages for the events after ``after`` through ``through`` under ``flt``, if encoded."""
        return self._batches.get((after, through, flt))  # type: ignore[no-any-return]

    def encode(self, after: int, events: list[StoredEvent], flt: WatchFilter) -> tuple[Message, ...]:
        """The messages carrying ``events`` (revisions ``after`` + 1 on) that match ``flt``.

        Messages hold at most ~1 MB of events (one larger event goes alone); the last one's
        ``through_revision`` is the last event's revision, matched or not. No message when nothing
        matches (the stream's next progress mark carries its new ``through_revision``).
        """
        through = events[-1].revision
        key = (after, through, flt)
        hit = self._batches.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
        frames: list[bytes] = []
        last: list[int] = []  # revision of each frame
        for ev in events:
            if flt.matches(ev):
                frames.append(self._frame(ev))
                last.append(ev.revision)
        out: list[Message] = []
        chunk: list[bytes] = []
        size = 0
        for i, frame in enumerate(frames):
            if chunk and size + len(frame) > _MAX_MESSAGE_BYTES:
                out.append((last[i - 1], encode_events(last[i - 1], chunk)))
                chunk, size = [], 0
            chunk.append(frame)
            size += len(frame)
        if chunk:
            out.append((through, encode_events(through, chunk)))
        messages = tuple(out)
        self._batches.put(key, messages, sum(len(m) for _, m in messages) + 100)
        return messages

    def _frame(self, ev: StoredEvent) -> bytes:
        hit = self._frames.get(ev.revision)
        if hit is not None and hit[0] is ev:  # the same event object: the bus's cache
            return hit[1]  # type: ignore[no-any-return]
        data = ev.proto.SerializeToString()
        frame = b"".join([_TAG_EVENT, _varint(len(data)), data])
        self._frames.put(ev.revision, (ev, frame), len(frame) + 100)
        return frame


async def run_watch(
    request: pb.WatchEventsRequest,
    context: grpc.aio.ServicerContext,
    *,
    bus: EventBus,
    snapshot: Snapshot,
    limits: WatchLimits,
    streams: Streams,
) -> None:
    """Serves one WatchEvents call until the client goes away or the replica shuts down.

    Writes bytes: the handler must be registered with :func:`method_handler`.
    """
    flt, progress_every = parse_request(request, limits)
    head, compacted = await bus.read_head()
    if request.start_revision > head:
        raise FutureRevisionError(request.start_revision, head)
    write_timeout = limits.write_timeout.total_seconds()
    task = asyncio.current_task()
    assert task is not None
    watchdog = streams.watchdog

    async def send(messages: tuple[Message, ...] | list[Message]) -> None:
        watchdog.arm(task, write_timeout)
        try:
            for i, (_, data) in enumerate(messages):
                if i:
                    watchdog.arm(task, write_timeout)  # the deadline is per message of a long batch
                await context.write(data)
        except asyncio.CancelledError:
            if watchdog.was_cut(task) and task.uncancel() == 0:  # ours, not the caller's
                raise SlowConsumerError(cursor, bus.head - cursor, _retry_after()) from None
            raise
        finally:
            watchdog.disarm(task)

    async def resync() -> int:
        snap = await snapshot(flt.node_ids)
        msg = pb.WatchEventsResponse(through_revision=snap.revision, resync=snap)
        await send([(snap.revision, msg.SerializeToString())])
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
            head = bus.head
            if head > cursor:
                through = min(head, cursor + _MAX_BATCH)
                messages = streams.cached(cursor, through, flt)
                if messages is None:
                    events = await bus.read(cursor, through - cursor)
                    if not events:
                        await bus.wait(cursor, 0.05)
                        continue
                    if events[0].revision != cursor + 1:
                        cursor = await resync()  # the history we needed was compacted while we lagged
                        last_sent = time.monotonic()
                        continue
                    messages = streams.encode(cursor, events, flt)
                    through = events[-1].revision
                if messages:
                    await send(messages)
                    metrics.watch_messages.add(len(messages))
                    metrics.watch_lag.record(max(0, bus.head - through))
                    last_sent = time.monotonic()
                cursor = through
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
                msg = pb.WatchEventsResponse(through_revision=cursor, progress=mark)
                await send([(cursor, msg.SerializeToString())])
                last_sent = time.monotonic()
                continue
            await bus.wait(cursor, progress_every - idle)
    finally:
        streams.count -= 1
        watchdog.disarm(task)
        watchdog.was_cut(task)


def _retry_after() -> timedelta:
    return timedelta(milliseconds=random.randint(500, 1500))
