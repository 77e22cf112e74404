"""muster.client against real replicas: the registry API, errors by type, retries, watching, the view."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta

import pytest
from harness import ServerProcess, servers

from muster.client import (
    Cluster,
    ConnectionState,
    Event,
    Health,
    Load,
    NodeMode,
    NodeState,
    Progress,
    Resync,
)
from muster.client import errors as E


async def test_the_registry_api_through_the_client(registry_server: ServerProcess) -> None:
    async with Cluster.connect(registry_server.address) as cluster:
        lease = await cluster.join_node("app1.example", 8787, labels={"zone": "a"}, wait_for_revision=True)
        assert lease.node.state is NodeState.ONLINE and lease.heartbeat_interval == timedelta(milliseconds=200)
        assert lease.revision > 0
        hb = await cluster.heartbeat(lease, Load(load1=0.5, cpu_count=4, session_count=2))
        assert hb.lease_expire_time is not None and hb.server_time is not None
        ka = cluster.keep_alive(lease)
        for n in range(3):
            await ka.beat(Load(session_count=n))
        await ka.close()
        node = await cluster.get_node(lease.node_id)
        assert node.load.session_count == 2 and node.labels == {"zone": "a"} and node.health is Health.OK
        drained = await cluster.drain_node(lease.node_id)
        assert drained.mode is NodeMode.DRAINING
        listed = await cluster.list_nodes(page_size=1)
        assert [n.id for n in listed.nodes] == [lease.node_id] and listed.revision >= lease.revision
        status = await cluster.get_node_status(lease.node_id)
        assert status.session_count == 2 and [n.id for n in status.online_nodes] == [lease.node_id]
        loads = await cluster.list_node_loads()
        assert loads[0].load.cpu_count == 0  # the keep-alive beats carried no cpu count
        info = await cluster.get_cluster()
        assert info.node_count == 1 and info.lease_ttl == timedelta(milliseconds=1500)
        await cluster.leave_node(lease)
        assert (await cluster.get_node(lease.node_id)).state is NodeState.OFFLINE
        _, removed = await cluster.reset_cluster()
        assert removed == 1


async def test_errors_come_out_as_types_carrying_code_and_reason(registry_server: ServerProcess) -> None:
    async with Cluster.connect(registry_server.address) as cluster:
        with pytest.raises(E.NodeNotFoundError) as nf:
            await cluster.get_node(12345)
        assert nf.value.reason == "NODE_NOT_FOUND" and nf.value.metadata["node"] == "12345"
        with pytest.raises(E.InvalidArgumentError) as bad:
            await cluster.join_node("h", 70000)
        assert bad.value.field == "port" and bad.value.field_violations["port"]
        first = await cluster.join_node("h", 1)
        await cluster.join_node("h", 1)
        with pytest.raises(E.StaleLeaseError):
            await cluster.heartbeat(first)
        second = await cluster.join_node("h", 1)
        await cluster.leave_node(second)
        with pytest.raises(E.LeaseExpiredError):
            await cluster.heartbeat(second)
        with pytest.raises(E.FutureRevisionError):
            async with cluster.watch(10_000) as events:
                await events.__anext__()
        assert isinstance(nf.value, E.MusterError) and nf.value.__cause__ is not None


async def test_idempotent_calls_fail_over_to_another_replica(database_url: str) -> None:
    with servers(database_url, 2) as (a, b):
        async with Cluster.connect([a.address, b.address]) as cluster:
            lease = await cluster.join_node("fo", 1)
            victim = a if cluster.registry_address == a.address else b
            victim.kill()
            for _ in range(5):  # every call succeeds: the client moves to the live replica
                await cluster.heartbeat(lease)
                await cluster.get_node(lease.node_id)
            assert cluster.registry_address != victim.address


async def test_a_watch_resumes_on_another_replica_and_hands_out_each_event_once(database_url: str) -> None:
    with servers(database_url, 3) as (a, b, writer):
        async with Cluster.connect([a.address, b.address]) as cluster, Cluster.connect(writer.address) as w:
            nodes = [await w.join_node(f"wn{i}", 1) for i in range(3)]
            seen: list[int] = []
            states: list[ConnectionState] = []
            async with cluster.watch(0) as events:
                events.on_state_change(states.append)
                first = await events.__anext__()
                assert isinstance(first, Resync) and len(first.nodes) == 3

                async def produce() -> None:
                    for i in range(40):
                        await w.set_node_mode(nodes[i % 3].node_id, [NodeMode.DRAINING, NodeMode.ACTIVE][i // 3 % 2])
                        if i == 15:
                            (a if cluster.registry_address == a.address else b).signal(signal.SIGKILL)
                        await asyncio.sleep(0.01)

                producer = asyncio.create_task(produce())
                head = None
                async with asyncio.timeout(30):
                    async for item in events:
                        assert isinstance(item, Event)
                        seen.append(item.revision)
                        if producer.done() and head is None:
                            head = (await w.get_cluster()).head_revision
                        if head is not None and item.revision >= head:
                            break
                await producer
            assert seen == list(range(first.revision + 1, head + 1))
            assert events.reconnects >= 1
            assert ConnectionState.IN_JEOPARDY in states and states[-1] is ConnectionState.CONNECTED


async def test_progress_marks_are_delivered_when_asked(registry_server: ServerProcess) -> None:
    async with Cluster.connect(registry_server.address) as cluster:
        from muster.client import Watch

        async with Watch(cluster, start_revision=0, progress=True, progress_interval=timedelta(milliseconds=200)) as w:
            items = [await w.__anext__() for _ in range(3)]
        assert isinstance(items[0], Resync) and all(isinstance(i, Progress) for i in items[1:])


async def test_the_view_converges_and_reports_every_change(database_url: str) -> None:
    with servers(database_url, 2) as (a, b):
        async with Cluster.connect([a.address, b.address]) as cluster, Cluster.connect(b.address) as w:
            before = await w.join_node("v0", 1)
            changes = []
            async with cluster.view() as view:
                view.on_change(changes.append)
                assert set(view.nodes) == {before.node_id}
                added = await w.join_node("v1", 1)
                await w.drain_node(added.node_id)
                await w.delete_node(before.node_id, force=True)
                await view.wait_until(
                    lambda nodes: set(nodes) == {added.node_id} and nodes[added.node_id].mode is NodeMode.DRAINING,
                    timeout=10,
                )
                expected = {n.id: n for n in (await w.list_nodes()).nodes}
                assert dict(view.nodes) == expected
            kinds = [(c.before is None, c.after is None) for c in changes]
            assert (True, False) in kinds and (False, True) in kinds  # an addition and a removal


SYNC_SCRIPT = """
import sys
from muster.client import Resync, SyncCluster
from muster.client import errors as E
with SyncCluster.connect(sys.argv[1]) as cluster:
    lease = cluster.join_node("sync", 1)
    assert cluster.get_node(lease.node_id).address == "sync:1"
    with cluster.view() as view:
        assert lease.node_id in view.nodes
    watch = cluster.watch(0)
    assert isinstance(next(iter(watch)), Resync)
    watch.close()
    try:
        cluster.get_node(999)
    except E.NodeNotFoundError:
        print("sync ok")
"""


async def test_the_sync_facade_in_a_plain_program(registry_server: ServerProcess) -> None:
    # Its own process: an application without asyncio, and one event loop per process for grpc.aio.
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SYNC_SCRIPT,
        registry_server.address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().strip() == "sync ok"
