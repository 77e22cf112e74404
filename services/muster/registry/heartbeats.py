"""Group commit for heartbeats: one UPDATE per batch per replica, answered after its commit."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import timedelta

from muster.core import metrics
from muster.registry.models import HeartbeatResult, Load
from muster.registry.store import RegistryStore

_MAX_BATCH = 2_000


class HeartbeatBatcher:
    """Collects heartbeats for at most ``window`` and writes them in one statement.

    Nothing is acknowledged before its commit: each caller's future resolves after the batch's
    statement returned (autocommit), with the lease's new expiry or the node's error.
    """

    def __init__(self, store: RegistryStore, window: timedelta) -> None:
        self._store = store
        self._window = window.total_seconds()
        self._queue: list[tuple[int, int, Load, asyncio.Future[HeartbeatResult]]] = []
        self._task: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()

    async def heartbeat(self, node_id: int, lease_id: int, load: Load) -> HeartbeatResult:
        """Renews one lease (batched with others); raises the node's domain error."""
        return await self.submit(node_id, lease_id, load)

    def submit(self, node_id: int, lease_id: int, load: Load) -> asyncio.Future[HeartbeatResult]:
        """Queues one renewal and returns its future (no task of its own: what a stream carrying many
        heartbeats uses). It resolves after the batch's commit, with the result or the node's error;
        cancelling it before the batch is written only stops the caller from hearing the answer."""
        fut: asyncio.Future[HeartbeatResult] = asyncio.get_running_loop().create_future()
        began = time.monotonic()
        fut.add_done_callback(lambda _: metrics.heartbeat_commit.record(1000 * (time.monotonic() - began)))
        self._queue.append((node_id, lease_id, load, fut))
        if len(self._queue) >= _MAX_BATCH:
            self._flush_now.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="muster-heartbeats")
        return fut

    async def _run(self) -> None:
        while self._queue:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_now.wait(), self._window)
            self._flush_now.clear()
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            try:
                results = await self._store.heartbeats([(n, lease, load) for n, lease, load, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every caller of the batch gets it
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for node_id, lease_id, _, fut in batch:
                if fut.done():
                    continue
                result = results[(node_id, lease_id)]
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def close(self) -> None:
        """Waits for the batch in flight."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
