"""core.periodic.every: passes run on time, a failing pass does not stop the loop, cancel stops it."""

from __future__ import annotations

import asyncio

import pytest

from muster.core import periodic


async def test_a_failing_pass_does_not_stop_the_loop_and_cancel_does() -> None:
    calls: list[int] = []
    six = asyncio.Event()

    async def work() -> None:
        calls.append(len(calls))
        if len(calls) == 6:
            six.set()
        if len(calls) % 2:
            raise ConnectionError("the database is down")

    task = asyncio.create_task(periodic.every(0.01, work, name="test pass"))
    await asyncio.wait_for(six.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    n = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == n  # nothing runs after the cancel


async def test_the_first_pass_waits_one_interval() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def work() -> None:
        calls.append(loop.time() - start)

    task = asyncio.create_task(periodic.every(0.05, work, name="test pass"))
    await asyncio.sleep(0.08)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(calls) == 1 and calls[0] >= 0.045  # (the loop's clock may round a hair below the wait)
