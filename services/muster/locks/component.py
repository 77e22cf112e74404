"""Mounts the lock service: servicer, expiry sweep, and a follower of the event log that wakes
local waiters and releases the holds of nodes whose registry lease expired."""

from __future__ import annotations

import logging

import grpc

from muster.api.locks.v1 import lock_pb2, locks_service_pb2, locks_service_pb2_grpc
from muster.api.registry.v1 import node_pb2
from muster.core import events, periodic
from muster.core.batch import GroupCommit
from muster.core.server import Runtime
from muster.locks import convert
from muster.locks.jobs import JobStore
from muster.locks.models import LockOp
from muster.locks.servicer import LocksServicer
from muster.locks.store import LockStore, Outcome

log = logging.getLogger(__name__)

SERVICE_NAME = locks_service_pb2.DESCRIPTOR.services_by_name["LocksService"].full_name
_GRANTED = lock_pb2.LockGranted.DESCRIPTOR.full_name
_NODE_STATE = node_pb2.NodeStateChanged.DESCRIPTOR.full_name
_NODE_DELETED = node_pb2.NodeDeleted.DESCRIPTOR.full_name
_OFFLINE = node_pb2.Node.STATE_OFFLINE


class LocksComponent:
    """The lock service and its background work."""

    service_name = SERVICE_NAME

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.store = LockStore(runtime.pool, runtime.bus.numberer)
        self.jobs = JobStore(runtime.pool, runtime.bus.numberer)
        # Two batches in flight: one's round trip overlaps the other's commit; locks.run takes
        # its rows in name order, so the two never deadlock.
        self.ops: GroupCommit[LockOp, Outcome] = GroupCommit(self.store.run, max_batch=500, in_flight=2, name="locks")
        self.servicer = LocksServicer(self.store, self.jobs, self.ops)

    def mount(self, server: grpc.aio.Server) -> list[str]:
        locks_service_pb2_grpc.add_LocksServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def start(self) -> None:
        self._runtime.spawn(self._sweep(), "muster-locks-sweep")
        self._runtime.spawn(self._follow(), "muster-locks-follow")

    async def stop(self) -> None:
        await self.ops.close()

    async def _sweep(self) -> None:
        s = self._runtime.settings
        await periodic.every(
            s.lock_sweep_interval.total_seconds(),
            lambda: self.store.sweep(outage_threshold=s.outage_threshold, max_credit=s.max_outage_credit),
            name="lock sweep",
        )

    async def _follow(self) -> None:
        """Grants wake local waiters; nodes whose registry lease expired (or that were deleted) lose their locks."""
        await events.follow(self._runtime.bus, self._on_event, name="lock follower")

    async def _on_event(self, ev: events.StoredEvent) -> None:
        if ev.kind == _GRANTED:
            if not self.store.waiting:
                return  # nobody here waits: no need to decode the grant
            granted = lock_pb2.LockGranted()
            ev.proto.payload.Unpack(granted)
            if granted.waiter_id:
                self.store.granted(granted.waiter_id, convert.hold_from_proto(granted.lease))
        elif ev.kind == _NODE_STATE:
            changed = node_pb2.NodeStateChanged()
            ev.proto.payload.Unpack(changed)
            if changed.node.state == _OFFLINE and changed.node.state_reason == "LEASE_EXPIRED":
                await self.store.release_node(changed.node.id)
        elif ev.kind == _NODE_DELETED:
            await self.store.release_node(ev.node_id)
