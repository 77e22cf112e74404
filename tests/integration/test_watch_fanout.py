"""Serialize-once fan-out: many streams at different resume points and filters share encoded messages.

The replica encodes a batch once per (resume point, through revision, filter) and writes the same
bytes to every stream that needs them. These tests attack that sharing with real concurrency: a
stream must still get exactly its own events — gap-free, in order, once each, only those its filter
matches — whichever stream's bytes it was handed.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import duration_pb2
from harness import ServerProcess, registry

from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb

DRAINING, ACTIVE = node_pb2.Node.MODE_DRAINING, node_pb2.Node.MODE_ACTIVE
KIND = "muster.api.registry.v1."
# Long node timings: the only events are the writers' (no reaper events after they stop).
QUIET = {"MUSTER_HEARTBEAT_INTERVAL": "20m", "MUSTER_CHECK_IN_WINDOW": "1h", "MUSTER_LEASE_TTL": "1h"}


@dataclass
class Stream:
    """One watch stream and what it received."""

    start: int
    kinds: frozenset[str]
    node_ids: frozenset[int]
    events: list = field(default_factory=list)
    throughs: list[int] = field(default_factory=list)
    resync_revision: int | None = None

    def wants(self, ev) -> bool:  # noqa: ANN001
        return (not self.kinds or ev.kind in self.kinds) and (not self.node_ids or ev.node_id in self.node_ids)

    @property
    def through(self) -> int:
        return self.throughs[-1] if self.throughs else self.start


async def _follow(stub: registry_service_pb2_grpc.RegistryServiceStub, s: Stream, until: asyncio.Future) -> None:
    """Reads ``s``'s stream until its through_revision reaches the head that ``until`` resolves to."""
    call = stub.WatchEvents(
        pb.WatchEventsRequest(
            start_revision=s.start,
            kinds=sorted(s.kinds),
            node_ids=sorted(s.node_ids),
            progress_interval=duration_pb2.Duration(nanos=200_000_000),
        )
    )
    try:
        async for msg in call:
            kind = msg.WhichOneof("kind")
            if kind == "resync":
                assert s.resync_revision is None and not s.events, "a Resync only first"
                s.resync_revision = msg.resync.revision
            elif kind == "events":
                assert msg.events.events, "an empty batch"
                assert msg.events.events[-1].revision <= msg.through_revision
                s.events += msg.events.events
            else:
                assert msg.progress.head_revision >= msg.through_revision
            assert msg.through_revision >= s.through, "through_revision went back"
            s.throughs.append(msg.through_revision)
            if until.done() and msg.through_revision >= until.result():
                return
    finally:
        call.cancel()


async def _writer(stub, nodes: list[int], host: str, deadline: float, rng: random.Random) -> None:  # noqa: ANN001
    """Flips its nodes' modes, joins new nodes and deletes some, until the deadline."""
    n = 0
    while time.monotonic() < deadline:
        action = rng.random()
        if action < 0.7 and nodes:
            mode = rng.choice([DRAINING, ACTIVE])
            await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=rng.choice(nodes), mode=mode))
        elif action < 0.9 or len(nodes) < 2:
            r = await stub.JoinNode(pb.JoinNodeRequest(host=f"{host}-{n}", port=8787))
            nodes.append(r.node.id)
            n += 1
        else:
            victim = nodes.pop(rng.randrange(len(nodes)))
            await stub.DeleteNode(pb.DeleteNodeRequest(node_id=victim, force=True))


@pytest.mark.timeout(180)
async def test_two_hundred_streams_at_different_resume_points_and_filters_each_get_exactly_their_events(
    database_url: str,
) -> None:
    rng = random.Random(14)
    server = ServerProcess(database_url, env=QUIET).start()
    try:
        async with registry(server.address) as stub:
            # Some history to resume from: ten nodes and their mode flips.
            nodes = [(await stub.JoinNode(pb.JoinNodeRequest(host=f"seed-{i}", port=1))).node.id for i in range(10)]
            for mode in [DRAINING, ACTIVE, DRAINING]:
                for node in nodes:
                    await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node, mode=mode))
            history = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
            assert history >= 40

            # Few distinct filters and resume points, so that many streams share encoded batches, and
            # a tail of streams with their own.
            filters = [
                (frozenset(), frozenset()),
                (frozenset({KIND + "NodeModeChanged"}), frozenset()),
                (frozenset({KIND + "NodeJoined", KIND + "NodeDeleted"}), frozenset()),
                (frozenset(), frozenset(nodes[:3])),
                (frozenset({KIND + "NodeModeChanged"}), frozenset(nodes[5:7])),
                (frozenset({KIND + "NodeSuspected"}), frozenset()),  # matches nothing here
            ]
            starts = [1, history // 3, history // 2, history - 1, history]
            streams: list[Stream] = []
            for i in range(200):
                if i < 150:
                    start = starts[i % len(starts)]
                    kinds, node_ids = filters[(i // len(starts)) % len(filters)]
                elif i < 190:
                    start = rng.randint(1, history)
                    kinds, node_ids = rng.choice(filters)
                else:
                    start = 0  # a Resync first, then the events after it
                    kinds, node_ids = rng.choice(filters)
                streams.append(Stream(start, kinds, node_ids))

            until: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            channels = [grpc.aio.insecure_channel(server.address) for _ in range(4)]
            try:
                stubs = [registry_service_pb2_grpc.RegistryServiceStub(ch) for ch in channels]
                followers = [
                    asyncio.create_task(_follow(stubs[i % len(stubs)], s, until)) for i, s in enumerate(streams)
                ]
                await asyncio.sleep(0.5)  # most streams open and catching up while the writers start
                deadline = time.monotonic() + 4
                writers = [
                    _writer(stubs[k % len(stubs)], list(nodes[k::4]), f"w{k}", deadline, random.Random(k))
                    for k in range(4)
                ]
                await asyncio.gather(*writers)
                head = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
                until.set_result(head)
                async with asyncio.timeout(60):
                    await asyncio.gather(*followers)

                # The whole log, from one unfiltered stream of its own.
                log = Stream(1, frozenset(), frozenset())
                done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
                done.set_result(head)
                async with asyncio.timeout(30):
                    await _follow(stubs[0], log, done)
            finally:
                for ch in channels:
                    await ch.close()
    finally:
        server.stop()

    assert head - history > 200, "the writers did not run"
    assert [e.revision for e in log.events] == list(range(2, head + 1))
    by_revision = {e.revision: e for e in log.events}
    shared = 0
    for i, s in enumerate(streams):
        after = s.start if s.start else s.resync_revision
        assert after is not None, f"stream {i} got no Resync"
        expected = [by_revision[r] for r in range(after + 1, head + 1) if s.wants(by_revision[r])]
        got = [e.revision for e in s.events]
        assert got == [e.revision for e in expected], f"stream {i} (start {s.start}, {sorted(s.kinds)}, {s.node_ids})"
        assert [e.SerializeToString() for e in s.events] == [e.SerializeToString() for e in expected]
        assert s.through >= head
        shared += s.start in starts and not s.node_ids
    assert shared > 50
