"""The group-commit helper every hot write path uses (muster.core.batch)."""

from __future__ import annotations

import asyncio

import pytest

from muster.core.batch import GroupCommit


class Ledger:
    """An apply function that records its batches and can be told to hold a flush open."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.most_running = 0

    async def apply(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]
        finally:
            self.running -= 1


async def test_a_lone_item_is_flushed_at_once() -> None:
    ledger = Ledger()
    batcher: GroupCommit[int, int] = GroupCommit(ledger.apply)
    assert await asyncio.wait_for(batcher(3), 1) == 30
    assert ledger.batches == [[3]]


async def test_items_arriving_during_a_flush_go_together_in_arrival_order() -> None:
    ledger = Ledger()
    ledger.gate = asyncio.Event()
    batcher: GroupCommit[int, int] = GroupCommit(ledger.apply)
    first = batcher.submit(1)
    await asyncio.sleep(0)
    rest = [batcher.submit(i) for i in range(2, 12)]
    await asyncio.sleep(0.01)
    assert ledger.batches == [[1]]  # the others wait for the flush in flight
    ledger.gate.set()
    assert await first == 10
    assert [await f for f in rest] == [i * 10 for i in range(2, 12)]
    assert ledger.batches == [[1], list(range(2, 12))]


async def test_one_bad_item_does_not_fail_its_batch_mates() -> None:
    ledger = Ledger()
    ledger.gate = asyncio.Event()
    batcher: GroupCommit[int, int] = GroupCommit(ledger.apply)
    futs = [batcher.submit(i) for i in (1, -2, 3)]
    ledger.gate.set()
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and "bad -2" in str(results[1])


async def test_a_failed_batch_fails_every_item_of_it_and_the_next_batch_runs() -> None:
    gate = asyncio.Event()
    calls: list[list[int]] = []

    async def apply(items: list[int]) -> list[int]:
        calls.append(items)
        await gate.wait()
        if len(calls) == 2:
            raise ConnectionError("database went away")
        return items

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    first = batcher.submit(0)
    await asyncio.sleep(0)
    doomed = [batcher.submit(i) for i in range(1, 4)]
    gate.set()
    assert await first == 0
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert calls[1] == [1, 2, 3]
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await batcher(7) == 7


async def test_flushes_in_flight_and_batch_size_are_bounded() -> None:
    ledger = Ledger()
    ledger.gate = asyncio.Event()
    batcher: GroupCommit[int, int] = GroupCommit(ledger.apply, max_batch=4, in_flight=2)
    futs = [batcher.submit(i) for i in range(20)]
    await asyncio.sleep(0.01)
    assert ledger.running == 2
    ledger.gate.set()
    assert [await f for f in futs] == [i * 10 for i in range(20)]
    assert ledger.most_running == 2
    assert max(len(b) for b in ledger.batches) == 4
    assert [i for b in ledger.batches for i in b] == list(range(20))


async def test_an_apply_that_miscounts_fails_its_batch() -> None:
    gate = asyncio.Event()

    async def apply(items: list[int]) -> list[int]:
        await gate.wait()
        return items[:1]

    batcher: GroupCommit[int, int] = GroupCommit(apply)
    first = batcher.submit(0)
    await asyncio.sleep(0)
    futs = [batcher.submit(i) for i in range(1, 4)]
    gate.set()
    assert await first == 0
    with pytest.raises(RuntimeError, match="3 items"):
        await asyncio.gather(*futs)
