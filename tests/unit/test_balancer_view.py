"""The balancer's node view: stall detection must not take the view's own (re-)read for a stall."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from muster.balancer import view as view_module
from muster.balancer.view import NodeView


def _hold_the_loop(seconds: float) -> None:
    """Applying a big snapshot is CPU work that holds the event loop."""
    time.sleep(seconds)


class SlowSnapshotView:
    """A view whose first snapshot takes the event loop ``block`` seconds to apply, as a Resync of
    10,000 nodes does on a busy replica."""

    started = 0

    def __init__(self, block: float) -> None:
        self.block = block
        self.revision = 0
        self.error: BaseException | None = None
        self.nodes: dict[int, Any] = {}

    def on_change(self, callback: Any) -> None:
        pass

    async def start(self) -> None:
        SlowSnapshotView.started += 1
        await asyncio.sleep(0)
        _hold_the_loop(self.block)
        self.revision = 1

    async def stop(self) -> None:
        pass


async def test_a_snapshot_slower_than_the_stall_limit_is_read_once_not_for_ever(monkeypatch: Any) -> None:
    monkeypatch.setattr(view_module, "STALL_AFTER", 0.3)
    monkeypatch.setattr(view_module, "WATCHDOG_INTERVAL", 0.05)
    SlowSnapshotView.started = 0

    async def no_loads() -> list[Any]:
        return []

    nv = NodeView(lambda: SlowSnapshotView(0.5), no_loads)
    tasks = [asyncio.create_task(nv.follow()), asyncio.create_task(nv.watchdog())]
    try:
        await asyncio.sleep(2.0)
        assert SlowSnapshotView.started == 1
        assert nv.ready and await asyncio.wait_for(nv.current_nodes(), 1) == []
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
