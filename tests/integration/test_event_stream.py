"""The event stream: gap-free ordered revisions under concurrent writers on several replicas."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from harness import Recorder, ServerProcess, apply_event, comparable, registry, servers, wait_for

from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb

DRAINING, ACTIVE = node_pb2.Node.MODE_DRAINING, node_pb2.Node.MODE_ACTIVE


async def _final_nodes(address: str) -> tuple[int, dict[int, node_pb2.Node]]:
    async with registry(address) as stub:
        page = await stub.ListNodes(pb.ListNodesRequest(page_size=10_000))
        return page.revision, {n.id: n for n in page.nodes}


async def _client(addresses: list[str], name: str, deadline: float, rng: random.Random, acked: list) -> None:
    """Joins, heartbeats, drains, undrains, deletes and re-joins its own nodes until the deadline.

    Moves to another replica when its replica dies (UNAVAILABLE/CANCELLED) and records every
    acknowledged change.
    """
    i = 0
    while time.monotonic() < deadline:
        address = addresses[i % len(addresses)]
        try:
            async with registry(address) as stub:
                while time.monotonic() < deadline:
                    r = await stub.JoinNode(pb.JoinNodeRequest(host=f"{name}-{rng.randrange(3)}", port=8787))
                    acked.append(("join", r.node.id))
                    for _ in range(rng.randrange(1, 4)):
                        await stub.Heartbeat(pb.HeartbeatRequest(node_id=r.node.id, lease_id=r.node.lease_id))
                    mode = rng.choice([DRAINING, ACTIVE])
                    await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=r.node.id, mode=mode))
                    acked.append(("mode", r.node.id))
                    if rng.random() < 0.3:
                        await stub.DeleteNode(pb.DeleteNodeRequest(node_id=r.node.id, force=True))
                        acked.append(("delete", r.node.id))
        except grpc.aio.AioRpcError as err:
            if err.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.ABORTED,  # a join racing another client's delete of the same address
            ):
                raise
            i += 1
            await asyncio.sleep(0.02)


@pytest.mark.timeout(180)
async def test_concurrent_writers_on_two_replicas_give_a_gap_free_ordered_stream(database_url: str) -> None:
    with servers(database_url, 3) as (a, b, c):
        stop = asyncio.Event()
        watcher = Recorder([c.address])
        watching = asyncio.create_task(watcher.run(stop))
        await wait_for(lambda: watcher.resyncs, what="the first snapshot")

        deadline = time.monotonic() + 6
        acked: list = []
        clients = [
            asyncio.create_task(
                _client(
                    [a.address, b.address] if i % 2 else [b.address, a.address],
                    f"c{i}",
                    deadline,
                    random.Random(i),
                    acked,
                )
            )
            for i in range(16)
        ]
        await asyncio.sleep(3)
        b.kill()  # mid-flight: its committed but un-numbered events are numbered by A's fallback poll
        await asyncio.gather(*clients)

        head, final = await _final_nodes(a.address)
        await wait_for(lambda: watcher.through >= head, timeout=20, what="the watcher to reach the head")
        stop.set()
        await watching

    assert len(acked) > 200, "the load did not run"
    assert watcher.resyncs[0].revision == 0
    assert watcher.revisions == list(range(1, head + 1)), "revisions must be gap-free, in order, exactly once"
    assert {k: comparable(v) for k, v in watcher.state.items()} == {k: comparable(v) for k, v in final.items()}
    assert watcher.connections == 1  # the watcher's replica never went away


async def test_events_written_on_one_replica_reach_a_watcher_on_another(database_url: str) -> None:
    with servers(database_url, 2) as (a, b):
        async with registry(a.address) as sa, registry(b.address) as sb:
            call = sb.WatchEvents(pb.WatchEventsRequest(start_revision=0))
            assert (await call.read()).WhichOneof("kind") == "resync"
            started = time.monotonic()
            r = await sa.JoinNode(pb.JoinNodeRequest(host="across", port=1, wait_for_revision=True))
            msg = await call.read()
            latency = time.monotonic() - started
            call.cancel()
            assert [e.revision for e in msg.events.events] == [r.revision]
            assert msg.through_revision == r.revision
            assert latency < 0.5, f"delivery took {latency:.3f}s: the notification did not wake replica B"


async def test_a_watcher_that_reconnects_from_its_revision_misses_nothing(database_url: str) -> None:
    with servers(database_url, 2) as (a, b):
        async with registry(a.address) as sa, registry(b.address) as sb:
            r = await sa.JoinNode(pb.JoinNodeRequest(host="re", port=1))
            call = sb.WatchEvents(pb.WatchEventsRequest(start_revision=0))
            snap = (await call.read()).resync
            call.cancel()
            revisions = []
            for mode in [DRAINING, ACTIVE] * 10:  # written while nobody watches
                await sa.SetNodeMode(pb.SetNodeModeRequest(node_id=r.node.id, mode=mode))
            call = sa.WatchEvents(pb.WatchEventsRequest(start_revision=snap.revision))
            async with asyncio.timeout(10):
                async for msg in call:
                    revisions += [e.revision for e in msg.events.events]
                    if len(revisions) >= 20:
                        break
            call.cancel()
            assert revisions == list(range(snap.revision + 1, snap.revision + 21))


async def test_a_compacted_revision_gets_a_resync_equal_to_list_nodes_then_every_later_event(
    database_url: str,
) -> None:
    env = {"MUSTER_EVENT_RETENTION": "0s", "MUSTER_EVENT_RETENTION_EVENTS": "5", "MUSTER_COMPACTION_INTERVAL": "1s"}
    with servers(database_url, 1, env=env) as (a,):
        async with registry(a.address) as stub:
            joined = [await stub.JoinNode(pb.JoinNodeRequest(host=f"cmp{i}", port=1)) for i in range(10)]
            await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=joined[0].node.id, mode=DRAINING))

            async def compacted() -> bool:
                call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=1))
                first = await call.read()
                call.cancel()
                return first.WhichOneof("kind") == "resync"

            await wait_for(compacted, timeout=15, what="compaction")
            listed = await stub.ListNodes(pb.ListNodesRequest())
            call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=1))
            first = await call.read()
            assert first.WhichOneof("kind") == "resync"
            assert first.resync.revision == listed.revision == first.through_revision
            assert [comparable(n) for n in first.resync.nodes] == [comparable(n) for n in listed.nodes]
            later = await stub.SetNodeMode(
                pb.SetNodeModeRequest(node_id=joined[1].node.id, mode=DRAINING, wait_for_revision=True)
            )
            nxt = await call.read()
            call.cancel()
            assert [e.revision for e in nxt.events.events] == [listed.revision + 1] == [later.revision]


async def test_idle_streams_get_progress_marks_with_the_head(registry_server: ServerProcess) -> None:
    async with registry(registry_server.address) as stub:
        r = await stub.JoinNode(pb.JoinNodeRequest(host="p", port=1, wait_for_revision=True))
        call = stub.WatchEvents(
            pb.WatchEventsRequest(
                start_revision=r.revision,
                kinds=["muster.api.registry.v1.NodeModeChanged"],
                progress_interval=duration_pb2.Duration(nanos=200_000_000),
            )
        )
        # A filtered-out change advances through_revision without an event.
        await stub.LeaveNode(pb.LeaveNodeRequest(node_id=r.node.id, lease_id=r.node.lease_id, wait_for_revision=True))
        marks = []
        started = time.monotonic()
        async with asyncio.timeout(5):
            async for msg in call:
                assert msg.WhichOneof("kind") == "progress"
                marks.append(msg)
                if len(marks) == 3:
                    break
        call.cancel()
        assert time.monotonic() - started < 2
        assert marks[-1].through_revision == marks[-1].progress.head_revision == r.revision + 1


async def test_a_consumer_too_slow_is_cut_with_a_retry_hint_and_resumes_losing_nothing(database_url: str) -> None:
    env = {"MUSTER_STREAM_MAX_LAG": "20", "MUSTER_STREAM_WRITE_TIMEOUT": "1s"}
    with servers(database_url, 1, env=env) as (a,):
        async with registry(a.address) as stub:
            # Each event carries the node with ~15 KB of labels: ~20 MB in all, more than gRPC's
            # flow-control windows hold, so the server's writes block once the watcher stops reading.
            labels = {f"pad{i}": "x" * 250 for i in range(60)}
            await stub.JoinNode(pb.JoinNodeRequest(host="slow", port=1, labels=labels))
            call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=0))
            through = (await call.read()).through_revision
            await asyncio.gather(
                *(  # re-joins: each NodeJoined carries the whole node with its labels
                    stub.JoinNode(pb.JoinNodeRequest(host="slow", port=1, labels=labels)) for i in range(1400)
                )
            )
            seen: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async with asyncio.timeout(30):
                    while (msg := await call.read()) is not grpc.aio.EOF:
                        seen += [e.revision for e in msg.events.events]
                        through = msg.through_revision
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = dict(info.value.trailing_metadata())["grpc-status-details-bin"]
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status_pb2.Status.FromString(details).details)
            assert retry.retry_delay.ToMilliseconds() > 0
            head = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
            call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=through))
            async with asyncio.timeout(10):
                async for msg in call:
                    seen += [e.revision for e in msg.events.events]
                    if msg.through_revision >= head:
                        break
            call.cancel()
            assert seen == list(range(2, head + 1))  # every change after the join, once, in order


async def test_sigterm_ends_watch_streams_with_unavailable_and_exits_within_the_grace(database_url: str) -> None:
    server = ServerProcess(database_url).start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
            call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=0))
            await call.read()
            started = time.monotonic()
            server.signal(15)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < 1.5
        assert server.wait(10) == 0
        assert time.monotonic() - started < 3  # grace period 2 s
    finally:
        server.stop()


def test_apply_event_is_idempotent_for_node_events() -> None:
    # Events carry the resulting state, so applying one twice is harmless.
    from muster.api.events.v1 import event_pb2

    node = node_pb2.Node(id=3, address="h:1", state=node_pb2.Node.STATE_ONLINE)
    ev = event_pb2.Event(revision=1, kind="muster.api.registry.v1.NodeJoined")
    ev.payload.Pack(node_pb2.NodeJoined(node=node))
    state: dict = {}
    apply_event(state, ev)
    apply_event(state, ev)
    assert state == {3: node}
