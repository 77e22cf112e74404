"""The registry's batched hot paths under real concurrency: mode changes in group commits on two
replicas, several heartbeats per KeepAlive message, and ListNodes answered from each replica's node
view at an exact revision. Real server processes and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Iterator

import asyncpg
import grpc
import pytest
from google.protobuf import any_pb2
from harness import ServerProcess, apply_event, comparable, error_reason, registry, wait_for

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


async def _db_rows(url: str, sql: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return await con.fetch(sql)
    finally:
        await con.close()


async def test_no_acknowledged_heartbeat_is_lost_with_batches_on_two_replicas(
    replicas: list[ServerProcess], database_url: str
) -> None:
    """Streams on both replicas send messages of several heartbeats (and single ones) as fast as
    they are answered; every node's stored last_seen_time must be at least the server time of
    the last answer its heartbeat got, and its stored load the last one acknowledged."""
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        nodes = await _join_many(a, 60, "beat")
        acked: dict[int, tuple[float, int]] = {}  # node -> (server time of its last answer, session count sent)
        rounds = 25

        async def stream(k: int) -> None:
            mine = nodes[k::4]
            stub = (a, b)[k % 2]
            sent: list[list[tuple[int, int]]] = []

            async def requests():
                for r in range(rounds):
                    batch = [(n.id, r * 100 + k) for n in mine]
                    sent.append(batch)
                    beats = [
                        pb.HeartbeatRequest(
                            node_id=n.id, lease_id=n.lease_id, load=node_pb2.Load(session_count=r * 100 + k)
                        )
                        for n in mine
                    ]
                    if k == 3 and r % 5 == 0:  # an old-style single heartbeat now and then
                        sent[-1] = batch[:1]
                        yield pb.KeepAliveRequest(heartbeat=beats[0])
                    else:
                        yield pb.KeepAliveRequest(heartbeats=beats)
                    await asyncio.sleep(0)

            i = 0
            async for resp in stub.KeepAlive(requests()):
                assert not resp.errors, resp.errors
                at = resp.heartbeat.server_time.ToDatetime().timestamp()
                for node_id, sessions in sent[i]:
                    acked[node_id] = (at, sessions)
                i += 1
            assert i == rounds

        await asyncio.gather(*(stream(k) for k in range(4)))
    rows = await _db_rows(
        database_url, "SELECT id, extract(epoch FROM last_seen_time) AS seen, session_count FROM registry.nodes"
    )
    stored = {r["id"]: (float(r["seen"]), r["session_count"]) for r in rows}
    assert set(acked) == {n.id for n in nodes}
    for node_id, (at, sessions) in acked.items():
        assert stored[node_id][0] >= at - 1e-3, f"node {node_id}: acknowledged at {at}, stored {stored[node_id][0]}"
        assert stored[node_id][1] == sessions, node_id


async def test_heartbeats_are_hot_updates(replicas: list[ServerProcess], database_url: str) -> None:
    async with registry(replicas[0].address) as stub:
        nodes = await _join_many(stub, 20, "hot")
        before = await _db_rows(
            database_url,
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'registry.nodes'::regclass",
        )

        for _ in range(10):  # one message per call, each answered before the next: 200 renewals
            msg = pb.KeepAliveRequest(
                heartbeats=[pb.HeartbeatRequest(node_id=n.id, lease_id=n.lease_id) for n in nodes]
            )
            answers = [r async for r in stub.KeepAlive(iter([msg]))]
            assert len(answers) == 1 and not answers[0].errors

    async def counted():
        rows = await _db_rows(
            database_url,
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'registry.nodes'::regclass",
        )
        upd = rows[0]["n_tup_upd"] - before[0]["n_tup_upd"]
        hot = rows[0]["n_tup_hot_upd"] - before[0]["n_tup_hot_upd"]
        return (upd, hot) if upd >= 200 else None

    # Statistics reach pg_stat_user_tables within about a second of the server's statements.
    upd, hot = await wait_for(counted, timeout=15, interval=0.2, what="the heartbeats' statistics")
    assert hot >= 0.9 * upd, (upd, hot)


async def test_list_nodes_on_either_replica_sees_a_write_acknowledged_by_the_other(
    replicas: list[ServerProcess],
) -> None:
    """Read-your-writes across replicas, without wait_for_revision: right after one replica
    acknowledges a join, a mode change or a leave, ListNodes and GetNodeStatus on the other one
    show it (while other writers keep both replicas busy)."""
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        stop = asyncio.Event()

        async def noise(k: int) -> None:
            i = 0
            while not stop.is_set():
                await (a, b)[k % 2].JoinNode(pb.JoinNodeRequest(host=f"noise{k}-{i % 20}.test", port=8787))
                i += 1

        background = [asyncio.create_task(noise(k)) for k in range(4)]
        try:
            for i in range(40):
                writer, reader = ((a, b), (b, a))[i % 2]
                node = (await writer.JoinNode(pb.JoinNodeRequest(host=f"ryw{i}.test", port=8787))).node
                listed = {n.id: n for n in (await reader.ListNodes(pb.ListNodesRequest(page_size=10_000))).nodes}
                assert node.id in listed, f"join of {node.id} on one replica not listed by the other"
                await writer.SetNodeMode(pb.SetNodeModeRequest(node_id=node.id, mode=DRAINING))
                status = await reader.GetNodeStatus(pb.GetNodeStatusRequest(node_id=node.id))
                assert status.node.mode == DRAINING
                await writer.LeaveNode(pb.LeaveNodeRequest(node_id=node.id, lease_id=node.lease_id))
                listed = {n.id: n for n in (await reader.ListNodes(pb.ListNodesRequest(page_size=10_000))).nodes}
                assert listed[node.id].state == node_pb2.Node.STATE_OFFLINE
        finally:
            stop.set()
            await asyncio.gather(*background)


async def test_resync_is_the_log_folded_to_its_revision_while_two_replicas_write(
    replicas: list[ServerProcess], database_url: str
) -> None:
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        seed = await _join_many(a, 15, "rs")
        stop = asyncio.Event()

        async def writer(k: int) -> None:
            rnd = random.Random(k)
            i = 0
            while not stop.is_set():
                stub = (a, b)[k % 2]
                if i % 3 == 0:
                    await stub.JoinNode(pb.JoinNodeRequest(host=f"rs-late{k}-{i}.test", port=8787))
                else:
                    await stub.SetNodeMode(
                        pb.SetNodeModeRequest(node_id=rnd.choice(seed).id, mode=rnd.choice((ACTIVE, DRAINING)))
                    )
                i += 1

        writers = [asyncio.create_task(writer(k)) for k in range(4)]
        resyncs: list[pb.Resync] = []
        try:
            for i in range(16):
                stub = (a, b)[i % 2]
                node_ids = [seed[0].id, seed[5].id] if i % 4 == 3 else []
                call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=0, node_ids=node_ids))
                first = await call.read()
                call.cancel()
                assert first.WhichOneof("kind") == "resync"
                resyncs.append((first.resync, set(node_ids)))
                await asyncio.sleep(0.03)
        finally:
            stop.set()
            await asyncio.gather(*writers)

    events = await _events(database_url)
    assert len({r.revision for r, _ in resyncs}) > 3
    for resync, only in resyncs:
        state: dict[int, node_pb2.Node] = {}
        for ev in events[: resync.revision]:
            apply_event(state, ev)
        expected = sorted(
            (n for n in state.values() if not only or n.id in only),
            key=lambda n: (n.state != node_pb2.Node.STATE_ONLINE, n.id),
        )
        assert [comparable(n) for n in resync.nodes] == [comparable(n) for n in expected], resync.revision
        assert resync.cluster_epoch >= 1


async def test_a_cluster_with_several_leases_beats_them_on_one_stream_several_per_message(
    replicas: list[ServerProcess], database_url: str
) -> None:
    from muster.client import Cluster, Load
    from muster.client import errors as E

    async with Cluster.connect(replicas[0].address) as cluster:
        leases = await asyncio.gather(*(cluster.join_node(f"shared{i}.test", 8787) for i in range(30)))
        stale = dataclasses.replace(
            leases[7], node=dataclasses.replace(leases[7].node, lease_id=leases[7].lease_id + 1000)
        )
        alives = [cluster.keep_alive(lease) for lease in [*leases, stale]]
        try:
            for r in range(5):
                outcomes = await asyncio.gather(
                    *(ka.beat(Load(session_count=r + 1)) for ka in alives), return_exceptions=True
                )
                assert isinstance(outcomes[-1], E.StaleLeaseError), outcomes[-1]
                assert all(not isinstance(o, BaseException) for o in outcomes[:-1]), outcomes
            shared = cluster._shared_keep_alive
            assert shared is not None and shared.largest == 31 and shared.messages == 5
        finally:
            for ka in alives:
                await ka.close()
        # With one lease left, it beats on a stream of its own, one heartbeat per message.
        alone = cluster.keep_alive(leases[0])
        try:
            await alone.beat(Load(session_count=9))
        finally:
            await alone.close()
        assert shared.messages == 5
    rows = await _db_rows(database_url, "SELECT id, session_count FROM registry.nodes")
    counts = {r["id"]: r["session_count"] for r in rows}
    assert counts[leases[0].node_id] == 9
    assert all(counts[lease.node_id] == 5 for lease in leases[1:])


async def test_agents_sharing_a_cluster_heartbeat_on_one_stream(replicas: list[ServerProcess], tmp_path) -> None:  # noqa: ANN001
    from muster.client import Agent, AgentConfig, Cluster

    async with Cluster.connect(replicas[0].address) as cluster:
        agents = [
            Agent(
                cluster,
                AgentConfig(
                    host_name=f"agent{i}.test",
                    state_dir=tmp_path / str(i),
                    serve_socket=False,
                    report_sessions=False,
                ),
            )
            for i in range(4)
        ]
        stop = asyncio.Event()
        runs = [asyncio.create_task(agent.run(stop)) for agent in agents]
        try:
            await asyncio.wait_for(asyncio.gather(*(agent.wait_joined() for agent in agents)), 15)

            def beaten() -> bool:
                shared = cluster._shared_keep_alive
                return shared is not None and shared.messages >= 6

            await wait_for(beaten, timeout=15, what="heartbeats on the shared stream")
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*runs), 15)
        listed = {n.address: n for n in (await cluster.list_nodes()).nodes}
        assert all(listed[f"agent{i}.test:8787"].state.name == "OFFLINE" for i in range(4))


async def test_a_heartbeat_on_one_replica_shows_in_the_other_replicas_list_within_a_second(
    replicas: list[ServerProcess],
) -> None:
    async with registry(replicas[0].address) as a, registry(replicas[1].address) as b:
        node = (await a.JoinNode(pb.JoinNodeRequest(host="live.test", port=8787))).node
        await b.ListNodes(pb.ListNodesRequest())  # b's view has the node (and has just refreshed)
        beat = await a.Heartbeat(
            pb.HeartbeatRequest(node_id=node.id, lease_id=node.lease_id, load=node_pb2.Load(session_count=5))
        )
        # This replica's own heartbeat shows at once...
        mine = {n.id: n for n in (await a.ListNodes(pb.ListNodesRequest())).nodes}[node.id]
        assert mine.load.session_count == 5 and mine.last_seen_time == beat.server_time
        # ...the other's within its refresh interval (renewals are not events).
        await asyncio.sleep(1.1)
        theirs = {n.id: n for n in (await b.ListNodes(pb.ListNodesRequest())).nodes}[node.id]
        assert theirs.load.session_count == 5 and theirs.last_seen_time == beat.server_time
        assert theirs.lease_expire_time == beat.lease_expire_time


@pytest.mark.parametrize(
    "make",
    [
        lambda n: pb.KeepAliveRequest(
            heartbeat=pb.HeartbeatRequest(node_id=n.id, lease_id=n.lease_id),
            heartbeats=[pb.HeartbeatRequest(node_id=n.id, lease_id=n.lease_id)],
        ),
        lambda n: pb.KeepAliveRequest(heartbeats=[pb.HeartbeatRequest(node_id=n.id, lease_id=n.lease_id)] * 1001),
    ],
    ids=["both-fields", "too-many"],
)
async def test_a_malformed_keepalive_message_ends_the_stream_naming_the_field(
    replicas: list[ServerProcess],
    make,  # noqa: ANN001
) -> None:
    async with registry(replicas[0].address) as stub:
        node = (await stub.JoinNode(pb.JoinNodeRequest(host="malformed.test", port=8787))).node
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in stub.KeepAlive(iter([make(node)])):
                pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(exc.value)[1]["field"] == "heartbeats"
