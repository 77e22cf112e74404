"""Group commit: many callers' operations applied in one transaction, each answered after it.

Every hot write path (heartbeats, placements, lock operations, node mode changes) goes through a
:class:`GroupCommit`. Its caller supplies only "apply this batch in one transaction"; the batcher
decides when to flush:

- when idle, an operation is flushed at once (no window: a lone caller waits one transaction);
- while flushes are in flight, arriving operations gather and go together in the next flush;
- at most ``in_flight`` flushes run at once, each of at most ``max_batch`` operations, taken in
  arrival order;
- every operation gets its own result or its own error: ``apply`` returns one outcome per item (a
  value, or an exception instance for that item alone), so one bad item never fails its
  batch-mates. Only when ``apply`` itself raises (the database went away, the commit failed) does
  every item of that batch get the error, and nothing of it was acknowledged.

An item's future resolves only after ``apply`` returned, that is after its transaction committed:
nothing is acknowledged before its commit. Cancelling a caller's wait does not withdraw an item
already handed to a flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Apply = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class GroupCommit(Generic[T, R]):
    """Batches operations of type ``T`` into calls of ``apply``, answering each with an ``R``.

    Args:
        apply: applies a batch in one transaction; returns one outcome per item, in order (an
            exception instance fails that item alone). Raising fails every item of the batch.
        max_batch: the most items one flush takes (default 1,000).
        in_flight: the most flushes running at once (default 1). Two let one batch's round trips
            overlap another's commit; rows must then be locked in a fixed order by ``apply``.
        name: names the flush tasks (for debugging).
    """

    def __init__(self, apply: Apply[T, R], *, max_batch: int = 1_000, in_flight: int = 1, name: str = "batch") -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError("max_batch and in_flight must be at least 1")
        self._apply = apply
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._name = name
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self.batches = 0  # flushes run, for tests and metrics
        self.largest = 0

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queues one item; the future resolves after its batch committed, with its result or error."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._pump()
        return fut

    async def __call__(self, item: T) -> R:
        """Submits one item and waits for its outcome."""
        return await self.submit(item)

    @property
    def pending(self) -> int:
        """Items queued and not yet handed to a flush."""
        return len(self._queue)

    def _pump(self) -> None:
        while self._queue and len(self._flushes) < self._in_flight:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            task = asyncio.create_task(self._flush(batch), name=f"muster-{self._name}")
            self._flushes.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._pump()

    async def _flush(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.largest = max(self.largest, len(batch))
        try:
            outcomes = await self._apply([item for item, _ in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{self._name}: apply answered {len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every item of the batch gets it (cancellation too)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: a caller that stopped waiting must not log it
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if isinstance(outcome, BaseException):
                fut.set_exception(outcome)
                fut.exception()
            else:
                fut.set_result(outcome)

    async def close(self, timeout: float = 5.0) -> None:
        """Waits (up to ``timeout`` seconds) for the flushes in flight and those still queued."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._flushes:
                    await asyncio.gather(*self._flushes, return_exceptions=True)
