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

_MAX_BATCH = 1_000  # requests per flush (a KeepAlive message may carry up to 1,000 heartbeats)
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
        heartbeats already handed to a flush."""
        fut = self._commit.submit(beats)
        began = time.monotonic()
        fut.add_done_callback(lambda _: metrics.heartbeat_commit.record(1000 * (time.monotonic() - began)))
        return fut

    async def close(self) -> None:
        """Waits for the batches in flight."""
        await self._commit.close()
