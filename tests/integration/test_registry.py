"""The registry's RPCs against a real server process and a real PostgreSQL."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from harness import ServerProcess, error_reason, registry

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

ONLINE, OFFLINE, DELETING, INVALID_LICENSE = (
    node_pb2.Node.STATE_ONLINE,
    node_pb2.Node.STATE_OFFLINE,
    node_pb2.Node.STATE_DELETING,
    node_pb2.Node.STATE_INVALID_LICENSE,
)


async def _join(stub, host: str, port: int = 8787, **kw) -> pb.JoinNodeResponse:
    return await stub.JoinNode(pb.JoinNodeRequest(host=host, port=port, **kw))


async def test_join_answers_a_lease_and_the_heartbeat_interval(registry_server: ServerProcess) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "app1.example.com", ipv4="10.0.0.1", labels={"zone": "a"})
        assert r.node.id > 0 and r.node.lease_id > 0
        assert r.node.address == "app1.example.com:8787" and r.node.ipv4 == "10.0.0.1"
        assert r.node.state == ONLINE and r.node.mode == node_pb2.Node.MODE_ACTIVE
        assert r.node.health == node_pb2.Node.HEALTH_OK
        assert r.heartbeat_interval.ToMilliseconds() == 200  # the server's configured interval
        assert r.lease_ttl.ToMilliseconds() == 1500
        got = await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))
        assert got.node.labels["zone"] == "a"


async def test_rejoin_from_the_same_address_keeps_the_id_and_replaces_the_lease(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        first = await _join(stub, "10.1.1.1")
        again = await _join(stub, "10.1.1.1")
        assert again.node.id == first.node.id
        assert again.node.lease_id != first.node.lease_id
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Heartbeat(pb.HeartbeatRequest(node_id=first.node.id, lease_id=first.node.lease_id))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(info.value)[0] == "STALE_LEASE"
        await stub.Heartbeat(pb.HeartbeatRequest(node_id=again.node.id, lease_id=again.node.lease_id))


async def test_a_retried_join_with_the_same_request_id_does_not_act_twice(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        a = await _join(stub, "h1", request_id="req-1", wait_for_revision=True)
        b = await _join(stub, "h1", request_id="req-1", wait_for_revision=True)
        assert (a.node.id, a.node.lease_id) == (b.node.id, b.node.lease_id)
        cluster = await stub.GetCluster(pb.GetClusterRequest())
        assert cluster.head_revision == a.revision  # one event only
        c = await _join(stub, "h1", request_id="req-2")
        assert c.node.lease_id != a.node.lease_id


async def test_heartbeats_report_load_and_keepalive_answers_each(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h2")
        load = node_pb2.Load(load1=0.5, load5=0.25, load15=0.125, cpu_count=8, session_count=3)
        hb = await stub.Heartbeat(pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id, load=load))
        assert hb.lease_expire_time.ToDatetime() > r.node.last_seen_time.ToDatetime()
        node = (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node
        assert node.load == load

        async def beats():
            for i in range(5):
                yield pb.KeepAliveRequest(
                    heartbeat=pb.HeartbeatRequest(
                        node_id=r.node.id, lease_id=r.node.lease_id, load=node_pb2.Load(session_count=i)
                    )
                )

        answers = [a async for a in stub.KeepAlive(beats())]
        assert len(answers) == 5
        assert (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node.load.session_count == 4


async def test_keepalive_ends_with_the_error_of_a_stale_lease(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h3")

        async def beats():
            yield pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id + 99))

        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [a async for a in stub.KeepAlive(beats())]
        assert error_reason(info.value)[0] == "STALE_LEASE"


async def test_leave_sets_offline_and_heartbeats_then_say_join_again(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h4")
        await stub.LeaveNode(pb.LeaveNodeRequest(node_id=r.node.id, lease_id=r.node.lease_id))
        node = (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node
        assert (node.state, node.state_reason) == (OFFLINE, "LEFT")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Heartbeat(pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id))
        assert error_reason(info.value)[0] == "LEASE_EXPIRED"


async def test_leave_with_delete_node_on_exit_removes_the_row_through_deleting(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h5", wait_for_revision=True)
        left = await stub.LeaveNode(
            pb.LeaveNodeRequest(node_id=r.node.id, lease_id=r.node.lease_id, delete_node=True, wait_for_revision=True)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.WatchEvents(pb.WatchEventsRequest(start_revision=r.revision))
        msg = await watch.read()
        kinds = [e.kind.rsplit(".", 1)[1] for e in msg.events.events]
        if len(kinds) < 2:
            kinds += [e.kind.rsplit(".", 1)[1] for e in (await watch.read()).events.events]
        watch.cancel()
        assert kinds == ["NodeStateChanged", "NodeDeleted"]
        assert left.revision == r.revision + 2


async def test_delete_refuses_an_online_node_with_sessions_unless_forced(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h6", load=node_pb2.Load(session_count=2))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteNode(pb.DeleteNodeRequest(node_id=r.node.id))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        reason, md = error_reason(info.value)
        assert reason == "NODE_HAS_SESSIONS" and md["sessions"] == "2"
        assert (await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))).node.state == ONLINE
        await stub.DeleteNode(pb.DeleteNodeRequest(node_id=r.node.id, force=True))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetNode(pb.GetNodeRequest(node_id=r.node.id))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteNode(pb.DeleteNodeRequest(node_id=r.node.id))
        assert error_reason(info.value) == ("NODE_NOT_FOUND", {"node": str(r.node.id)})


async def test_set_node_mode_drains_and_undrains(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        r = await _join(stub, "h7")
        d = await stub.SetNodeMode(
            pb.SetNodeModeRequest(node_id=r.node.id, mode=node_pb2.Node.MODE_DRAINING, wait_for_revision=True)
        )
        assert d.node.mode == node_pb2.Node.MODE_DRAINING and d.revision > 0
        same = await stub.SetNodeMode(
            pb.SetNodeModeRequest(node_id=r.node.id, mode=node_pb2.Node.MODE_DRAINING, wait_for_revision=True)
        )
        assert same.revision == 0  # nothing changed, no event
        a = await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=r.node.id, mode=node_pb2.Node.MODE_ACTIVE))
        assert a.node.mode == node_pb2.Node.MODE_ACTIVE
        # A re-join keeps the operator's drain.
        await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=r.node.id, mode=node_pb2.Node.MODE_DRAINING))
        assert (await _join(stub, "h7")).node.mode == node_pb2.Node.MODE_DRAINING


async def test_list_nodes_shows_online_first_then_by_id_and_pages(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        joined = [await _join(stub, f"n{i}") for i in range(7)]
        for r in joined[:3]:
            await stub.LeaveNode(pb.LeaveNodeRequest(node_id=r.node.id, lease_id=r.node.lease_id))
        ids, token, revisions = [], "", set()
        while True:
            page = await stub.ListNodes(pb.ListNodesRequest(page_size=2, page_token=token))
            ids += [n.id for n in page.nodes]
            revisions.add(page.revision)
            token = page.next_page_token
            if not token:
                break
        expected = [r.node.id for r in joined[3:]] + [r.node.id for r in joined[:3]]
        assert ids == expected
        assert revisions == {10}  # 7 joins + 3 leaves


async def test_reset_cluster_removes_every_node_and_redefines_the_cluster(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        before = (await stub.GetCluster(pb.GetClusterRequest())).cluster
        for i in range(3):
            await _join(stub, f"r{i}")
        reset = await stub.ResetCluster(pb.ResetClusterRequest(wait_for_revision=True))
        assert reset.deleted_nodes == 3
        assert reset.cluster.epoch == before.epoch + 1 and reset.cluster.uid != before.uid
        listed = await stub.ListNodes(pb.ListNodesRequest())
        assert list(listed.nodes) == [] and listed.revision == reset.revision


async def test_node_status_and_loads(registry_server) -> None:
    async with registry(registry_server.address) as stub:
        a = await _join(stub, "s1", load=node_pb2.Load(session_count=4, cpu_count=2))
        b = await _join(stub, "s2")
        await stub.LeaveNode(pb.LeaveNodeRequest(node_id=b.node.id, lease_id=b.node.lease_id))
        status = await stub.GetNodeStatus(pb.GetNodeStatusRequest(node_id=a.node.id))
        assert status.session_count == 4
        assert [n.id for n in status.online_nodes] == [a.node.id]
        loads = await stub.ListNodeLoads(pb.ListNodeLoadsRequest(page_size=1))
        assert [x.node_id for x in loads.loads] == [a.node.id] and loads.loads[0].load.cpu_count == 2
        rest = await stub.ListNodeLoads(pb.ListNodeLoadsRequest(page_token=loads.next_page_token))
        assert [x.node_id for x in rest.loads] == [b.node.id] and not rest.next_page_token


async def test_node_limit_holds_under_concurrent_joins(database_url: str) -> None:
    server = ServerProcess(database_url, env={"MUSTER_MAX_NODES": "3"}).start()
    try:
        async with registry(server.address) as stub:
            results = await asyncio.gather(*(_join(stub, f"lic{i}") for i in range(12)), return_exceptions=True)
            ok = [r for r in results if not isinstance(r, Exception)]
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(ok) == 3 and len(refused) == 9
            assert all(error_reason(e)[0] == "NODE_LIMIT_REACHED" for e in refused)
            nodes = (await stub.ListNodes(pb.ListNodesRequest())).nodes
            assert sorted(n.state for n in nodes) == [ONLINE] * 3 + [INVALID_LICENSE] * 9
            # Refused nodes do not count: when one leaves, a refused one may join.
            await stub.LeaveNode(pb.LeaveNodeRequest(node_id=ok[0].node.id, lease_id=ok[0].node.lease_id))
            again = await _join(stub, "lic11" if ok[0].node.address != "lic11:8787" else "lic10")
            assert again.node.state == ONLINE
    finally:
        server.stop()


async def test_reflection_lists_the_services_and_health_answers_per_service(registry_server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(registry_server.address) as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = set()
        async for resp in call:
            services = {s.name for s in resp.list_services_response.service}
            break
        call.cancel()
        assert {"muster.api.registry.v1.RegistryService", "grpc.health.v1.Health"} <= services
        health = health_pb2_grpc.HealthStub(ch)
        for name in ["", "muster.api.registry.v1.RegistryService"]:
            r = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_join_racing_a_delete_is_aborted_and_does_not_revive_the_row(registry_server, database_url) -> None:
    import asyncpg

    async with registry(registry_server.address) as stub:
        r = await _join(stub, "racing")
        con = await asyncpg.connect(database_url)
        try:
            # The first of the two deletion transactions has committed: the row is DELETING.
            await con.execute("UPDATE registry.nodes SET state = 4 WHERE id = $1", r.node.id)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _join(stub, "racing")
            assert info.value.code() == grpc.StatusCode.ABORTED
            assert error_reason(info.value) == ("NODE_DELETING", {"node": str(r.node.id)})
            assert await con.fetchval("SELECT state FROM registry.nodes WHERE id = $1", r.node.id) == 4
        finally:
            await con.close()
