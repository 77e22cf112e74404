"""The registry's batched hot paths under real concurrency: mode changes in group commits on two
replicas, several heartbeats per KeepAlive message, and ListNodes answered from each replica's node
view at an exact revision. Real server processes and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import asyncpg
import grpc
import pytest
from google.protobuf import any_pb2
from harness import ServerProcess, apply_event, comparable, error_reason, registry

from muster.api.errors.v1 import error_reason_pb2
from muster.api.events.v1 import event_pb2
from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

SLOW_LEASES = {"MUSTER_CHECK_IN_WINDOW": "20s", "MUSTER_LEASE_TTL": "60s"}
ACTIVE, DRAINING = node_pb2.Node.MODE_ACTIVE, node_pb2.Node.MODE_DRAINING
MODE_CHANGED = "muster.api.registry.v1.NodeModeChanged"


@pytest.fixture
def replicas(database_url: str) -> Iterator[list[ServerProcess]]:
    procs: list[ServerProcess] = []
    try:
        for _ in range(2):
            procs.append(ServerProcess(database_url, env=SLOW_LEASES).start())
        yield procs
    finally:
        for p in procs:
            p.stop()


async def _join_many(stub, count: int, prefix: str) -> list[node_pb2.Node]:  # noqa: ANN001
    joined = await asyncio.gather(
        *(stub.JoinNode(pb.JoinNodeRequest(host=f"{prefix}{i}.test", port=8787)) for i in range(count))
    )
    return [r.node for r in joined]


async def _events(url: str, through: int | None = None) -> list[event_pb2.Event]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT revision, kind, node_id, payload FROM core.events WHERE revision IS NOT NULL"
            " AND ($1::bigint IS NULL OR revision <= $1) ORDER BY revision",
            through,
        )
    finally:
        await con.close()
    return [
        event_pb2.Event(
            revision=r["revision"],
            kind=r["kind"],
            node_id=r["node_id"],
            payload=any_pb2.Any(type_url="type.googleapis.com/" + r["kind"], value=r["payload"]),
        )
        for r in rows
    ]


async def test_mode_changes_from_many_clients_on_two_replicas_have_one_event_each(
    replicas: list[ServerProcess], database_url: str
) -> None:
    nodes_per_run, clients, changes_each = 12, 32, 15
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        nodes = [n.id for n in await _join_many(a, nodes_per_run, "mode")]
        answers: list[tuple[int, int, int]] = []  # node, mode, revision (0: no change)

        async def client(i: int) -> None:
            stub = (a, b)[i % 2]
            rnd = random.Random(i)
            for _ in range(changes_each):
                node_id, mode = rnd.choice(nodes), rnd.choice((ACTIVE, DRAINING))
                resp = await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node_id, mode=mode, wait_for_revision=True))
                assert resp.node.id == node_id and resp.node.mode == mode
                answers.append((node_id, mode, resp.revision))

        await asyncio.gather(*(client(i) for i in range(clients)))
        # A missing node is its own NOT_FOUND, whoever shares its batch.
        missing, present = await asyncio.gather(
            a.SetNodeMode(pb.SetNodeModeRequest(node_id=999_999, mode=DRAINING)),
            a.SetNodeMode(pb.SetNodeModeRequest(node_id=nodes[0], mode=DRAINING)),
            return_exceptions=True,
        )
        assert isinstance(missing, grpc.aio.AioRpcError) and missing.code() == grpc.StatusCode.NOT_FOUND
        assert error_reason(missing)[0] == "NODE_NOT_FOUND"
        assert not isinstance(present, BaseException)
        answers.append((nodes[0], DRAINING, 0))  # revision not asked for
        listed = {n.id: n for n in (await b.ListNodes(pb.ListNodesRequest(page_size=1000))).nodes}

    events = await _events(database_url)
    assert [e.revision for e in events] == list(range(1, len(events) + 1)), "revisions are gap-free"
    changed = [e for e in events if e.kind == MODE_CHANGED]
    revisions = {rev for _, _, rev in answers if rev}
    assert len(revisions) == sum(1 for *_, rev in answers if rev), "one revision per effective change"
    by_revision = {e.revision: e for e in changed}
    # Every change answered with a revision has exactly that event, and there is no other event.
    late_change = 1 if len(changed) == len(revisions) + 1 else 0  # the last, unasked DRAINING of nodes[0]
    assert set(by_revision) - revisions == ({changed[-1].revision} if late_change else set())
    for node_id, mode, rev in answers:
        if rev:
            payload = node_pb2.NodeModeChanged()
            by_revision[rev].payload.Unpack(payload)
            assert (payload.node_id, payload.mode) == (node_id, mode)
    # Each node's events alternate (a no-op has none), and the final mode is the last event's.
    con = await asyncpg.connect(database_url)
    try:
        stored = {r["id"]: r["mode"] for r in await con.fetch("SELECT id, mode FROM registry.nodes")}
    finally:
        await con.close()
    for node_id in nodes:
        modes = []
        for e in changed:
            if e.node_id == node_id:
                payload = node_pb2.NodeModeChanged()
                e.payload.Unpack(payload)
                modes.append(payload.mode)
        previous = [ACTIVE, *modes[:-1]]
        assert all(m != p for m, p in zip(modes, previous, strict=True)), f"node {node_id}: {modes}"
        assert stored[node_id] == (modes[-1] if modes else ACTIVE)
        # Read-your-writes across replicas: B's list, after A's last answer, shows the final mode.
        assert listed[node_id].mode == stored[node_id]


async def test_keepalive_message_with_several_heartbeats_fails_only_the_bad_one(
    replicas: list[ServerProcess], database_url: str
) -> None:
    async with registry(replicas[0].address) as stub:
        nodes = await _join_many(stub, 6, "many")
        load = node_pb2.Load(load1=0.5, cpu_count=2, session_count=7)
        beats = [pb.HeartbeatRequest(node_id=n.id, lease_id=n.lease_id, load=load) for n in nodes]
        beats[2].lease_id += 1000  # a stale incarnation
        beats[4].node_id = 999_999  # no such node
        beats.append(pb.HeartbeatRequest(node_id=0, lease_id=1))  # invalid input

        async def requests():
            yield pb.KeepAliveRequest(heartbeats=beats)
            yield pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=nodes[0].id, lease_id=nodes[0].lease_id))

        answers = [a async for a in stub.KeepAlive(requests())]
    assert len(answers) == 2, "the stream goes on after a message with failed heartbeats"
    first = answers[0]
    assert first.HasField("heartbeat") and first.heartbeat.lease_expire_time.seconds > 0
    failed = {e.index: e for e in first.errors}
    assert sorted(failed) == [2, 4, 6]
    assert failed[2].code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert failed[2].reason == error_reason_pb2.ERROR_REASON_STALE_LEASE
    assert failed[4].code == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed[6].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed[6].metadata["field"] == "heartbeats[6].node_id"
    con = await asyncpg.connect(database_url)
    try:
        rows = {r["id"]: r for r in await con.fetch("SELECT id, session_count FROM registry.nodes")}
    finally:
        await con.close()
    for i, n in enumerate(nodes):
        # 2: stale, 4: its id replaced, 0: renewed again after, without a load.
        assert rows[n.id]["session_count"] == (0 if i in (0, 2, 4) else 7), i


async def test_list_nodes_at_a_revision_is_the_database_at_that_revision(
    replicas: list[ServerProcess], database_url: str
) -> None:
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        seed = await _join_many(a, 10, "seed")
        stop = asyncio.Event()

        async def joins() -> None:
            i = 0
            while not stop.is_set():
                await (a, b)[i % 2].JoinNode(pb.JoinNodeRequest(host=f"late{i}.test", port=8787))
                i += 1

        async def modes(k: int) -> None:
            rnd = random.Random(k)
            while not stop.is_set():
                node = rnd.choice(seed)
                await (b, a)[k % 2].SetNodeMode(
                    pb.SetNodeModeRequest(node_id=node.id, mode=rnd.choice((ACTIVE, DRAINING)))
                )

        async def leaves() -> None:
            for node in seed[:3]:
                await asyncio.sleep(0.2)
                await a.LeaveNode(pb.LeaveNodeRequest(node_id=node.id, lease_id=node.lease_id))

        writers = [asyncio.create_task(joins()), asyncio.create_task(leaves())]
        writers += [asyncio.create_task(modes(k)) for k in range(6)]
        listings: list[pb.ListNodesResponse] = []
        try:
            for i in range(30):
                listings.append(await (a, b)[i % 2].ListNodes(pb.ListNodesRequest(page_size=10_000)))
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await asyncio.gather(*writers)

    events = await _events(database_url)
    assert len({r.revision for r in listings}) > 3, "the listings saw the cluster move"
    state: dict[int, node_pb2.Node] = {}
    at = 0
    for listing in sorted(listings, key=lambda r: r.revision):
        for ev in events[at : listing.revision]:
            apply_event(state, ev)
        at = listing.revision
        expected = sorted(state.values(), key=lambda n: (n.state != node_pb2.Node.STATE_ONLINE, n.id))
        assert [comparable(n) for n in listing.nodes] == [comparable(n) for n in expected], listing.revision


async def test_list_nodes_pages_carry_their_revision_and_follow_the_order(replicas: list[ServerProcess]) -> None:
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        joined = await _join_many(a, 25, "page")
        await a.LeaveNode(pb.LeaveNodeRequest(node_id=joined[3].id, lease_id=joined[3].lease_id))
        seen: list[node_pb2.Node] = []
        token, revisions = "", []
        while True:
            # Pages alternate between replicas: the token's revision holds on either.
            resp = await (a, b)[len(revisions) % 2].ListNodes(pb.ListNodesRequest(page_size=7, page_token=token))
            seen += resp.nodes
            revisions.append(resp.revision)
            token = resp.next_page_token
            if not token:
                break
        assert len(revisions) == 4 and revisions == sorted(revisions)
        assert [n.id for n in seen] == sorted(n.id for n in joined if n.id != joined[3].id) + [joined[3].id]
        assert seen[-1].state == node_pb2.Node.STATE_OFFLINE
        status = await b.GetNodeStatus(pb.GetNodeStatusRequest(node_id=joined[0].id))
        assert status.node.id == joined[0].id and len(status.online_nodes) == 24
        assert status.revision >= revisions[-1]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await b.GetNodeStatus(pb.GetNodeStatusRequest(node_id=999_999))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
