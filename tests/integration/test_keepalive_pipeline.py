"""One KeepAlive stream carrying many nodes' heartbeats (what a node agent multiplexer or the
benchmark does): answered in request order, each renewal really committed, failures in their turn.
A real server process and a real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from harness import ServerProcess, error_reason, registry

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

# Long leases: joining a few dozen nodes on a busy machine must not let the first ones expire.
SLOW_LEASES = {"MUSTER_CHECK_IN_WINDOW": "20s", "MUSTER_LEASE_TTL": "60s"}


@pytest.fixture
def server(database_url: str) -> Iterator[ServerProcess]:
    proc = ServerProcess(database_url, env=SLOW_LEASES).start()
    try:
        yield proc
    finally:
        proc.stop()


async def _join_many(stub, count: int, prefix: str) -> list[node_pb2.Node]:  # noqa: ANN001
    joined = await asyncio.gather(
        *(stub.JoinNode(pb.JoinNodeRequest(host=f"{prefix}{i}.test", port=8787)) for i in range(count))
    )
    return [r.node for r in joined]


def _beat(node_id: int, lease_id: int, sessions: int = 0) -> pb.KeepAliveRequest:
    load = node_pb2.Load(load1=0.5, load5=0.25, load15=0.125, cpu_count=8, session_count=sessions)
    return pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=node_id, lease_id=lease_id, load=load))


async def _rows(url: str) -> dict[int, asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch("SELECT id, last_seen_time, lease_expire_time, session_count FROM registry.nodes")
        return {r["id"]: r for r in rows}
    finally:
        await con.close()


async def _waves(requests: list[list[pb.KeepAliveRequest]], pause: float = 0.03) -> AsyncIterator:
    """Sends each wave at once, waves ``pause`` apart, without waiting for answers: the waves
    land in different group commits, so the answers differ from wave to wave."""
    for i, wave in enumerate(requests):
        if i:
            await asyncio.sleep(pause)
        for req in wave:
            yield req


async def test_one_stream_carrying_many_nodes_is_answered_in_order_and_each_lease_committed(
    server: ServerProcess, database_url: str
) -> None:
    async with registry(server.address) as stub:
        nodes = await _join_many(stub, 60, "many")
        before = await _rows(database_url)
        # Four waves of fifteen nodes each; every node heartbeats exactly once, reporting its own
        # session count so that its row shows its own heartbeat was written.
        order = [(n, 100 + i) for i, n in enumerate(nodes)]
        waves = [[_beat(n.id, n.lease_id, s) for n, s in order[k : k + 15]] for k in range(0, 60, 15)]
        answers = [m.heartbeat async for m in stub.KeepAlive(_waves(waves))]
    after = await _rows(database_url)

    assert len(answers) == len(order)
    expiries = [a.lease_expire_time.ToDatetime(tzinfo=before[nodes[0].id]["lease_expire_time"].tzinfo) for a in answers]
    # Pipelined: the stream's heartbeats share group commits (not one commit per heartbeat)...
    assert len(set(expiries)) < len(answers)
    # ...yet more than one commit answered (else order would say nothing), in commit order.
    assert len(set(expiries)) > 1
    assert expiries == sorted(expiries)
    for (node, sessions), answer, expiry in zip(order, answers, expiries, strict=True):
        row, old = after[node.id], before[node.id]
        # The i-th answer is the i-th request's commit: exactly that node's new lease in the database.
        assert row["lease_expire_time"] == expiry
        assert row["lease_expire_time"] > old["lease_expire_time"]
        assert row["last_seen_time"] > old["last_seen_time"]
        assert row["session_count"] == sessions
        assert answer.server_time.ToDatetime(tzinfo=expiry.tzinfo) == row["last_seen_time"]
        assert answer.heartbeat_interval.ToMilliseconds() == 200


async def test_a_bad_heartbeat_mid_stream_ends_it_naming_the_field_after_the_earlier_answers(
    server: ServerProcess, database_url: str
) -> None:
    async with registry(server.address) as stub:
        nodes = await _join_many(stub, 12, "bad")
        before = await _rows(database_url)
        good = [_beat(n.id, n.lease_id, 7) for n in nodes[:10]]
        bad = _beat(0, nodes[10].lease_id)  # node id 0: not a valid id
        later = [_beat(n.id, n.lease_id) for n in nodes[10:]]
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in stub.KeepAlive(_waves([[*good, bad, *later]])):
                answers.append(m.heartbeat)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, metadata = error_reason(info.value)
    assert reason == "INVALID_FIELD" and metadata["field"] == "heartbeat.node_id"
    assert "heartbeat.node_id" in info.value.details()
    assert len(answers) == len(good)  # every heartbeat before the bad one, and only those
    after = await _rows(database_url)
    for n, answer in zip(nodes[:10], answers, strict=True):
        expiry = answer.lease_expire_time.ToDatetime(tzinfo=after[n.id]["lease_expire_time"].tzinfo)
        assert after[n.id]["lease_expire_time"] == expiry > before[n.id]["lease_expire_time"]


async def test_a_bad_load_names_the_nested_load_field(server: ServerProcess) -> None:
    async with registry(server.address) as stub:
        (node,) = await _join_many(stub, 1, "load")
        bad = _beat(node.id, node.lease_id)
        bad.heartbeat.load.load1 = float("nan")
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in stub.KeepAlive(_waves([[_beat(node.id, node.lease_id), bad]])):
                answers.append(m)
    assert len(answers) == 1
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value)[1]["field"] == "heartbeat.load.load1"


@pytest.mark.parametrize(
    ("wrong", "code", "reason"),
    [
        ("lease", grpc.StatusCode.FAILED_PRECONDITION, "STALE_LEASE"),
        ("node", grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND"),
    ],
)
async def test_an_unknown_lease_mid_stream_gets_the_unary_status_after_the_earlier_answers(
    server: ServerProcess, wrong: str, code: grpc.StatusCode, reason: str
) -> None:
    async with registry(server.address) as stub:
        nodes = await _join_many(stub, 6, f"unknown-{wrong}")
        target = nodes[3]
        unknown = _beat(target.id, target.lease_id + 1000) if wrong == "lease" else _beat(10**9, 1)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Heartbeat(unknown.heartbeat)
        requests = [_beat(n.id, n.lease_id) for n in nodes[:3]] + [unknown, _beat(nodes[4].id, nodes[4].lease_id)]
        answers = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in stub.KeepAlive(_waves([requests])):
                answers.append(m)
    assert len(answers) == 3
    assert info.value.code() == unary.value.code() == code
    assert error_reason(info.value)[0] == error_reason(unary.value)[0] == reason


async def test_a_cancelled_stream_with_heartbeats_in_flight_leaves_the_server_serving(server: ServerProcess) -> None:
    async with registry(server.address) as stub:
        nodes = await _join_many(stub, 20, "cancel")
        requests = [_beat(n.id, n.lease_id) for n in nodes] * 50  # 1,000 heartbeats, far more than answered
        call = stub.KeepAlive(_waves([requests]))
        first = await asyncio.wait_for(call.read(), 10)
        assert first.heartbeat.HasField("lease_expire_time")
        call.cancel()
        await asyncio.sleep(0.3)
        # The replica still answers, on a new stream as on unary calls.
        answers = [m async for m in stub.KeepAlive(_waves([[_beat(n.id, n.lease_id) for n in nodes]]))]
        assert len(answers) == len(nodes)
        await stub.Heartbeat(_beat(nodes[0].id, nodes[0].lease_id).heartbeat)
    assert server.log_path is not None
    log = server.log_path.read_text(errors="replace")
    for leak in ("never retrieved", "was destroyed but it is pending", "Traceback"):
        assert leak not in log
