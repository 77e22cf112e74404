"""Group commit for heartbeats: one UPDATE per batch per replica, answered after its commit.

A thin named wrapper over :class:`muster.core.batch.GroupCommit`. One item is one request's
heartbeats (a unary Heartbeat, or one KeepAlive message carrying one or several): all of them go in
the same batch, so they share one commit and one answer. A batch is flushed at once when the
batcher is idle and gathers what arrives while a flush runs; nothing is acknowledged before its
commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from muster.core import metrics
from muster.core.batch import GroupCommit
from muster.registry.models import HeartbeatResult, Load
from muster.registry.store import RegistryStore

Beat = tuple[int, int, Load]  # node id, lease id, load
Outcome = HeartbeatResult | Exception
# Told of every batch's renewals (node id, lease id, load, result): the node view keeps last-seen
# times and loads from them.
Observer = Callable[[Sequence[Beat], Sequence[Outcome]], None]

_MAX_BATCH = 1_000  # event-loop turns of requests per flush
_IN_FLIGHT = 1  # one at a time: a stream's heartbeats of one node commit in stream order


class HeartbeatBatcher:
    """Renews leases in group commits.

    Args:
        store: the registry's store.
        observer: called after each batch's commit with its heartbeats and their outcomes.
    """

    def __init__(self, store: RegistryStore, observer: Observer | None = None) -> None:
        self._store = store
        self._observer = observer
        self._commit: GroupCommit[Sequence[Beat], list[Outcome]] = GroupCommit(
            self._apply, max_batch=_MAX_BATCH, in_flight=_IN_FLIGHT, name="heartbeats"
        )
        self._turn: list[tuple[Sequence[Beat], asyncio.Future[list[Outcome]]]] = []
        self._scheduled = False

    async def _apply(self, requests: list[Sequence[Beat]]) -> list[list[Outcome]]:
        flat = [beat for req in requests for beat in req]
        outcomes = await self._store.heartbeats(flat)
        if self._observer is not None:
            self._observer(flat, outcomes)
        out, at = [], 0
        for req in requests:
            out.append(outcomes[at : at + len(req)])
            at += len(req)
        return out

    async def heartbeat(self, node_id: int, lease_id: int, load: Load) -> HeartbeatResult:
        """Renews one lease (batched with others); raises the node's domain error."""
        outcome = (await self.submit([(node_id, lease_id, load)]))[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit(self, beats: Sequence[Beat]) -> asyncio.Future[list[Outcome]]:
        """Queues one request's heartbeats (no task of its own: what a stream uses); the future
        resolves after their commit with one outcome per heartbeat (a result or that one's error),
        or fails as a whole when the batch's statement failed. Cancelling it does not withdraw
        heartbeats already handed to a flush.

        The requests submitted in one turn of the event loop (the messages every stream read in
        it) go to the group commit together, as one item: an idle batcher then flushes them in one
        statement instead of flushing the first alone and the rest after it.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Outcome]] = loop.create_future()
        began = time.monotonic()
        fut.add_done_callback(lambda _: metrics.heartbeat_commit.record(1000 * (time.monotonic() - began)))
        self._turn.append((beats, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._hand_over)
        return fut

    def _hand_over(self) -> None:
        self._scheduled = False
        turn, self._turn = self._turn, []
        whole = self._commit.submit([beat for beats, _ in turn for beat in beats])
        whole.add_done_callback(lambda done: _split(done, turn))

    async def close(self) -> None:
        """Waits for the batches in flight."""
        await self._commit.close()


def _split(
    done: asyncio.Future[list[Outcome]], turn: list[tuple[Sequence[Beat], asyncio.Future[list[Outcome]]]]
) -> None:
    """Hands each request of a turn its share of the turn's outcomes (or the batch's error)."""
    exc = asyncio.CancelledError() if done.cancelled() else done.exception()
    outcomes = done.result() if exc is None else []
    at = 0
    for beats, fut in turn:
        share, at = outcomes[at : at + len(beats)], at + len(beats)
        if fut.done():
            continue
        if exc is None:
            fut.set_result(share)
        elif isinstance(exc, asyncio.CancelledError):
            fut.cancel()
        else:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a caller that stopped waiting must not log it
