"""Mounts the balancer: servicer, placement batcher, the live node view, and failover.

The balancer reads no other service's tables. It keeps a live view of the nodes from the
registry's event stream (the client library's ``ClusterView`` over gRPC at ``registry_address``,
this process's own address under ``muster up``), takes loads from the registry's
``ListNodeLoads`` (cached for at most a second), and its route-signing keys from the keys
service's ``DeriveKeys`` (in this process when the keys service runs here).

Failover: a follower of this process's event bus moves the sessions of a node that went OFFLINE
(lease expired, or it left) or was deleted; a sweep every two seconds does the same for any node
with sessions that the view does not show ONLINE (a missed event, a replica that was down), and
ends placements never started within ``placement_ttl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import grpc

from muster.api.balancer.v1 import balancer_pb2, balancer_service_pb2, balancer_service_pb2_grpc
from muster.api.registry.v1 import node_pb2
from muster.balancer.errors import ViewNotReadyError
from muster.balancer.models import ROUTE_PURPOSE, NodeInfo, split
from muster.balancer.placer import CustomStrategy, Diagnostics, Placer
from muster.balancer.servicer import BalancerServicer
from muster.balancer.store import BalancerStore
from muster.core import events
from muster.core.errors import KeysUnavailableError, MusterError
from muster.core.server import Runtime

log = logging.getLogger(__name__)

SERVICE_NAME = balancer_service_pb2.DESCRIPTOR.services_by_name["BalancerService"].full_name
_NODE_STATE = node_pb2.NodeStateChanged.DESCRIPTOR.full_name
_NODE_DELETED = node_pb2.NodeDeleted.DESCRIPTOR.full_name
_STRATEGY_CHANGED = balancer_pb2.StrategyChanged.DESCRIPTOR.full_name
SWEEP_INTERVAL = 2.0
LOADS_MAX_AGE = 1.0
KEYS_MAX_AGE = 30.0
STRATEGY_MAX_AGE = 1.0
# A process that did not run for this long (stopped, swapped out, starved) re-reads its node view
# before it places or moves again: events published meanwhile may still sit unread in its stream.
STALL_AFTER = 1.0
FRESH_VIEW_WAIT = 5.0


class BalancerComponent:
    """The balancer service and its background work."""

    service_name = SERVICE_NAME

    def __init__(self, runtime: Runtime) -> None:
        s = runtime.settings
        self._runtime = runtime
        self.store = BalancerStore(runtime.pool, runtime.bus.numberer)
        self.placer = Placer(self.store, self.signing_key)
        self.custom = CustomStrategy(s.balancer_custom, s.balancer_custom_timeout) if s.balancer_custom else None
        self.diagnostics = Diagnostics(s.balancer_diagnostics) if s.balancer_diagnostics else None
        self.servicer = BalancerServicer(self)
        self._cluster: Any = None
        self._view: Any = None
        self._loads: dict[int, Any] = {}
        self._loads_at = 0.0
        self._loads_task: asyncio.Task[None] | None = None
        self._keys: list[tuple[int, str, bytes]] = []
        self._keys_at = 0.0
        self._strategy = "sessions"
        self._strategy_at = 0.0
        self._to_move: dict[int, int] = {}  # node id -> the revision that showed it dead (0: the sweep)
        self._nodes_cache: list[NodeInfo] | None = None
        self._splits: dict[tuple[tuple[str, str], ...], tuple[list[NodeInfo], list[tuple[NodeInfo, str]]]] = {}
        self._absent: set[int] = set()
        self._move_wake = asyncio.Event()
        self._fresh = asyncio.Event()  # the view was (re-)read since the last stall
        self._reread = asyncio.Event()
        self._tick = time.monotonic()

    def mount(self, server: grpc.aio.Server) -> list[str]:
        """Adds the servicer; returns the service name."""
        balancer_service_pb2_grpc.add_BalancerServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def start(self) -> None:
        """Connects to the registry (and keys) service and starts the view, the follower, the mover and the sweep."""
        from muster.client import ClientConfig, Cluster

        rt, s = self._runtime, self._runtime.settings
        registry = s.registry_address or rt.address
        keys = s.keys_address or registry
        sec = rt.security
        ca = s.registry_tls_ca_file.read_bytes() if s.registry_tls_ca_file else None
        mtls = sec is not None and sec.tls and ca is not None
        config = ClientConfig(
            addresses=(registry,),
            service_addresses={"keys": (keys,)},
            token=sec.outbound_token if sec is not None else None,
            tls=ca is not None,
            root_certificates=ca,
            client_certificate=sec.cert_chain if mtls and sec else None,
            client_key=sec.private_key if mtls and sec else None,
        )
        self._cluster = Cluster(config)
        rt.spawn(self._follow_view(), "muster-balancer-view")
        rt.spawn(self._follow(), "muster-balancer-follow")
        rt.spawn(self._mover(), "muster-balancer-mover")
        rt.spawn(self._sweep(), "muster-balancer-sweep")
        rt.spawn(self._watchdog(), "muster-balancer-watchdog")

    async def stop(self) -> None:
        """Finishes the batch in flight and closes the connections."""
        await self.placer.close()
        if self._view is not None:
            await self._view.stop()
        if self._cluster is not None:
            await self._cluster.close()
        if self.diagnostics is not None:
            self.diagnostics.close()

    # -- what the servicer asks ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the node view has its first snapshot."""
        return self._view is not None and self._view.revision > 0

    async def current_nodes(self) -> list[NodeInfo]:
        """:meth:`nodes` from a view known to be current: after a stall, once it was read again.

        Raises:
            ViewNotReadyError: the view could not be read again within five seconds.
        """
        self._check_stall()
        if not self._fresh.is_set():
            try:
                async with asyncio.timeout(FRESH_VIEW_WAIT):
                    await self._fresh.wait()
            except TimeoutError:
                raise ViewNotReadyError() from None
        return self.nodes()

    async def current_split(self, labels: dict[str, str]) -> tuple[list[NodeInfo], list[tuple[NodeInfo, str]]]:
        """The candidates for ``labels`` and the excluded nodes with their reasons, from a current
        view (kept until the view or the loads change: callers must not modify the lists)."""
        nodes = await self.current_nodes()
        key = tuple(sorted(labels.items()))
        got = self._splits.get(key)
        if got is None:
            if len(self._splits) > 256:
                self._splits.clear()
            got = self._splits[key] = split(nodes, labels)
        return got

    def nodes(self) -> list[NodeInfo]:
        """Every node the view knows, with its latest load (rebuilt when either changes)."""
        if self._nodes_cache is None:
            self._nodes_cache = self._build_nodes()
            self._splits = {}
        return self._nodes_cache

    def _invalidate(self, *_: object) -> None:
        self._nodes_cache = None

    def _build_nodes(self) -> list[NodeInfo]:
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

    async def fresh_loads(self, *, wait: bool) -> None:
        """Refreshes the loads when older than a second (one refresh in flight)."""
        if time.monotonic() - self._loads_at < LOADS_MAX_AGE:
            return
        if self._loads_task is None or self._loads_task.done():
            self._loads_task = asyncio.create_task(self._refresh_loads())
        if wait or not self._loads:
            await asyncio.shield(self._loads_task)

    async def _refresh_loads(self) -> None:
        try:
            loads = await self._cluster.list_node_loads()
        except Exception as exc:  # noqa: BLE001 - the last loads stay; health still comes from the view
            log.debug("loads not refreshed: %s", type(exc).__name__)
            return
        self._loads = {x.node_id: x for x in loads}
        self._loads_at = time.monotonic()
        self._nodes_cache = None

    async def strategy(self) -> str:
        """The cluster's strategy (cached for a second; a StrategyChanged event refreshes it at once)."""
        if time.monotonic() - self._strategy_at > STRATEGY_MAX_AGE:
            self._strategy = await self.store.strategy()
            self._strategy_at = time.monotonic()
        return self._strategy

    async def route_keys(self, *, refresh: bool = False) -> list[tuple[int, str, bytes]]:
        """The route-signing keys of every accepted key version (newest first)."""
        if refresh or not self._keys or time.monotonic() - self._keys_at > KEYS_MAX_AGE:
            keys = self._runtime.components.get("keys")
            try:
                if keys is not None:
                    derived = await keys.store.derived(ROUTE_PURPOSE)
                    self._keys = [(info.version, info.state.name, key) for info, key in derived]
                else:
                    self._keys = await self._cluster.derive_keys(ROUTE_PURPOSE)
            except MusterError:
                raise
            except Exception as exc:
                if not self._keys:
                    raise KeysUnavailableError(
                        f"the route-signing key cannot be had from the keys service ({type(exc).__name__}); "
                        "check the balancer's keys_address"
                    ) from None
                log.warning("route keys not refreshed: %s", type(exc).__name__)
            self._keys_at = time.monotonic()
        return self._keys

    def signing_key(self) -> bytes:
        """The ACTIVE version's route key (loaded by :meth:`route_keys` before any placement)."""
        return next((k for _, state, k in self._keys if state == "ACTIVE"), self._keys[0][2])

    def candidates(self) -> list[NodeInfo]:
        """The nodes that can take sessions now (no label requirement)."""
        return split(self.nodes(), {})[0]

    # -- background work -----------------------------------------------------------------------

    def _check_stall(self) -> None:
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

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            self._check_stall()

    async def _follow_view(self) -> None:
        attempt = 0
        while True:
            view = self._cluster.view()
            view.on_change(self._invalidate)
            self._view = view
            self._nodes_cache = None
            reread = False
            try:
                self._reread.clear()
                await view.start()
                self._fresh.set()
                attempt = 0
                assert view._task is not None
                wake = asyncio.create_task(self._reread.wait())
                try:
                    done, _ = await asyncio.wait({view._task, wake}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
                if view._task in done:
                    view._task.result()  # raises what ended it
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

    async def _follow(self) -> None:
        await events.follow(self._runtime.bus, self._on_event, name="balancer follower")

    async def _on_event(self, ev: events.StoredEvent) -> None:
        if ev.kind == _NODE_STATE:
            changed = node_pb2.NodeStateChanged()
            ev.proto.payload.Unpack(changed)
            if changed.node.state != node_pb2.Node.STATE_ONLINE:
                self._schedule_move(changed.node.id, ev.revision)
        elif ev.kind == _NODE_DELETED:
            self._schedule_move(ev.node_id, ev.revision)
        elif ev.kind == _STRATEGY_CHANGED:
            self._strategy_at = 0.0

    def _schedule_move(self, node_id: int, revision: int = 0) -> None:
        if node_id:
            self._to_move[node_id] = max(revision, self._to_move.get(node_id, 0))
            self._move_wake.set()

    async def _still_dead(self, node_id: int, revision: int) -> bool:
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

    async def _mover(self) -> None:
        while True:
            await self._move_wake.wait()
            self._move_wake.clear()
            while self._to_move:
                node_id, revision = self._to_move.popitem()
                try:
                    # (current_nodes: never onto a node a stale view shows ONLINE either)
                    if not await self._still_dead(node_id, revision):
                        log.info("node %s is ONLINE again: its sessions stay", node_id)
                        continue
                    await self.route_keys()
                    await self.store.move_sessions(node_id, self.candidates, self.signing_key())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the sweep tries again
                    log.warning("moving node %s's sessions failed: %s", node_id, type(exc).__name__)

    async def _sweep(self) -> None:
        ttl = self._runtime.settings.placement_ttl
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.store.expire_placed(ttl)
                if self.ready:
                    # A node the view shows not ONLINE, or has not shown for two sweeps (it may
                    # have joined a moment ago), has its sessions moved.
                    nodes = {n.id: n for n in await self.current_nodes()}
                    absent = set()
                    for node_id in await self.store.nodes_with_sessions():
                        node = nodes.get(node_id)
                        if node is None:
                            absent.add(node_id)
                            if node_id in self._absent:
                                self._schedule_move(node_id)
                        elif node.state != "ONLINE":
                            self._schedule_move(node_id)
                    self._absent = absent
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - next pass
                log.debug("balancer sweep failed: %s", type(exc).__name__)
