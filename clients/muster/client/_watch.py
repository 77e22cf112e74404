"""Watching: events exactly once, in order, across reconnects; and a live view of the nodes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.api.rules import NODE_EVENT_KINDS
from muster.client._channel import backoff
from muster.client._models import Event, Node, NodeMode, Progress, Resync
from muster.client._retry import wait_out
from muster.client.errors import MusterError, from_rpc_error

if TYPE_CHECKING:
    from muster.client._cluster import Cluster

log = logging.getLogger(__name__)


class ConnectionState(enum.Enum):
    """How current a watch (or view) is.

    CONNECTED: the stream delivers (events or progress marks). IN_JEOPARDY: the stream broke or went
    silent and is being re-established; what the application holds may be stale. DISCONNECTED: no
    working stream for ``disconnect_after``; keep waiting or act on it.
    """

    CONNECTED = "connected"
    IN_JEOPARDY = "in_jeopardy"
    DISCONNECTED = "disconnected"


class Watch:
    """The cluster's events after ``start_revision``, each handed to the application exactly once, in order.

    Use as ``async with cluster.watch(0) as events: async for item in events:``. Items are
    :class:`Resync` (a snapshot: start over from it; the first item when ``start_revision`` is 0 or
    compacted), :class:`Event`, and, with ``progress=True``, :class:`Progress`. A dropped stream is
    resumed from the last ``through_revision`` on the next replica with jittered backoff that honours
    the server's retry hint, for as long as its failures are transient (the table in
    :mod:`muster.client.errors`), and up to ``max_attempts`` times in a row after a server fault
    (INTERNAL); any other failure ends the iteration with its exception. A duplicate (by revision)
    is never handed out. Cancelling the iterating
    task ends the stream.

    Args:
        progress_interval: asked of the server; silence for twice this means IN_JEOPARDY.
        disconnect_after: without a working stream this long, the state is DISCONNECTED.
    """

    def __init__(
        self,
        cluster: Cluster,
        *,
        start_revision: int = 0,
        kinds: tuple[str, ...] = (),
        node_ids: tuple[int, ...] = (),
        progress: bool = False,
        progress_interval: timedelta = timedelta(seconds=2),
        disconnect_after: timedelta = timedelta(seconds=30),
    ) -> None:
        if start_revision < 0:
            raise ValueError("start_revision must be 0 or a revision")
        self._cluster = cluster
        self._endpoint = cluster._registry_endpoint()
        self._kinds = kinds
        self._node_ids = node_ids
        self._progress = progress
        self._interval = progress_interval
        self._disconnect_after = disconnect_after.total_seconds()
        self.through_revision = start_revision
        self._delivered = start_revision
        self._call: Any = None
        self._pending: deque[Resync | Event | Progress] = deque()
        self._state = ConnectionState.IN_JEOPARDY
        self._listeners: list[Callable[[ConnectionState], None]] = []
        self._last_ok = time.monotonic()
        self.reconnects = 0
        self.head_revision = 0
        self._stopped = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current connection state."""
        return self._state

    def on_state_change(self, callback: Callable[[ConnectionState], None]) -> None:
        """Calls ``callback(state)`` whenever the state changes."""
        self._listeners.append(callback)

    def _set_state(self, state: ConnectionState) -> None:
        if state is not self._state:
            self._state = state
            for cb in self._listeners:
                cb(state)

    # -- iteration -----------------------------------------------------------------------------

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Ends the stream (a later read starts another; see :meth:`stop`)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Resync | Event | Progress:
        while not self._pending:
            self._handle(await self._next_message())
        return self._pending.popleft()

    def _request(self) -> pb.WatchEventsRequest:
        return pb.WatchEventsRequest(
            start_revision=self.through_revision,
            kinds=self._kinds,
            node_ids=self._node_ids,
            progress_interval=duration_pb2.Duration(
                seconds=int(self._interval.total_seconds()), nanos=self._interval.microseconds * 1000
            ),
        )

    def stop(self) -> None:
        """Ends the stream for good: the iteration ends with CancelledError."""
        self._stopped = True
        self.close()

    async def _next_message(self) -> pb.WatchEventsResponse:
        attempt = 0
        faults = 0  # server faults (INTERNAL) in a row: resumed a few times (max_attempts), then raised
        silent_after = 2 * self._interval.total_seconds() + 1
        while True:
            if self._stopped:
                raise asyncio.CancelledError()
            if self._call is None:
                self._call = self._endpoint.stub().WatchEvents(self._request())
            try:
                # asyncio.timeout, not wait_for: wait_for (3.11) can swallow the caller's cancellation
                # when the read completes at the same moment, and the stream then never stops.
                async with asyncio.timeout(silent_after):
                    msg = await self._call.read()
            except TimeoutError:
                # Silence beyond two progress intervals: the stream is suspect; start another.
                self._lost(None)
                attempt += 1
                continue
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if not err.transient:
                    faults += 1
                    if not wait_out(err) or faults >= self._cluster.config.max_attempts:
                        self.close()
                        raise err from exc
                self._lost(err)
                await asyncio.sleep(backoff(attempt, self._cluster.config, err.retry_after))
                attempt += 1
                continue
            if msg is grpc.aio.EOF:
                self._lost(None)
                await asyncio.sleep(backoff(attempt, self._cluster.config))
                attempt += 1
                continue
            self._last_ok = time.monotonic()
            self._set_state(ConnectionState.CONNECTED)
            return msg

    def _lost(self, err: MusterError | None) -> None:
        self.close()
        self.reconnects += 1
        self._endpoint.fail_over()
        down = time.monotonic() - self._last_ok
        self._set_state(ConnectionState.DISCONNECTED if down > self._disconnect_after else ConnectionState.IN_JEOPARDY)
        log.debug("watch stream lost (%s); resuming from %d", err.reason if err else "silent", self.through_revision)

    def _handle(self, msg: pb.WatchEventsResponse) -> None:
        which = msg.WhichOneof("kind")
        if which == "resync":
            snap = Resync.from_proto(msg.resync)
            self._pending.append(snap)
            self._delivered = snap.revision  # the snapshot replaces everything up to it
        elif which == "events":
            for ev in msg.events.events:
                if ev.revision <= self._delivered:
                    continue  # already handed out before a reconnect
                self._pending.append(Event.from_proto(ev))
                self._delivered = ev.revision
        elif which == "progress":
            self.head_revision = msg.progress.head_revision
            if self._progress:
                self._pending.append(Progress(msg.through_revision, msg.progress.head_revision))
        self.through_revision = max(self.through_revision, msg.through_revision)


@dataclass(frozen=True)
class NodeChange:
    """A change of the local view: ``before`` is None for an added node, ``after`` None for a removed one."""

    revision: int
    before: Node | None
    after: Node | None
    cause: Event | Resync


def apply_to_nodes(nodes: dict[int, Node], item: Event | Resync) -> list[tuple[Node | None, Node | None]]:
    """Applies one event or snapshot to a map of nodes; returns (before, after) of what changed.

    Events carry the resulting state, so applying one twice changes nothing the second time.
    """
    changes: list[tuple[Node | None, Node | None]] = []
    if isinstance(item, Resync):
        fresh = {n.id: n for n in item.nodes}
        for node_id in list(nodes):
            if node_id not in fresh:
                changes.append((nodes.pop(node_id), None))
        for node_id, node in fresh.items():
            if nodes.get(node_id) != node:
                changes.append((nodes.get(node_id), node))
                nodes[node_id] = node
        return changes
    payload = item.payload
    if item.node is not None:
        before = nodes.get(item.node.id)
        if before != item.node:
            nodes[item.node.id] = item.node
            changes.append((before, item.node))
    elif isinstance(payload, node_pb2.NodeModeChanged):
        before = nodes.get(payload.node_id)
        if before is not None and before.mode.value != payload.mode:
            after = dataclasses.replace(before, mode=NodeMode(payload.mode))
            nodes[after.id] = after
            changes.append((before, after))
    elif isinstance(payload, node_pb2.NodeDeleted):
        if payload.node_id in nodes:
            changes.append((nodes.pop(payload.node_id), None))
    elif isinstance(payload, node_pb2.ClusterReset):
        changes += [(n, None) for n in nodes.values()]
        nodes.clear()
    return changes


class ClusterView:
    """A live local copy of the cluster's nodes, correct after any sequence of disconnects.

    ``async with cluster.view() as view:`` returns once the first snapshot is applied; a background
    task then follows the event stream (resuming on any replica) until the block ends.
    ``view.nodes`` maps id to :class:`Node`; ``view.on_change(cb)`` calls ``cb(NodeChange)`` for
    every node added, changed or removed; ``view.state`` is the stream's :class:`ConnectionState`.
    """

    def __init__(self, cluster: Cluster, **watch_options: Any) -> None:
        # Only the events that change nodes travel: not the locks', sessions' or keys' events.
        watch_options.setdefault("kinds", NODE_EVENT_KINDS)
        self._watch = Watch(cluster, start_revision=0, **watch_options)
        self._nodes: dict[int, Node] = {}
        self.revision = 0
        self._callbacks: list[Callable[[NodeChange], None]] = []
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    @property
    def nodes(self) -> Mapping[int, Node]:
        """The nodes by id (a read-only view that follows the stream)."""
        return self._nodes

    @property
    def state(self) -> ConnectionState:
        """The stream's connection state."""
        return self._watch.state

    @property
    def watch(self) -> Watch:
        """The underlying watch (for its state callbacks and reconnect count)."""
        return self._watch

    def on_change(self, callback: Callable[[NodeChange], None]) -> None:
        """Calls ``callback(change)`` for every node added, changed or removed."""
        self._callbacks.append(callback)

    async def __aenter__(self) -> ClusterView:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts following and waits for the first snapshot."""
        self._task = asyncio.create_task(self._run(), name="muster-cluster-view")
        waiter = asyncio.create_task(self._synced.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            waiter.cancel()
            self._task.result()  # raises what ended it

    async def stop(self) -> None:
        """Stops following."""
        self._watch.stop()  # even if a cancellation below is swallowed somewhere, the loop ends
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        try:
            async for item in self._watch:
                if isinstance(item, Progress):
                    continue
                for before, after in apply_to_nodes(self._nodes, item):
                    change = NodeChange(item.revision, before, after, item)
                    for cb in self._callbacks:
                        cb(change)
                self.revision = item.revision
                self._synced.set()
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    async def wait_until(self, predicate: Callable[[Mapping[int, Node]], bool], timeout: float = 30.0) -> None:
        """Waits until ``predicate(view.nodes)`` holds. Raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate(self._nodes):
                self._changed.clear()
                await self._changed.wait()
