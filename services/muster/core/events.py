"""The event log: transactional append, gap-free numbering, snapshots and the per-process bus.

Writers call :func:`append` inside the transaction that makes the change, then
:meth:`Numberer.kick` after the commit. A numbering pass takes ``LOCK TABLE core.head IN EXCLUSIVE
MODE`` and numbers every committed un-numbered event in append-id order, so revisions are gap-free
and become visible in order without one row lock held by every writer. A snapshot (a List, a
Resync) runs in a REPEATABLE READ transaction whose first statement is that same lock — the lock is
taken before the snapshot — and numbers whatever its snapshot sees, so the snapshot contains exactly
the changes up to the revision it reports.

The :class:`EventBus` holds one LISTEN connection per process, reads new events once per batch for
every local stream, and keeps a window of recent events in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from google.protobuf import any_pb2
from google.protobuf.message import Message

from muster.api.events.v1 import event_pb2
from muster.core import db

log = logging.getLogger(__name__)

CHANNEL = "muster_events"
EPOCH_BITS = 40  # an epoch's revisions and tokens are above timeline << 40 (core 0003)
_PASS_LIMIT = 20_000

APPEND = "SELECT core.append_event($1, $2, $3)"
APPEND_MANY = """
SELECT core.append_event(k, n, p) FROM unnest($1::text[], $2::bigint[], $3::bytea[]) WITH ORDINALITY AS u(k, n, p, i)
ORDER BY i
"""
LOCK_HEAD = "LOCK TABLE core.head IN EXCLUSIVE MODE"
# One pass of at most $1 events; on a new timeline it opens the epoch first (core 0003).
NUMBER = "SELECT revision, numbered FROM core.number_some($1)"
NOTIFY = "SELECT pg_notify($1, $2)"
READ_HEAD = "SELECT revision, compacted_revision, now, pending, epoch_floor FROM core.read_head()"
READ_EVENTS = """
SELECT revision, time, kind, node_id, payload FROM core.events
WHERE revision > $1 AND revision <= $2 ORDER BY revision LIMIT $3
"""
REVISION_OF = "SELECT revision FROM core.events WHERE append_id = $1"
COMPACT_CUT = """
SELECT max(revision) AS cut FROM core.events
WHERE revision > $1 AND revision <= $2 AND time < now() - $3::interval
"""
COMPACT_DELETE = "DELETE FROM core.events WHERE revision > $1 AND revision <= $2"
COMPACT_MARK = "UPDATE core.head SET compacted_revision = $1 WHERE id = 1"
HEAD_FOR_COMPACTION = "SELECT revision, compacted_revision FROM core.head WHERE id = 1"


def kind_of(payload: Message) -> str:
    """The event kind of a payload: its full message name."""
    return payload.DESCRIPTOR.full_name


async def append(con: asyncpg.Connection, payload: Message, *, node_id: int = 0) -> int:
    """Appends an un-numbered event in the caller's transaction; returns its append id."""
    return int(await con.fetchval(APPEND, kind_of(payload), node_id, payload.SerializeToString()))


async def append_many(con: asyncpg.Connection, items: list[tuple[Message, int]]) -> list[int]:
    """Appends several events (payload, node id) in one statement, in order; returns their append ids."""
    if not items:
        return []
    rows = await con.fetch(
        APPEND_MANY,
        [kind_of(p) for p, _ in items],
        [n for _, n in items],
        [p.SerializeToString() for p, _ in items],
    )
    return [int(r[0]) for r in rows]


async def _number_all(con: asyncpg.Connection) -> tuple[int, int]:
    """Numbers every pending event visible to ``con`` (which holds the head lock)."""
    total = 0
    while True:
        row = await con.fetchrow(NUMBER, _PASS_LIMIT)
        total += row["numbered"]
        if row["numbered"] < _PASS_LIMIT:
            if total:
                await con.execute(NOTIFY, CHANNEL, str(row["revision"]))
            return int(row["revision"]), total


class Numberer:
    """Runs numbering passes for this process, coalesced to one pass in flight.

    Args:
        pool: the shared pool.
        on_numbered: called with the new head after every pass that numbered something.
    """

    def __init__(self, pool: asyncpg.Pool, on_numbered: Callable[[int], None]) -> None:
        self._pool = pool
        self._on_numbered = on_numbered
        self._waiters: list[asyncio.Future[int]] = []
        self._task: asyncio.Task[None] | None = None

    def kick(self) -> asyncio.Future[int]:
        """Asks for a pass that starts after this call; the future resolves with the head after it."""
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="muster-numberer")
        return fut

    async def _run(self) -> None:
        while self._waiters:
            waiters, self._waiters = self._waiters, []
            try:
                head = await self.number_once()
            except Exception as exc:  # noqa: BLE001 - handed to every waiter; the poll retries
                for w in waiters:
                    if not w.done():
                        w.set_exception(exc)
                    w.exception() if w.done() else None  # mark retrieved: fire-and-forget kicks
                continue
            for w in waiters:
                if not w.done():
                    w.set_result(head)

    def numbered(self, head: int) -> None:
        """Learns of a numbering done inside a writer's own transaction (``core.number_pending()``)."""
        self._on_numbered(head)

    async def number_once(self) -> int:
        """One numbering pass; returns the head revision after it."""
        async with self._pool.acquire() as con:
            async with con.transaction():
                await con.execute(LOCK_HEAD)
                head, numbered = await _number_all(con)
        if numbered:
            self._on_numbered(head)
        return head

    async def revision_of(self, append_id: int) -> int:
        """Waits until the event appended as ``append_id`` is numbered; returns its revision."""
        while True:
            await self.kick()
            async with self._pool.acquire() as con:
                revision = await con.fetchval(REVISION_OF, append_id)
            if revision is not None:
                return int(revision)

    @contextlib.asynccontextmanager
    async def snapshot(self, con: asyncpg.Connection) -> AsyncIterator[int]:
        """A REPEATABLE READ transaction on ``con`` that reflects exactly the revision it yields.

        Every change visible inside has its event numbered at or below that revision, and no change
        whose event is numbered above it is visible.
        """
        async with con.transaction(isolation="repeatable_read"):
            await con.execute(LOCK_HEAD)  # before the snapshot: the first query takes it
            head, numbered = await _number_all(con)
            yield head
        if numbered:
            self._on_numbered(head)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A numbered event as read from the log."""

    revision: int
    node_id: int
    kind: str
    proto: event_pb2.Event


def _to_event(row: asyncpg.Record) -> StoredEvent:
    ev = event_pb2.Event(revision=row["revision"], kind=row["kind"], node_id=row["node_id"])
    ev.time.FromDatetime(row["time"])
    ev.payload.CopyFrom(any_pb2.Any(type_url="type.googleapis.com/" + row["kind"], value=row["payload"]))
    return StoredEvent(row["revision"], row["node_id"], row["kind"], ev)


class EventBus:
    """This process's view of the log: one LISTEN connection, one reader, many local streams.

    Args:
        pool: the shared pool (reads).
        dsn: for the dedicated LISTEN connection.
        numberer: this process's numberer (the fallback poll runs a pass when it finds pending events).
        poll_interval: fallback poll for lost notifications.
        cache_size: how many recent events are kept in memory for streams that are nearly current.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        dsn: str,
        *,
        poll_interval: timedelta,
        cache_size: int = 20_000,
    ) -> None:
        self._pool = pool
        self._dsn = dsn
        self._poll = poll_interval.total_seconds()
        self._cache_size = cache_size
        self._cache: list[StoredEvent] = []
        self.head = 0
        self.compacted = 0
        # Revisions up to this were numbered on an earlier database timeline (before a failover):
        # a stream resuming from one gets a Resync, as some of them may not have survived.
        self.epoch_floor = 0
        self._target = 0
        self._db_offset = 0.0  # database clock minus local wall clock, seconds
        # Streams waiting for the head to move: a set of futures, all resolved by one wake-up; their
        # timeouts are one heap under one timer (no timeout object per wait).
        self._waiters: set[asyncio.Future[None]] = set()
        self._deadlines: list[tuple[float, int, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._seq = itertools.count()
        self._fetch_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listen_con: asyncpg.Connection | None = None
        self._closed = False
        self.numberer = Numberer(pool, self.advance)
        self.pending_seen = False

    async def start(self) -> None:
        """Reads the head and starts the listener and the fallback poll."""
        await self._read_head()
        self.head = self._target
        self._tasks.append(asyncio.create_task(self._listen_loop(), name="muster-listen"))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="muster-poll"))

    async def close(self) -> None:
        """Stops the listener and the poll, and wakes every stream so that it can end."""
        self._closed = True
        self._wake_all()
        for t in [*self._tasks, *([self._fetch_task] if self._fetch_task else [])]:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._listen_con is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listen_con.close(), 2)

    def db_now(self) -> datetime:
        """The database's clock, estimated from the last poll."""
        return datetime.fromtimestamp(time.time() + self._db_offset, UTC)

    # -- following the head ------------------------------------------------------------------

    def advance(self, head: int) -> None:
        """Learns that the log's head is at least ``head`` (a notification, a pass, a poll)."""
        if head >> EPOCH_BITS > self.epoch_floor >> EPOCH_BITS:
            self._learn_floor(head >> EPOCH_BITS << EPOCH_BITS)
        if head > self._target:
            self._target = head
        if self._target > self.head and (self._fetch_task is None or self._fetch_task.done()):
            self._fetch_task = asyncio.create_task(self._fetch(), name="muster-fetch")

    def _learn_floor(self, floor: int) -> None:
        """A new epoch (the database failed over): the cache may hold events that did not survive."""
        if floor <= self.epoch_floor:
            return
        if self.epoch_floor or self.head:
            log.warning(
                "the database is on a new timeline (a failover or a restore): revisions from %d on; "
                "streams behind that resync",
                floor + 1,
                extra={"event": "bus_new_epoch"},
            )
        self.epoch_floor = floor
        self._cache.clear()
        self._wake_all()

    async def _fetch(self) -> None:
        try:
            while self.head < self._target and not self._closed:
                async with self._pool.acquire() as con:
                    rows = await con.fetch(READ_EVENTS, self.head, self._target, 5_000)
                if not rows:
                    return
                events = [_to_event(r) for r in rows]
                # The cache is indexed by offset from its first revision, so it stays contiguous: a
                # batch may cross an epoch's jump (the old epoch's survivors, then the new floor's
                # events), and only what follows the last jump is kept.
                jump = next(
                    (i for i in range(len(events) - 1, 0, -1) if events[i].revision != events[i - 1].revision + 1), 0
                )
                if events[0].revision != self.head + 1 or jump:
                    self._cache.clear()  # compacted under us, or a jump: streams behind read from the table
                self._cache.extend(events[jump:])
                if len(self._cache) > 2 * self._cache_size:
                    del self._cache[: len(self._cache) - self._cache_size]
                self.head = events[-1].revision
                self._wake_all()
        except Exception as exc:  # noqa: BLE001 - the poll retries
            log.warning("reading new events failed: %s", type(exc).__name__, extra={"event": "bus_fetch_failed"})

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf

    async def wait(self, after: int, timeout: float) -> None:
        """Returns when the head passes ``after``, the bus closes, or ``timeout`` seconds pass."""
        if self.head > after or self._closed or timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.add(fut)
        when = loop.time() + timeout
        heapq.heappush(self._deadlines, (when, next(self._seq), fut))
        if when < self._timer_at:
            self._arm(loop, when)
        try:
            await fut
        finally:
            self._waiters.discard(fut)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire, loop), when

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The timer: resolves the waits whose timeout passed, then arms itself for the next one."""
        self._timer, self._timer_at = None, math.inf
        now, heap = loop.time(), self._deadlines
        while heap and heap[0][0] <= now + 0.001:  # a timer may fire up to a clock tick early
            fut = heapq.heappop(heap)[2]
            if not fut.done():
                fut.set_result(None)
        while heap and heap[0][2].done():  # cancelled waits (streams that went away)
            heapq.heappop(heap)
        if heap:
            self._arm(loop, heap[0][0])

    def wake_streams(self) -> None:
        """Wakes every waiting stream (shutdown)."""
        self._wake_all()

    async def read(self, after: int, limit: int) -> list[StoredEvent]:
        """Events with revision > ``after`` up to the local head, at most ``limit``.

        The first event's revision is ``after + 1`` unless history was compacted (then the caller
        resyncs).
        """
        head = self.head
        if head <= after:
            return []
        if self._cache and self._cache[0].revision <= after + 1:
            start = after + 1 - self._cache[0].revision
            if start < len(self._cache) and self._cache[start].revision == after + 1:
                return self._cache[start : start + limit]
        async with self._pool.acquire() as con:
            rows = await con.fetch(READ_EVENTS, after, head, limit)
        return [_to_event(r) for r in rows]

    async def read_head(self) -> tuple[int, int]:
        """The database's head and compacted revisions (and the local head advances)."""
        await self._read_head()
        return self._target, self.compacted

    async def _read_head(self) -> None:
        async with self._pool.acquire() as con:
            row = await con.fetchrow(READ_HEAD)
        self.compacted = int(row["compacted_revision"])
        self._learn_floor(int(row["epoch_floor"]))
        self._db_offset = row["now"].timestamp() - time.time()
        self.pending_seen = bool(row["pending"])
        self.advance(int(row["revision"]))

    # -- background ----------------------------------------------------------------------------

    def _on_notify(self, _con: object, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.advance(int(payload))

    async def _listen_loop(self) -> None:
        delay = 0.1
        while not self._closed:
            lost = asyncio.Event()
            try:
                con = await db.connect(self._dsn, timeout=5)
                con.add_termination_listener(lambda _c, lost=lost: lost.set())
                await con.add_listener(CHANNEL, self._on_notify)
                self._listen_con = con
                delay = 0.1
                await self._read_head()  # notifications sent while we were away are lost
                log.info("listening for events", extra={"event": "bus_listening"})
                while not lost.is_set() and not con.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 5)
                log.warning("event listener lost its connection; reconnecting", extra={"event": "bus_lost"})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect with backoff
                log.debug("event listener cannot connect: %s", type(exc).__name__)
            finally:
                if self._listen_con is not None:
                    with contextlib.suppress(Exception):
                        self._listen_con.terminate()
                    self._listen_con = None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _poll_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._poll)
            try:
                await self._read_head()
                if self.pending_seen:
                    await self.numberer.kick()  # a writer died between commit and its pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be down; try again
                log.debug("event poll failed: %s", type(exc).__name__)


async def follow(
    bus: EventBus,
    on_event: Callable[[StoredEvent], Awaitable[Any]],
    *,
    name: str,
    after_batch: Callable[[list[Any]], Awaitable[None]] | None = None,
) -> None:
    """Follows the log from this process's current head, for the life of the calling task.

    Each event goes to ``on_event`` (an error there is logged and the follower goes on); the
    results of a batch go to ``after_batch``. History compacted past a slow follower is skipped:
    followers use the log to act sooner, and keep a slower fallback of their own for what they miss.
    """
    cursor = bus.head
    while True:
        await bus.wait(cursor, 1.0)
        try:
            batch = await bus.read(cursor, 1000)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the database may be down
            await asyncio.sleep(0.5)
            continue
        results = []
        for ev in batch:
            try:
                results.append(await on_event(ev))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one event must not stop the follower
                log.warning("%s: %s on revision %s", name, type(exc).__name__, ev.revision)
        if batch:
            cursor = batch[-1].revision
            if after_batch is not None:
                try:
                    await after_batch(results)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the caller's periodic work tries again
                    log.debug("%s: after batch: %s", name, type(exc).__name__)


async def compact(pool: asyncpg.Pool, *, keep_events: int, keep_for: timedelta) -> int:
    """Deletes events older than ``keep_for`` beyond the newest ``keep_events``; returns the horizon."""
    async with pool.acquire() as con, con.transaction():
        await con.execute(LOCK_HEAD)
        row = await con.fetchrow(HEAD_FOR_COMPACTION)
        head, compacted = int(row["revision"]), int(row["compacted_revision"])
        cut = await con.fetchval(COMPACT_CUT, compacted, head - keep_events, keep_for)
        if cut is None or cut <= compacted:
            return compacted
        await con.execute(COMPACT_DELETE, compacted, cut)
        await con.execute(COMPACT_MARK, cut)
    log.info("compacted events through revision %s", cut, extra={"event": "events_compacted"})
    return int(cut)
