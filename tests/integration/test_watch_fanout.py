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
from harness import ServerProcess, registry, servers

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


@dataclass
class Logical:
    """One watcher across its reconnects: what it asked for and every event it was handed."""

    start: int
    kinds: frozenset[str]
    node_ids: frozenset[int]
    pause: float = 0.0  # seconds between reads (a slow watcher)
    stall_at: int = 0  # stop reading for a while once this many messages arrived (0: never)
    events: list = field(default_factory=list)
    through: int = 0
    cuts: int = 0
    connections: int = 0

    def wants(self, ev) -> bool:  # noqa: ANN001
        return (not self.kinds or ev.kind in self.kinds) and (not self.node_ids or ev.node_id in self.node_ids)


async def _watch_resuming(stubs: list, w: Logical, until: asyncio.Future, first: int) -> None:  # noqa: ANN001
    """Follows ``w`` until its through_revision reaches ``until``'s head; a stream cut for being slow
    (RESOURCE_EXHAUSTED) or ended is resumed from its last through_revision on the other replica."""
    w.through = w.start
    k, messages = first, 0
    while True:
        call = stubs[k % len(stubs)].WatchEvents(
            pb.WatchEventsRequest(
                start_revision=w.through,
                kinds=sorted(w.kinds),
                node_ids=sorted(w.node_ids),
                progress_interval=duration_pb2.Duration(nanos=200_000_000),
            )
        )
        w.connections += 1
        try:
            async for msg in call:
                assert msg.WhichOneof("kind") != "resync", "no Resync: nothing is compacted"
                assert msg.through_revision >= w.through, "through_revision went back"
                w.events += msg.events.events
                w.through = msg.through_revision
                messages += 1
                if until.done() and w.through >= until.result():
                    return
                if w.stall_at and messages == w.stall_at:
                    await asyncio.sleep(3.0)  # far past the write timeout: the replica must cut us
                elif w.pause:
                    await asyncio.sleep(w.pause)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            w.cuts += 1
        finally:
            call.cancel()
        k += 1  # resume on the other replica


@pytest.mark.timeout(240)
async def test_watchers_on_two_replicas_joining_mid_stream_and_slow_ones_cut_miss_nothing(
    database_url: str,
) -> None:
    """Writers on both replicas; 300 watchers over both, a third of them opened while the writers run
    (from the head they just read, or from a past revision), some reading slowly, some stalling until
    the replica cuts them and resuming on the other replica. Each must hold exactly its events."""
    env = {**QUIET, "MUSTER_STREAM_WRITE_TIMEOUT": "300ms", "MUSTER_STREAM_MAX_LAG": "200"}
    rng = random.Random(1414)
    pad = {f"pad{i}": "x" * 250 for i in range(60)}  # ~15 KB per event: flow-control windows fill fast
    with servers(database_url, 2, env=env) as procs:
        channels = [grpc.aio.insecure_channel(p.address) for p in procs for _ in range(2)]
        # The stalling watchers' own channels keep HTTP/2's initial 64 KB window (no BDP probing), so a
        # stall blocks the replica's writes within a few events.
        narrow = [grpc.aio.insecure_channel(p.address, options=[("grpc.http2.bdp_probe", 0)]) for p in procs]
        try:
            stubs = [registry_service_pb2_grpc.RegistryServiceStub(ch) for ch in channels]
            slow_stubs = [registry_service_pb2_grpc.RegistryServiceStub(ch) for ch in narrow]
            nodes = [(await stubs[0].JoinNode(pb.JoinNodeRequest(host=f"s-{i}", port=1))).node.id for i in range(12)]
            for node in nodes:
                await stubs[1].SetNodeMode(pb.SetNodeModeRequest(node_id=node, mode=DRAINING))
            history = (await stubs[0].GetCluster(pb.GetClusterRequest())).head_revision
            filters = [
                (frozenset(), frozenset()),
                (frozenset({KIND + "NodeModeChanged"}), frozenset()),
                (frozenset({KIND + "NodeJoined"}), frozenset()),
                (frozenset(), frozenset(nodes[:4])),
            ]
            until: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            watchers: list[Logical] = []
            tasks: list[asyncio.Task[None]] = []

            def open_watcher(w: Logical) -> None:
                watchers.append(w)
                on = slow_stubs if w.stall_at else stubs
                tasks.append(asyncio.create_task(_watch_resuming(on, w, until, len(watchers))))

            for i in range(200):  # current, at the head, sharing encoded batches
                kinds, node_ids = filters[i % len(filters)] if i % 3 == 0 else filters[0]
                open_watcher(Logical(history, kinds, node_ids))
            for i in range(20):  # slow readers, and ones that stall until cut
                open_watcher(Logical(history, frozenset(), frozenset(), pause=0.05 if i % 2 else 0.0, stall_at=3 + i))

            async def write(k: int, deadline: float) -> None:
                stub, wrng, mine, n = stubs[k % len(stubs)], random.Random(k), list(nodes[k::4]), 0
                while time.monotonic() < deadline:
                    action = wrng.random()
                    if action < 0.6 and mine:
                        mode = wrng.choice([DRAINING, ACTIVE])
                        await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=wrng.choice(mine), mode=mode))
                    elif action < 0.9 or len(mine) < 2:
                        labels = pad if wrng.random() < 0.5 else {}
                        r = await stub.JoinNode(pb.JoinNodeRequest(host=f"w{k}-{n}", port=8787, labels=labels))
                        mine.append(r.node.id)
                        n += 1
                    else:
                        await stub.DeleteNode(
                            pb.DeleteNodeRequest(node_id=mine.pop(wrng.randrange(len(mine))), force=True)
                        )

            async def join_late(deadline: float) -> None:
                while time.monotonic() < deadline:
                    await asyncio.sleep(rng.uniform(0.005, 0.04))
                    stub = rng.choice(stubs)
                    head = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
                    start = head if rng.random() < 0.6 else rng.randint(history, head)
                    kinds, node_ids = rng.choice(filters)
                    open_watcher(Logical(start, kinds, node_ids, pause=0.02 if rng.random() < 0.1 else 0.0))

            await asyncio.sleep(0.3)
            deadline = time.monotonic() + 5
            await asyncio.gather(*(write(k, deadline) for k in range(4)), join_late(deadline))
            heads = [(await s.GetCluster(pb.GetClusterRequest())).head_revision for s in stubs]
            head = max(heads)
            until.set_result(head)
            async with asyncio.timeout(90):
                await asyncio.gather(*tasks)

            log = Logical(1, frozenset(), frozenset())
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            done.set_result(head)
            async with asyncio.timeout(30):
                await _watch_resuming(stubs, log, done, 0)
        finally:
            for ch in channels + narrow:
                await ch.close()

    assert [e.revision for e in log.events] == list(range(2, head + 1))
    assert head - history > 100, "the writers did not run"
    by_revision = {e.revision: e for e in log.events}
    late = sum(w.start > history for w in watchers)
    assert late >= 10, f"only {late} watchers joined mid-stream"
    for i, w in enumerate(watchers):
        expected = [by_revision[r] for r in range(w.start + 1, head + 1) if w.wants(by_revision[r])]
        got = [e.revision for e in w.events]
        assert got == [e.revision for e in expected], (
            f"watcher {i} (start {w.start}, {sorted(w.kinds)}, {sorted(w.node_ids)}, cuts {w.cuts}): "
            f"missing {sorted(set(e.revision for e in expected) - set(got))[:10]}, "
            f"duplicated {sorted(r for r in set(got) if got.count(r) > 1)[:10]}"
        )
        assert [e.SerializeToString() for e in w.events] == [e.SerializeToString() for e in expected]
        assert w.through >= head
    assert sum(w.cuts for w in watchers) >= 5, "the stalled watchers were not cut"
