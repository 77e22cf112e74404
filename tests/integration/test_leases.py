"""Liveness is a lease judged on the database's clock: suspect, then fenced (OFFLINE)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from google.protobuf import timestamp_pb2
from harness import ServerProcess, registry, wait_for

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

TTL = timedelta(milliseconds=1500)


async def test_silent_node_misses_check_in_then_goes_offline_by_the_database_clock(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await stub.JoinNode(pb.JoinNodeRequest(host="quiet", port=1, wait_for_revision=True))
        far_future = timestamp_pb2.Timestamp(seconds=r.server_time.seconds + 10 * 365 * 86400)
        hb = await stub.Heartbeat(
            pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id, client_time=far_future)
        )
        # The client's clock changes nothing: the lease runs from the database's now.
        assert hb.lease_expire_time.ToDatetime() - hb.server_time.ToDatetime() == TTL

        async def node() -> node_pb2.Node:
            return (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node

        suspect = await wait_for(
            lambda: _when(node(), lambda n: n.health == node_pb2.Node.HEALTH_MISSED_CHECK_IN), what="missed check-in"
        )
        assert suspect.state == node_pb2.Node.STATE_ONLINE
        offline = await wait_for(
            lambda: _when(node(), lambda n: n.state == node_pb2.Node.STATE_OFFLINE), what="lease expiry"
        )
        assert offline.state_reason == "LEASE_EXPIRED"
        assert offline.health == node_pb2.Node.HEALTH_UNSPECIFIED

        events = await _events_after(stub, r.revision, 2)
        assert [e.kind.rsplit(".", 1)[1] for e in events] == ["NodeSuspected", "NodeStateChanged"]
        changed = node_pb2.NodeStateChanged()
        events[1].payload.Unpack(changed)
        assert changed.previous_state == node_pb2.Node.STATE_ONLINE
        # Expired no earlier than the lease allowed, by the database's timestamps.
        assert events[1].time.ToDatetime() >= hb.lease_expire_time.ToDatetime()


async def test_a_suspect_node_that_checks_in_again_recovers(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await stub.JoinNode(pb.JoinNodeRequest(host="flaky", port=1, wait_for_revision=True))

        async def health() -> int:
            return (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node.health

        await wait_for(lambda: _when(health(), lambda h: h == node_pb2.Node.HEALTH_MISSED_CHECK_IN))
        await stub.Heartbeat(pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id))
        await wait_for(lambda: _when(health(), lambda h: h == node_pb2.Node.HEALTH_OK), what="recovery")
        kinds = [e.kind.rsplit(".", 1)[1] for e in await _events_after(stub, r.revision, 2)]
        assert kinds == ["NodeSuspected", "NodeRecovered"]


async def test_heartbeating_nodes_stay_online_while_others_expire(registry_server: ServerProcess) -> None:
    async with registry(registry_server.address) as stub:
        alive = await stub.JoinNode(pb.JoinNodeRequest(host="alive", port=1))
        dead = await stub.JoinNode(pb.JoinNodeRequest(host="dead", port=1))
        stop = asyncio.Event()

        async def beat() -> None:
            while not stop.is_set():
                await stub.Heartbeat(pb.HeartbeatRequest(node_id=alive.node.id, lease_id=alive.node.lease_id))
                await asyncio.sleep(0.2)

        task = asyncio.create_task(beat())
        try:

            async def dead_state() -> int:
                return (await stub.GetNode(pb.GetNodeRequest(node_id=dead.node.id))).node.state

            await wait_for(lambda: _when(dead_state(), lambda s: s == node_pb2.Node.STATE_OFFLINE))
            await asyncio.sleep(0.5)
            node = (await stub.GetNode(pb.GetNodeRequest(node_id=alive.node.id))).node
            assert node.state == node_pb2.Node.STATE_ONLINE and node.health == node_pb2.Node.HEALTH_OK
        finally:
            stop.set()
            await task


async def _when(value, predicate):
    v = await value
    return v if predicate(v) else None


async def _events_after(stub, revision: int, count: int) -> list:
    out = []
    call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=revision))
    try:
        async with asyncio.timeout(10):
            async for msg in call:
                out += list(msg.events.events)
                if len(out) >= count:
                    return out
    finally:
        call.cancel()
    return out
