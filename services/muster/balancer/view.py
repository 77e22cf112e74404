"""What the balancer knows besides its tables: the live node view with its caches and stall
detection, the cached strategy, and the route-signing keys.

The node view follows the registry's event stream (the client library's ``ClusterView``), merges
in the loads of ``ListNodeLoads`` (refreshed at most once a second), and keeps the candidate split
per label requirement until either changes. A process that did not run for a while (stopped,
swapped out, starved) re-reads its view before it places or moves again: events published
meanwhile may still sit unread in its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from muster.balancer.decide import Split
from muster.balancer.errors import ViewNotReadyError
from muster.balancer.models import NodeInfo
from muster.balancer.models import split as split_nodes
from muster.core.errors import KeysUnavailableError, MusterError

log = logging.getLogger(__name__)

LOADS_MAX_AGE = 1.0
KEYS_MAX_AGE = 30.0
STRATEGY_MAX_AGE = 1.0
STALL_AFTER = 1.0
FRESH_VIEW_WAIT = 5.0
WATCHDOG_INTERVAL = 0.2
_MAX_SPLITS = 256


class NodeView:
    """The balancer's live view of the nodes.

    Args:
        new_view: makes a new (unstarted) ``ClusterView`` each time the view is followed again.
        list_loads: the registry's ``ListNodeLoads`` (records with ``node_id``, ``load``, ``health``).
    """

    def __init__(self, new_view: Callable[[], Any], list_loads: Callable[[], Awaitable[list[Any]]]) -> None:
        self._new_view = new_view
        self._list_loads = list_loads
        self._view: Any = None
        self._loads: dict[int, Any] = {}
        self._loads_at = 0.0
        self._loads_task: asyncio.Task[None] | None = None
        self._nodes: list[NodeInfo] | None = None
        self._splits: dict[tuple[tuple[str, str], ...], Split] = {}
        self._fresh = asyncio.Event()  # the view was (re-)read since the last stall
        self._reread = asyncio.Event()
        self._tick = time.monotonic()

    @property
    def ready(self) -> bool:
        """Whether the view has its first snapshot."""
        return self._view is not None and self._view.revision > 0

    def nodes(self) -> list[NodeInfo]:
        """Every node the view knows, with its latest load (rebuilt when either changes).

        Raises:
            ViewNotReadyError: the view has no snapshot yet.
        """
        if not self.ready:
            raise ViewNotReadyError()
        return self._all()

    def _all(self) -> list[NodeInfo]:
        if self._nodes is None:
            self._nodes = self._build()
            self._splits = {}
        return self._nodes

    async def current_nodes(self) -> list[NodeInfo]:
        """:meth:`nodes` from a view known to be current: after a stall, once it was read again.

        Raises:
            ViewNotReadyError: no snapshot yet, or the view could not be read again within five seconds.
        """
        self.check_stall()
        if not self._fresh.is_set():
            try:
                async with asyncio.timeout(FRESH_VIEW_WAIT):
                    await self._fresh.wait()
            except TimeoutError:
                raise ViewNotReadyError() from None
        return self.nodes()

    async def current_split(self, labels: dict[str, str]) -> Split:
        """:meth:`split` from a current view (see :meth:`current_nodes`)."""
        await self.current_nodes()
        return self.split(labels)

    def split(self, labels: dict[str, str]) -> Split:
        """The candidates for ``labels`` and the excluded nodes, kept until the view or the loads change.

        Raises:
            ViewNotReadyError: the view has no snapshot yet.
        """
        nodes = self.nodes()
        key = tuple(sorted(labels.items()))
        got = self._splits.get(key)
        if got is None:
            if len(self._splits) > _MAX_SPLITS:
                self._splits.clear()
            got = self._splits[key] = Split(*split_nodes(nodes, labels))
        return got

    def candidates(self) -> list[NodeInfo]:
        """The nodes that can take sessions now (no label requirement)."""
        return self.split({}).candidates

    async def still_dead(self, node_id: int, revision: int) -> bool:
        """Whether a node scheduled to have its sessions moved is still not ONLINE: a move decided
        from an event may run later (behind other moves, or after a pause), when the node has come
        back and taken new sessions, which must stay (found by the chaos checker). The view is given
        a moment to reach the event that scheduled the move; a node it shows ONLINE after that is alive."""
        await self.current_nodes()
        view = self._view
        if view is None:
            return True
        if revision and view.revision < revision:
            with contextlib.suppress(TimeoutError):
                await view.wait_until(lambda _: view.revision >= revision, timeout=2.0)
        node = view.nodes.get(node_id)
        alive = node is not None and node.state.name == "ONLINE" and view.revision >= revision
        return not alive

    # -- loads ---------------------------------------------------------------------------------

    async def fresh_loads(self, *, wait: bool) -> None:
        """Refreshes the loads when older than a second (one refresh in flight); waits for it when
        ``wait`` or when there are none yet."""
        if time.monotonic() - self._loads_at < LOADS_MAX_AGE:
            return
        if self._loads_task is None or self._loads_task.done():
            self._loads_task = asyncio.create_task(self._refresh_loads())
        if wait or not self._loads:
            await asyncio.shield(self._loads_task)

    async def _refresh_loads(self) -> None:
        try:
            loads = await self._list_loads()
        except Exception as exc:  # noqa: BLE001 - the last loads stay; health still comes from the view
            log.debug("loads not refreshed: %s", type(exc).__name__)
            return
        self._loads = {x.node_id: x for x in loads}
        self._loads_at = time.monotonic()
        self._nodes = None

    def _build(self) -> list[NodeInfo]:
        from muster.client import Health, NodeMode

        view = self._view
        out = []
        for n in view.nodes.values() if view is not None else ():
            load = self._loads.get(n.id)
            latest = load.load if load is not None else n.load
            out.append(
                NodeInfo(
                    id=n.id,
                    address=n.address,
                    state=n.state.name,
                    draining=n.mode is NodeMode.DRAINING,
                    missed_check_in=(load.health if load is not None else n.health) is Health.MISSED_CHECK_IN,
                    labels=dict(n.labels),
                    load1=latest.load1,
                    load5=latest.load5,
                    load15=latest.load15,
                    cpu_count=latest.cpu_count,
                )
            )
        return out

    def _invalidate(self, *_: object) -> None:
        self._nodes = None

    # -- following and stalls --------------------------------------------------------------------

    def check_stall(self) -> None:
        """Notes that this process runs; after a gap of over a second, the view is read again
        before the next placement or move."""
        now = time.monotonic()
        stalled = now - self._tick
        self._tick = now
        if stalled > STALL_AFTER and self._fresh.is_set():
            log.warning(
                "this replica did not run for %.1f s; re-reading the node view before placing",
                stalled,
                extra={"event": "balancer_stall"},
            )
            self._fresh.clear()
            self._reread.set()

    async def watchdog(self) -> None:
        """Runs for ever: notices stalls, and a view whose stream ended (it is followed again)."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            self.check_stall()
            view = self._view
            if view is not None and view.error is not None:
                self._reread.set()

    async def follow(self) -> None:
        """Runs for ever: follows the view, and follows it anew after a stall or when it ends."""
        attempt = 0
        while True:
            view = self._new_view()
            view.on_change(self._invalidate)
            self._view = view
            self._nodes = None
            reread = False
            try:
                self._reread.clear()
                await view.start()
                # The time the (re-)read itself took is no stall: counted as one, a snapshot that
                # takes over a second to apply (10,000 nodes) would be read again for ever.
                self._tick = time.monotonic()
                self._fresh.set()
                attempt = 0
                await self._reread.wait()
                if view.error is not None:
                    raise view.error
                reread = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - follow again
                log.warning("the node view stopped (%s); following again", exc, extra={"event": "balancer_view"})
            finally:
                await view.stop()
            if not reread:
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt))
                attempt += 1

    async def stop(self) -> None:
        """Stops following."""
        if self._view is not None:
            await self._view.stop()


class StrategyCache:
    """The cluster's strategy, read at most once a second (:meth:`invalidate` on a StrategyChanged event).

    Args:
        read: reads the strategy from the store.
    """

    def __init__(self, read: Callable[[], Awaitable[str]]) -> None:
        self._read = read
        self._value = "sessions"
        self._at = 0.0

    async def get(self) -> str:
        """The strategy (cached for a second)."""
        if time.monotonic() - self._at > STRATEGY_MAX_AGE:
            self._value = await self._read()
            self._at = time.monotonic()
        return self._value

    def invalidate(self) -> None:
        """The next :meth:`get` reads the store."""
        self._at = 0.0


class RouteKeys:
    """The route-signing keys of every accepted key version, newest first (kept for 30 s).

    Args:
        derive: the keys service's ``DeriveKeys`` for the route purpose: (version, state name, key).
    """

    def __init__(self, derive: Callable[[], Awaitable[list[tuple[int, str, bytes]]]]) -> None:
        self._derive = derive
        self._keys: list[tuple[int, str, bytes]] = []
        self._at = 0.0

    async def get(self, *, refresh: bool = False) -> list[tuple[int, str, bytes]]:
        """The keys; ``refresh`` asks the keys service again at once.

        Raises:
            KeysUnavailableError: the keys service cannot be reached and no keys are known yet.
        """
        if refresh or not self._keys or time.monotonic() - self._at > KEYS_MAX_AGE:
            try:
                self._keys = await self._derive()
            except MusterError:
                raise
            except Exception as exc:
                if not self._keys:
                    raise KeysUnavailableError(
                        f"the route-signing key cannot be had from the keys service ({type(exc).__name__}); "
                        "check the balancer's keys_address"
                    ) from None
                log.warning("route keys not refreshed: %s", type(exc).__name__)
            self._at = time.monotonic()
        return self._keys

    def signing_key(self) -> bytes:
        """The ACTIVE version's key (loaded by :meth:`get` before any placement)."""
        return next((k for _, state, k in self._keys if state == "ACTIVE"), self._keys[0][2])
