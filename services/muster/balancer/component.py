"""Mounts the balancer: servicer, placement batcher, the live node view, and failover.

The balancer reads no other service's tables. It keeps a live view of the nodes from the
registry's event stream (:class:`~muster.balancer.view.NodeView`, over the client library's
``ClusterView`` at ``registry_address``, this process's own address under ``muster up``), takes
loads from the registry's ``ListNodeLoads`` (cached for at most a second), and its route-signing
keys from the keys service's ``DeriveKeys`` (in this process when the keys service runs here).
Reserving placements go through one ``GroupCommit`` batcher into ``BalancerStore.reserve``.

Failover: a follower of this process's event bus moves the sessions of a node that went OFFLINE
(lease expired, or it left) or was deleted; a sweep every two seconds does the same for any node
with sessions that the view does not show ONLINE (a missed event, a replica that was down), and
ends placements never started within ``placement_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from muster.api.balancer.v1 import balancer_pb2, balancer_service_pb2, balancer_service_pb2_grpc
from muster.api.registry.v1 import node_pb2
from muster.balancer.custom import CustomStrategy, Diagnostics
from muster.balancer.models import ROUTE_PURPOSE
from muster.balancer.servicer import BalancerServicer
from muster.balancer.store import Ask, BalancerStore, Placed
from muster.balancer.view import NodeView, RouteKeys, StrategyCache
from muster.core import events, periodic
from muster.core.batch import GroupCommit
from muster.core.server import Runtime

log = logging.getLogger(__name__)

SERVICE_NAME = balancer_service_pb2.DESCRIPTOR.services_by_name["BalancerService"].full_name
_NODE_STATE = node_pb2.NodeStateChanged.DESCRIPTOR.full_name
_NODE_DELETED = node_pb2.NodeDeleted.DESCRIPTOR.full_name
_CLUSTER_RESET = node_pb2.ClusterReset.DESCRIPTOR.full_name
_STRATEGY_CHANGED = balancer_pb2.StrategyChanged.DESCRIPTOR.full_name
SWEEP_INTERVAL = 2.0
# One batch in flight: the next is decided on the counts the last one left (no read), which a
# second batch in flight would not yet see (its statement would find the counts changed).
PLACE_BATCH = 500
PLACE_IN_FLIGHT = 1


class BalancerComponent:
    """The balancer service and its background work."""

    service_name = SERVICE_NAME

    def __init__(self, runtime: Runtime) -> None:
        s = runtime.settings
        self._runtime = runtime
        self._cluster: Any = None
        self.store = BalancerStore(runtime.pool, runtime.bus.numberer)
        self.view = NodeView(lambda: self._cluster.view(), lambda: self._cluster.list_node_loads())
        self.strategy = StrategyCache(self.store.strategy)
        self.keys = RouteKeys(self._derive_keys)
        self.placements: GroupCommit[Ask, Placed] = GroupCommit(
            self._reserve, max_batch=PLACE_BATCH, in_flight=PLACE_IN_FLIGHT, name="placements"
        )
        self.custom = CustomStrategy(s.balancer_custom, s.balancer_custom_timeout) if s.balancer_custom else None
        self.diagnostics = Diagnostics(s.balancer_diagnostics) if s.balancer_diagnostics else None
        self.servicer = BalancerServicer(
            self.store,
            self.view,
            self.strategy,
            self.keys,
            self.placements,
            custom=self.custom,
            diagnostics=self.diagnostics,
        )
        self._to_move: dict[int, int] = {}  # node id -> the revision that showed it dead (0: the sweep)
        self._absent: set[int] = set()
        self._move_wake = asyncio.Event()

    async def _reserve(self, asks: list[Ask]) -> list[Placed | Exception]:
        return await self.store.reserve(asks, self.keys.signing_key())

    async def _derive_keys(self) -> list[tuple[int, str, bytes]]:
        keys = self._runtime.components.get("keys")
        if keys is not None:
            derived = await keys.store.derived(ROUTE_PURPOSE)
            return [(info.version, info.state.name, key) for info, key in derived]
        return list(await self._cluster.derive_keys(ROUTE_PURPOSE))

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
        rt.spawn(self.view.follow(), "muster-balancer-view")
        rt.spawn(self._follow(), "muster-balancer-follow")
        rt.spawn(self._mover(), "muster-balancer-mover")
        rt.spawn(self._sweep(), "muster-balancer-sweep")
        rt.spawn(self.view.watchdog(), "muster-balancer-watchdog")

    async def stop(self) -> None:
        """Finishes the batches in flight and closes the connections."""
        await self.placements.close()
        await self.view.stop()
        if self._cluster is not None:
            await self._cluster.close()
        if self.diagnostics is not None:
            self.diagnostics.close()

    # -- failover ------------------------------------------------------------------------------

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
            self.strategy.invalidate()
        elif ev.kind == _CLUSTER_RESET:
            # Every node is gone and the next one defines the cluster anew: no session survives.
            # Replicas following the same event race harmlessly (the second finds nothing).
            ended = await self.store.end_sessions(None, "CLUSTER_RESET")
            if ended:
                log.info("cluster reset: %d sessions ended", ended, extra={"event": "sessions_ended", "count": ended})

    def _schedule_move(self, node_id: int, revision: int = 0) -> None:
        if node_id:
            self._to_move[node_id] = max(revision, self._to_move.get(node_id, 0))
            self._move_wake.set()

    async def _mover(self) -> None:
        while True:
            await self._move_wake.wait()
            self._move_wake.clear()
            while self._to_move:
                node_id, revision = self._to_move.popitem()
                try:
                    # (current_nodes: never onto a node a stale view shows ONLINE either)
                    if not await self.view.still_dead(node_id, revision):
                        log.info("node %s is ONLINE again: its sessions stay", node_id)
                        continue
                    await self.keys.get()
                    await self.store.move_sessions(node_id, self.view.candidates, self.keys.signing_key())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the sweep tries again
                    log.warning("moving node %s's sessions failed: %s", node_id, type(exc).__name__)

    async def _sweep(self) -> None:
        await periodic.every(SWEEP_INTERVAL, self._sweep_once, name="balancer sweep")

    async def _sweep_once(self) -> None:
        await self.store.expire_placed(self._runtime.settings.placement_ttl)
        if not self.view.ready:
            return
        # A node the view shows not ONLINE, or has not shown for two sweeps (it may have joined a
        # moment ago), has its sessions moved.
        nodes = {n.id: n for n in await self.view.current_nodes()}
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
