"""This replica's view of the nodes, kept by its event bus: ListNodes, GetNodeStatus and Resync answer from it.

The view is loaded once from a snapshot of the table (at an exact revision) and then follows the
event log event by event. Every event is applied synchronously, so between two awaits the view is
at exactly one revision: an answer built without awaiting reflects every change up to
:attr:`NodeView.revision` and none after it — never a mix of two revisions. When the history it
needs has been compacted away (the view fell that far behind), it loads a new snapshot.

Read-your-writes: :meth:`NodeView.caught_up` runs a numbering pass (which numbers every change
committed before the call, on any replica) and waits until the view has applied the head it
returned, so a List after a write sees the write.

Each node's message is kept serialized (with its length prefix) between changes; a response is the
concatenation of those parts (protobuf repeated fields concatenate: tag, length, bytes per element)
and the response's other fields, sent through a pass-through message (:func:`raw_message`) so that
nothing is encoded again per request.

Heartbeats change ``last_seen_time``, ``lease_expire_time`` and the load without events. The view
takes them (a) at once from this replica's own heartbeat batches (:meth:`NodeView.observe`, after
their commit; written into a node's message only when it is next read) and (b) on demand: a read
that waits for the head (:meth:`NodeView.caught_up`) first queries the rows seen since the last
such query when that is older than ``refresh_interval`` (every row, every ``full_refresh_every``
intervals, which also picks up the expiries an outage credit moved). So ``last_seen_time`` is exact
for heartbeats this replica committed and at most ``refresh_interval`` late for those another
replica committed, and a replica nobody reads from spends nothing on them. Health
(MISSED_CHECK_IN) is stored by the reaper and comes with its events (NodeSuspected, NodeRecovered),
at its revision like every other state. Live fields are only taken for the same lease id and only
forward in time, so neither an event nor a refresh can move them back.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from muster.api.balancer.v1 import balancer_pb2
from muster.api.registry.v1 import node_pb2
from muster.core import metrics
from muster.core.errors import StoreUnavailableError
from muster.core.events import EventBus, StoredEvent
from muster.registry import convert
from muster.registry.heartbeats import Beat, Outcome
from muster.registry.models import HeartbeatResult, Load, State
from muster.registry.store import RegistryStore

log = logging.getLogger(__name__)

_ONLINE = int(State.ONLINE)
_PREFIX = "muster.api.registry.v1."
_WITH_NODE = {
    _PREFIX + "NodeJoined": node_pb2.NodeJoined,
    _PREFIX + "NodeStateChanged": node_pb2.NodeStateChanged,
    _PREFIX + "NodeSuspected": node_pb2.NodeSuspected,
    _PREFIX + "NodeRecovered": node_pb2.NodeRecovered,
}
_MODE_CHANGED = _PREFIX + "NodeModeChanged"
_DELETED = _PREFIX + "NodeDeleted"
_RESET = _PREFIX + "ClusterReset"
# The balancer's events that change a node's sessions (its contract's messages; never its code).
_B = "muster.api.balancer.v1."
_PLACED, _STARTED, _MOVED, _ENDED = (
    _B + k for k in ("SessionPlaced", "SessionStarted", "SessionMoved", "SessionEnded")
)
_SESSION_KINDS = frozenset({_PLACED, _STARTED, _MOVED, _ENDED})
_PLACED_STATE = balancer_pb2.Session.STATE_PLACED
_RECOUNT_EVERY = 5.0  # seconds between attempts to get the balancer's counts when it could not answer
_COUNT_TIMEOUT = 3.0  # how long a (re-)load waits for the balancer's counts
_READ_LIMIT = 5_000
_REFRESH_SLACK = timedelta(seconds=1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field_number: int) -> bytes:
    """The wire tag of a length-delimited field."""
    return _varint(field_number << 3 | 2)


def repeated(field_number: int, parts: Sequence[bytes]) -> bytes:
    """A repeated message field's bytes from its elements' length-prefixed bytes."""
    if not parts:
        return b""
    t = tag(field_number)
    return t + t.join(parts)


def raw_message(data: bytes) -> Message:
    """A message that serializes to exactly ``data``, whatever the method's response type.

    The generated handlers serialize a response with its class's ``SerializeToString``, which
    writes any message's fields; a message whose every field is unknown to it is written back
    verbatim. So a response built as bytes goes out without being parsed or encoded again.
    """
    msg = empty_pb2.Empty()
    msg.MergeFromString(data)
    return msg


@dataclass(slots=True)
class _Entry:
    msg: node_pb2.Node
    last_seen: datetime
    expire: datetime
    part: bytes | None = None  # varint length + the node's bytes; None after a change
    # A renewal not yet written into ``msg`` (last seen, expiry, load): heartbeats arrive far more
    # often than anyone reads, so the message is only brought up to date when it is read.
    live: tuple[datetime, datetime, Load] | None = None

    def current(self) -> node_pb2.Node:
        if self.live is not None:
            seen, expire, load = self.live
            msg = self.msg
            msg.last_seen_time.FromDatetime(seen)
            msg.lease_expire_time.FromDatetime(expire)
            msg.load.CopyFrom(convert.load_to_proto(load))
            self.live = None
        return self.msg

    def encoded(self) -> bytes:
        if self.part is None:
            data = self.current().SerializeToString()
            self.part = _varint(len(data)) + data
        return self.part

    def renew(self, seen: datetime, expire: datetime, load: Load) -> None:
        self.live = (seen, expire, load)
        self.last_seen, self.expire = seen, expire
        self.part = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the view: its nodes' parts, the key after it (None on the last page) and its revision."""

    parts: list[bytes]
    next_key: tuple[int, int] | None
    revision: int


class NodeView:
    """The nodes as of :attr:`revision`, following this process's event bus.

    Args:
        store: the registry's store (the snapshot, the live fields, numbering passes).
        bus: this process's event bus.
        refresh_interval: a read refreshes the live fields from the table when the last refresh is
            older than this (seconds).
        full_refresh_every: every this many refresh intervals, a refresh reads every row (else the
            rows seen since the last one).
        wait_timeout: how long a caller waits for the view to reach a revision before UNAVAILABLE.
    """

    def __init__(
        self,
        store: RegistryStore,
        bus: EventBus,
        *,
        refresh_interval: float = 1.0,
        full_refresh_every: int = 30,
        wait_timeout: float = 10.0,
    ) -> None:
        self._store = store
        self._bus = bus
        self._refresh_interval = refresh_interval
        self._full_every = full_refresh_every
        self._wait_timeout = wait_timeout
        self._nodes: dict[int, _Entry] = {}
        self._order: tuple[list[int], list[int]] = ([], [])  # ids: ONLINE, then the others
        self.revision = -1  # not loaded yet
        self.epoch = 0
        self.loads = 0  # snapshots loaded (1 at start; more after falling behind compaction)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._since: datetime | None = None  # the live fields are current for rows seen before this
        self._refreshed_at = float("-inf")
        self._full_at = float("-inf")
        self._refreshing: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # A node's sessions (the balancer's, not ended): node id -> [sessions, placed]. Kept for
        # every node the balancer has sessions on, in the view or not.
        self.sessions: Any = None  # a muster.registry.sessions.SessionSource, set by the component
        self._counts: dict[int, list[int]] = {}
        self.counts_from: int | None = None  # the revision the balancer's counts were taken at (None: not yet)
        self._recount_at = float("-inf")
        self._counting: asyncio.Future[tuple[list[tuple[int, int, int]], int] | None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts following the log (the first snapshot loads in the background)."""
        self._tasks.append(asyncio.create_task(self._run(), name="muster-node-view"))

    async def stop(self) -> None:
        """Stops following; waiting callers get UNAVAILABLE."""
        if self._counting is not None:
            self._counting.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(StoreUnavailableError("this replica is stopping; retry on another replica"))
                fut.exception()
        self._waiters.clear()

    # -- waiting for a revision --------------------------------------------------------------

    async def caught_up(self) -> int:
        """Waits until the view reflects every change committed before this call (on any replica).

        Runs (or joins) a numbering pass, which numbers every committed change, then waits until
        the view has applied the head it returned. Returns the view's revision then.

        Raises:
            StoreUnavailableError: the database cannot be reached, or the view did not get there in time.
        """
        head = await self._store.number_pending()
        self._bus.advance(head)  # another replica may have numbered it: its notification may be on its way
        await self.at_least(head)
        await self.refreshed()
        return self.revision

    async def at_least(self, revision: int) -> int:
        """Waits until the view has reached ``revision`` (and is loaded); returns its revision."""
        if self.revision >= max(revision, 0):
            return self.revision
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (max(revision, 0), fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(self._wait_timeout):
                await fut
        except TimeoutError:
            raise StoreUnavailableError(
                "this replica's node view is behind the cluster; retry shortly or on another replica"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
        return self.revision

    def _wake(self) -> None:
        if not self._waiters:
            return
        keep = []
        for revision, fut in self._waiters:
            if revision <= self.revision:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((revision, fut))
        self._waiters[:] = keep

    # -- answers (synchronous: each one at exactly one revision) -------------------------------

    def page(self, after: tuple[int, int], limit: int) -> Page:
        """Up to ``limit`` nodes after the key ``(rank, id)`` (rank 0: ONLINE), ONLINE first, then by id."""
        parts: list[bytes] = []
        nodes = self._nodes
        last: tuple[int, int] | None = None
        for rank, ids in enumerate(self._order):
            if rank < after[0]:
                continue
            start = bisect.bisect_right(ids, after[1]) if rank == after[0] else 0
            for node_id in ids[start : start + limit + 1 - len(parts)]:
                if len(parts) == limit:
                    return Page(parts, last, self.revision)
                parts.append(nodes[node_id].encoded())
                last = (rank, node_id)
        return Page(parts, None, self.revision)

    def parts(self, node_ids: Iterable[int] | None = None, *, online_only: bool = False) -> list[bytes]:
        """The parts of every node (or of ``node_ids``, or of the ONLINE ones), ONLINE first, then by id."""
        wanted = None if node_ids is None else set(node_ids)
        out = []
        for ids in self._order[:1] if online_only else self._order:
            for node_id in ids:
                if wanted is None or node_id in wanted:
                    out.append(self._nodes[node_id].encoded())
        return out

    def node(self, node_id: int) -> node_pb2.Node | None:
        """One node's message (the view's own: do not change it), or None."""
        entry = self._nodes.get(node_id)
        return None if entry is None else entry.current()

    def encoded(self, node_id: int) -> bytes | None:
        """One node's length-prefixed bytes, or None."""
        entry = self._nodes.get(node_id)
        return None if entry is None else entry.encoded()

    def __len__(self) -> int:
        return len(self._nodes)

    # -- heartbeats ---------------------------------------------------------------------------

    def observe(self, beats: Sequence[Beat], outcomes: Sequence[Outcome]) -> None:
        """Takes this replica's committed heartbeats: last seen (the commit's database time), expiry, load."""
        nodes = self._nodes
        for (node_id, lease_id, load), outcome in zip(beats, outcomes, strict=True):
            if not isinstance(outcome, HeartbeatResult):
                continue
            entry = nodes.get(node_id)
            if entry is None or entry.msg.lease_id != lease_id or outcome.server_time <= entry.last_seen:
                continue
            metrics.heartbeat_gap.record((outcome.server_time - entry.last_seen).total_seconds())
            entry.renew(outcome.server_time, outcome.lease_expire_time, load)

    def _take_live(self, rows: Iterable[object]) -> int:
        changed = 0
        for r in rows:
            entry = self._nodes.get(r["id"])  # type: ignore[index]
            if entry is None or entry.msg.lease_id != r["lease_id"]:  # type: ignore[index]
                continue
            seen: datetime = r["last_seen_time"]  # type: ignore[index]
            expire: datetime = r["lease_expire_time"]  # type: ignore[index]
            if seen < entry.last_seen or (seen == entry.last_seen and expire == entry.expire):
                continue
            load = Load(r["load1"], r["load5"], r["load15"], r["cpu_count"], r["session_count"])  # type: ignore[index]
            entry.renew(seen, expire, load)
            changed += 1
        return changed

    async def refreshed(self) -> None:
        """Brings the live fields up to date when the last refresh is older than ``refresh_interval``.

        On demand, not on a timer: a replica nobody lists from reads nothing, and heartbeats cost
        nothing more. Callers at the same moment share one query; a failure is only logged (the
        answer then carries what the view has; renewals are not events and have no revision).
        """
        if self.revision < 0 or time.monotonic() - self._refreshed_at < self._refresh_interval:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        started = time.monotonic()
        full = self._since is None or started - self._full_at >= self._full_every * self._refresh_interval
        try:
            rows, now = await self._store.live_since(None if full else self._since)
        except Exception as exc:  # noqa: BLE001 - the database may be down; the next read tries again
            log.debug("node view refresh failed: %s", type(exc).__name__)
            return
        self._take_live(rows)
        # Slack: a heartbeat's last_seen is its statement's start, which may precede this query's
        # time by as long as the statement ran before it committed (the full refresh catches
        # anything slower, and the expiries an outage credit moved).
        self._since = now - _REFRESH_SLACK
        self._refreshed_at = started
        if full:
            self._full_at = started

    # -- following the log ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._load()
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database may be down: load again
                log.warning("node view: %s; loading again", type(exc).__name__, extra={"event": "node_view_failed"})
                await asyncio.sleep(0.5)

    async def _load(self) -> None:
        # The balancer's counts first, then the nodes: the counts' revision is at or below the
        # nodes', and the session events between the two are applied to the counts (see _recount).
        counted = await self._balancer_counts()
        # The snapshot numbers every committed change first, so it is never behind what the view applied.
        nodes, epoch, revision = await self._store.snapshot(frozenset())
        self._nodes = {}
        self._order = ([], [])
        for n in nodes:
            msg = convert.node_to_proto(n)
            self._nodes[n.id] = _Entry(msg, n.last_seen_time, n.lease_expire_time)
            # (_rebase writes the counts in)
            self._order[0 if msg.state == _ONLINE else 1].append(n.id)
        self._order[0].sort()
        self._order[1].sort()
        self.epoch = epoch
        self.revision = revision
        self._counts = {}
        self.counts_from = None
        if counted is not None:
            await self._rebase(*counted)
        self.loads += 1
        log.info(
            "node view loaded: %d nodes at revision %d",
            len(nodes),
            revision,
            extra={"event": "node_view_loaded", "revision": revision},
        )
        self._wake()

    async def _follow(self) -> None:
        """Applies events until history the view needs is gone (then returns, to load again)."""
        while True:
            if self.revision < self._bus.epoch_floor:
                # The database failed over: what the view applied may not have survived.
                log.warning(
                    "node view: the database is on a new timeline; loading a snapshot",
                    extra={"event": "node_view_resync"},
                )
                return
            if self.counts_from is None and self.sessions is not None:
                # Asked in the background (a balancer that does not answer must not hold up the
                # view's events); taken here, between batches, when it has answered.
                if self._counting is None:
                    if time.monotonic() - self._recount_at >= _RECOUNT_EVERY:
                        self._counting = asyncio.ensure_future(self._balancer_counts())
                elif self._counting.done():
                    counted, self._counting = self._counting.result(), None
                    if counted is not None:
                        await self._rebase(*counted)
                        self._wake()
            await self._bus.wait(self.revision, 1.0)
            batch = await self._bus.read(self.revision, _READ_LIMIT)
            if not batch:
                continue
            if batch[0].revision != self.revision + 1:
                log.warning(
                    "node view: history after revision %d was compacted; loading a snapshot",
                    self.revision,
                    extra={"event": "node_view_resync"},
                )
                return
            for ev in batch:
                self._apply(ev)
                self.revision = ev.revision
            self._wake()

    # -- a node's sessions ------------------------------------------------------------------------

    async def _balancer_counts(self) -> tuple[list[tuple[int, int, int]], int] | None:
        """The balancer's counts and their revision; None without a balancer or when it cannot say now."""
        if self.sessions is None or time.monotonic() - self._recount_at < _RECOUNT_EVERY:
            return None
        try:
            async with asyncio.timeout(_COUNT_TIMEOUT):
                return await self.sessions.counts()  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001 - the balancer may be down: counts from events until it answers
            self._recount_at = time.monotonic()
            log.warning(
                "node view: the balancer cannot count sessions (%s); counting from its events until it can",
                type(exc).__name__,
                extra={"event": "session_counts_unavailable"},
            )
            return None

    async def _rebase(self, counts: list[tuple[int, int, int]], at: int) -> None:
        """Takes the balancer's counts as of revision ``at`` and brings them to the view's revision
        by the session events in between (runs in the following task: no event is applied meanwhile)."""
        if at > self.revision:
            await self.at_least_applied(at)
        base = {node_id: [n, placed] for node_id, n, placed in counts}
        applied = at
        while applied < self.revision:
            batch = await self._bus.read(applied, min(_READ_LIMIT, self.revision - applied))
            if not batch or batch[0].revision != applied + 1:
                log.warning("node view: the events after %d are gone; counting again", applied)
                self._recount_at = time.monotonic()
                return
            for ev in batch:
                if ev.revision > self.revision:
                    break
                if ev.kind in _SESSION_KINDS:
                    self._count(base, ev)
                applied = ev.revision
        old, self._counts = self._counts, base
        for node_id in set(old) | set(base):
            self._show(node_id)
        self.counts_from = at

    async def at_least_applied(self, revision: int) -> None:
        """Applies events (in this, the following task) until the view has reached ``revision``."""
        while self.revision < revision:
            await self._bus.wait(self.revision, 1.0)
            batch = await self._bus.read(self.revision, _READ_LIMIT)
            if not batch:
                continue
            if batch[0].revision != self.revision + 1:
                raise StoreUnavailableError("node view: history was compacted while counting sessions")
            for ev in batch:
                self._apply(ev)
                self.revision = ev.revision

    @staticmethod
    def _count(counts: dict[int, list[int]], ev: StoredEvent) -> set[int]:
        """Applies one session event to ``counts``; returns the nodes it changed."""

        def add(node_id: int, n: int, placed: int) -> None:
            c = counts.setdefault(node_id, [0, 0])
            c[0] = max(0, c[0] + n)
            c[1] = max(0, c[1] + placed)
            if c == [0, 0]:
                del counts[node_id]

        value = ev.proto.payload.value
        kind = ev.kind
        if kind == _PLACED:
            session = balancer_pb2.SessionPlaced.FromString(value).session
            add(session.node_id, 1, 1)
            return {session.node_id}
        if kind == _STARTED:
            started = balancer_pb2.SessionStarted.FromString(value)
            node_id = started.session.node_id
            if started.previous_state == 0:  # a session the balancer did not know (adopted): one more
                add(node_id, 1, 0)
                return {node_id}
            was_placed = int(started.previous_state == _PLACED_STATE)
            add(started.previous_node_id, -1, -was_placed)
            add(node_id, 1, 0)
            return {node_id, started.previous_node_id}
        if kind == _MOVED:
            moved = balancer_pb2.SessionMoved.FromString(value)
            placed = int(moved.session.state == _PLACED_STATE)
            add(moved.previous_node_id, -1, -placed)
            add(moved.session.node_id, 1, placed)
            return {moved.previous_node_id, moved.session.node_id}
        ended = balancer_pb2.SessionEnded.FromString(value)
        add(ended.node_id, -1, -int(ended.state == _PLACED_STATE))
        return {ended.node_id}

    def _show(self, node_id: int) -> None:
        """Writes a node's counts into its message (if the view has the node)."""
        entry = self._nodes.get(node_id)
        if entry is None:
            return
        n, placed = self._counts.get(node_id, (0, 0))
        if entry.msg.sessions != n or entry.msg.placed_sessions != placed:
            entry.msg.sessions, entry.msg.placed_sessions = n, placed
            entry.part = None

    def session_count(self, node_id: int) -> int:
        """A node's sessions (placed and started) as of :attr:`revision`."""
        return self._counts.get(node_id, (0, 0))[0]

    def total_sessions(self) -> int:
        """Every node's sessions as of :attr:`revision`."""
        return sum(c[0] for c in self._counts.values())

    def session_totals(self) -> list[tuple[float, dict[str, str]]]:
        """The ``muster.node.sessions`` gauge: the nodes' sessions, placed and started (0 before the view loads)."""
        placed = sum(c[1] for c in self._counts.values())
        return [(placed, {"state": "placed"}), (self.total_sessions() - placed, {"state": "started"})]

    def _apply(self, ev: StoredEvent) -> None:
        kind = ev.kind
        if kind in _SESSION_KINDS:
            for node_id in self._count(self._counts, ev):
                self._show(node_id)
            return
        cls = _WITH_NODE.get(kind)
        if cls is not None:
            node = cls.FromString(ev.proto.payload.value).node
            self._put(node)
        elif kind == _MODE_CHANGED:
            changed = node_pb2.NodeModeChanged.FromString(ev.proto.payload.value)
            entry = self._nodes.get(changed.node_id)
            if entry is not None and entry.msg.mode != changed.mode:
                entry.msg.mode = changed.mode
                entry.part = None
        elif kind == _DELETED:
            self._remove(node_pb2.NodeDeleted.FromString(ev.proto.payload.value).node_id)
        elif kind == _RESET:
            self._nodes = {}
            self._order = ([], [])
            self.epoch = node_pb2.ClusterReset.FromString(ev.proto.payload.value).cluster.epoch

    def _put(self, msg: node_pb2.Node) -> None:
        seen = msg.last_seen_time.ToDatetime(tzinfo=UTC)
        expire = msg.lease_expire_time.ToDatetime(tzinfo=UTC)
        old = self._nodes.get(msg.id)
        rank = 0 if msg.state == _ONLINE else 1
        if old is None:
            bisect.insort(self._order[rank], msg.id)
        else:
            old_rank = 0 if old.msg.state == _ONLINE else 1
            if old_rank != rank:
                ids = self._order[old_rank]
                del ids[bisect.bisect_left(ids, msg.id)]
                bisect.insort(self._order[rank], msg.id)
            if old.msg.lease_id == msg.lease_id and old.last_seen > seen:
                # A heartbeat the view already has is newer than the row the event carries.
                current = old.current()
                msg.last_seen_time.CopyFrom(current.last_seen_time)
                msg.lease_expire_time.CopyFrom(current.lease_expire_time)
                msg.load.CopyFrom(current.load)
                seen, expire = old.last_seen, old.expire
        msg.sessions, msg.placed_sessions = self._counts.get(msg.id, (0, 0))
        self._nodes[msg.id] = _Entry(msg, seen, expire)

    def _remove(self, node_id: int) -> None:
        old = self._nodes.pop(node_id, None)
        if old is not None:
            ids = self._order[0 if old.msg.state == _ONLINE else 1]
            del ids[bisect.bisect_left(ids, node_id)]
