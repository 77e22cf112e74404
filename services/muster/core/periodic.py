"""The loop every service's background work runs in: a pass every interval, for the life of the task.

A pass that fails (the database is down, a replica is stopping) is logged at debug level and the
next pass runs on time: sweeps, reapers and maintenance catch up by themselves, so one failure
must neither stop the loop nor flood the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(seconds: float, work: Callable[[], Awaitable[object]], *, name: str) -> None:
    """Runs ``work()`` every ``seconds`` (after a first wait) until the calling task is cancelled.

    Args:
        seconds: the wait before each pass.
        work: one pass.
        name: what the pass is, for the log ("lock sweep").
    """
    while True:
        await asyncio.sleep(seconds)
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next pass tries again
            log.debug("%s failed: %s", name, type(exc).__name__, extra={"event": "pass_failed", "pass": name})
