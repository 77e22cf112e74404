"""The design's size: 10,000 nodes and 100,000 sessions on one replica (``scale``).

One process runs ``registry,keys,balancer``; the nodes never heartbeat, so the heartbeat interval,
check-in window, lease TTL and placement TTL are stretched to keep them ONLINE and their placements
alive. The nodes join with a label ``group`` (100 groups) and the 100,000 sessions are placed through
``PlaceSession`` with a group label each, so that filling the cluster ranks 100 candidates per
placement instead of 10,000 (the fill is set-up, not a figure). One more node, the victim, carries
``group=victim`` and is given 1,000 sessions. Then, one figure each:

- ``scale rss``: the replica's resident memory (VmRSS from /proc of the server process) with every
  node joined and every session placed;
- ``scale placements``: PlaceSession without labels, so among all 10,000 nodes, one call at a time
  for ``--seconds``: its p50/p99;
- ``scale resync``: 100 watchers (two processes) open ``WatchEvents(start_revision=0)`` at one
  instant; each one's first message is a Resync of every node; latency: from the common start until
  a watcher holds its Resync; value: until all 100 have it;
- ``scale failover``: the victim's lease is shortened to end 1 s from now (an UPDATE of its
  ``lease_expire_time``: the lease TTL is one setting for the whole cluster), and a watcher follows
  ``SessionMoved``; value: from the lease's end (the database's clock, the machine's clock) until the
  last of its sessions' SessionMoved event arrived; a line also gives the events' own times.

Sizes under ``--quick``: 500 nodes, 2,000 sessions, 100 on the victim, 10 watchers. Every phase is
bounded in time; a fill that runs out of time says how far it got and the figures name the sizes
actually reached.
"""

from __future__ import annotations

import asyncio
import base64
import multiprocessing
import os
import sys
import time

from bench import heartbeats
from bench.cluster import control_plane
from bench.workloads import (
    FIGURES,
    Figure,
    Options,
    Result,
    _head,
    _loop_run,
    _place_client,
    _report,
    _run_clients,
    _sleep_until,
    _split,
)

GROUPS = 100  # node labels group=0..99; the fill's placements name one each
FILL_TIMEOUT = 600.0  # seconds for joining or placing everything, each
MOVE_TIMEOUT = 120.0  # seconds for the victim's sessions to be moved
SESSION_MOVED = "muster.api.balancer.v1.SessionMoved"


def _value(name: str, value: float, unit: str) -> None:
    """A figure without latencies (kept for the JSON file; the plot leaves it out)."""
    print(f"{name} {value:,.0f} {unit}", flush=True)
    FIGURES.append(Figure(name, value, unit, [value], 0.0, 0.0, []))


def _log(text: str) -> None:
    print(f"# scale: {text}", file=sys.stderr, flush=True)


def _join_labeled(address: str, first: int, count: int, groups: int, deadline: float) -> list[int]:
    """Joins nodes ``first .. first+count-1`` with label group = i mod ``groups``; returns their ids."""

    async def main() -> list[int]:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            todo = list(range(first, first + count))
            ids: list[int] = []

            async def one() -> None:
                while todo and time.monotonic() < deadline:
                    i = todo.pop()
                    r = await stub.JoinNode(
                        pb.JoinNodeRequest(host=f"scale-{i}.test", port=8787, labels={"group": str(i % groups)})
                    )
                    ids.append(r.node.id)

            await asyncio.gather(*(one() for _ in range(32)))
            return ids

    return _loop_run(main())


def _place_labeled(address: str, sessions: list[str], deadline: float, start_at: float) -> Result:
    """Places one session per entry of ``sessions`` (its group label), 64 at a time."""

    async def main() -> Result:
        import grpc

        from muster.api.balancer.v1 import balancer_service_pb2 as pb
        from muster.api.balancer.v1 import balancer_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.BalancerServiceStub(ch)
            await ch.channel_ready()
            todo = list(enumerate(sessions))
            lat: list[float] = []
            await _sleep_until(start_at)
            t0 = time.monotonic()

            retried: list[str] = []

            async def one() -> None:
                while todo and time.monotonic() < deadline:
                    i, group = todo.pop()
                    user = f"fill-{os.getpid()}-{i}"
                    req = pb.PlaceSessionRequest(user=user, kind="scale", labels={"group": group}, request_id=user)
                    s = time.monotonic()
                    while True:
                        try:
                            await stub.PlaceSession(req, timeout=60)
                            break
                        except grpc.aio.AioRpcError as e:
                            # The balancer answers UNAVAILABLE while its node view reloads: the
                            # client library retries that (the request id makes it safe); so do we.
                            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                                raise
                            retried.append(e.details() or "")
                            await asyncio.sleep(0.2)
                    lat.append(time.monotonic() - s)

            await asyncio.gather(*(one() for _ in range(64)))
            result = Result(len(lat), time.monotonic() - t0, lat)
            result.retried = retried  # type: ignore[attr-defined]
            return result

    return _loop_run(main())


def _candidates(address: str, labels: dict[str, str]) -> int:
    """How many nodes the balancer would place among now (a dry run)."""

    async def main() -> int:
        import grpc

        from muster.api.balancer.v1 import balancer_service_pb2 as pb
        from muster.api.balancer.v1 import balancer_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            try:
                r = await g.BalancerServiceStub(ch).PlaceSession(
                    pb.PlaceSessionRequest(user="probe", labels=labels, dry_run=True), timeout=30
                )
            except grpc.aio.AioRpcError:
                return 0  # no eligible node yet, or the view is still loading
            return r.candidate_count

    return asyncio.run(main())


def _wait_candidates(address: str, labels: dict[str, str], want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = _candidates(address, labels)
        if got >= want:
            return got
        time.sleep(0.5)
    return got


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _resync_client(address: str, streams: int, start_at: float) -> list[tuple[float, int]]:
    """Opens ``streams`` WatchEvents(start_revision=0) at ``start_at``; per stream: (seconds from
    ``start_at`` until its first message, a Resync, arrived; how many nodes it held)."""

    async def main() -> list[tuple[float, int]]:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            await ch.channel_ready()
            await _sleep_until(start_at)

            async def one() -> tuple[float, int]:
                call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=0), timeout=120)
                try:
                    msg = await call.read()
                    at = time.monotonic() - start_at
                    if msg is grpc.aio.EOF or not msg.HasField("resync"):
                        raise AssertionError(f"the first message is not a Resync: {msg}")
                    return at, len(msg.resync.nodes)
                finally:
                    call.cancel()

            return list(await asyncio.gather(*(one() for _ in range(streams))))

    return _loop_run(main())


def _moved_watcher(address: str, head: int, victim: int, sessions: int, deadline: float) -> list[tuple[float, float]]:
    """Follows SessionMoved events after ``head`` until ``sessions`` of them left ``victim``; per
    event: (when it arrived, by the machine's clock; its own time, the database's clock)."""

    async def main() -> list[tuple[float, float]]:
        import grpc

        from muster.api.balancer.v1 import balancer_pb2
        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        out: list[tuple[float, float]] = []
        async with grpc.aio.insecure_channel(address) as ch:
            call = g.RegistryServiceStub(ch).WatchEvents(
                pb.WatchEventsRequest(start_revision=head, kinds=[SESSION_MOVED]),
                timeout=max(1.0, deadline - time.monotonic()),
            )
            moved = balancer_pb2.SessionMoved()
            try:
                async for msg in call:
                    now = time.time()
                    for ev in msg.events.events:
                        ev.payload.Unpack(moved)
                        if moved.previous_node_id == victim:
                            out.append((now, ev.time.ToNanoseconds() / 1e9))
                    if len(out) >= sessions:
                        break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            finally:
                call.cancel()
        return out

    return _loop_run(main())


def _end_lease(url: str, node_id: int) -> float:
    """Makes ``node_id``'s lease end one second from now (database clock); returns that instant (epoch s)."""

    async def main() -> float:
        import asyncpg

        con = await asyncpg.connect(url)
        try:
            return float(
                await con.fetchval(
                    "UPDATE registry.nodes SET lease_expire_time = now() + interval '1 second' "
                    "WHERE id = $1 RETURNING extract(epoch FROM lease_expire_time)",
                    node_id,
                )
            )
        finally:
            await con.close()

    return asyncio.run(main())


def scale(opts: Options) -> None:
    """The design's size, 10,000 nodes and 100,000 sessions: RSS, placement, failover, Resync to 100 watchers."""
    nodes_n, sessions_n, victim_n, watchers = (500, 2_000, 100, 10) if opts.quick else (10_000, 100_000, 1_000, 100)
    groups = 10 if opts.quick else GROUPS
    env = {
        "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        # The nodes do not heartbeat: keep them ONLINE, within the check-in window, and their placements alive.
        "MUSTER_HEARTBEAT_INTERVAL": "20m",
        "MUSTER_CHECK_IN_WINDOW": "1h",
        "MUSTER_LEASE_TTL": "1h",
        "MUSTER_PLACEMENT_TTL": "3h",
        "MUSTER_EVENT_RETENTION_EVENTS": "1000000",
    }
    with control_plane(1, fsync=opts.fsync, env=env, service="registry,keys,balancer") as cluster:
        address = cluster.addresses[0]
        (server,) = heartbeats._server_pids()
        _log(f"joining {nodes_n:,} nodes in {groups} groups, and the victim")
        t0 = time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        deadline = time.monotonic() + FILL_TIMEOUT
        parts = _split(nodes_n, 2)
        with ctx.Pool(2) as pool:
            pending = [
                pool.apply_async(_join_labeled, (address, sum(parts[:i]), n, groups, deadline))
                for i, n in enumerate(parts)
            ]
            joined = sum(len(p.get(timeout=FILL_TIMEOUT + 60)) for p in pending)
        victim = _join_labeled(address, nodes_n, 1, 1 << 30, deadline)  # group = its index: unique
        victim_id = victim[0]
        victim_group = str(nodes_n)
        _log(f"joined {joined + 1:,} nodes in {time.monotonic() - t0:.1f} s; waiting for the balancer's view")
        seen = _wait_candidates(address, {}, joined + 1, 120)
        if seen < joined + 1:
            raise AssertionError(f"the balancer sees {seen} of {joined + 1} nodes")

        _log(f"placing {sessions_n:,} sessions over the groups and {victim_n:,} on the victim")
        t0 = time.monotonic()
        deadline = time.monotonic() + FILL_TIMEOUT
        fill = [str(k % groups) for k in range(sessions_n)]
        shares = [fill[i::2] for i in range(2)]
        shares[0] = [victim_group] * victim_n + shares[0]  # the victim's first, so they are all placed
        results = _run_clients(_place_labeled, [(address, share, deadline) for share in shares])
        placed = sum(r.count for r in results)
        rate = placed / max(r.elapsed for r in results)
        retried = [d for r in results for d in r.retried]  # type: ignore[attr-defined]
        _log(f"placed {placed:,} sessions in {time.monotonic() - t0:.1f} s ({rate:,.0f}/s)")
        if retried:
            print(
                f"scale fill: {len(retried)} placements answered UNAVAILABLE and were retried (first: {retried[0]})",
                flush=True,
            )
        if placed < victim_n:
            raise AssertionError(f"only {placed} sessions placed; the victim needs {victim_n}")
        size = f"nodes={joined + 1} sessions={placed}"

        rss = _rss_mb(server)
        _value(f"scale rss {size}", rss, "MB resident (VmRSS of the replica)")

        # Placement latency among every node (no labels), one call at a time.
        results = _run_clients(_place_client, [(address, 1, opts.seconds)])
        _report(
            f"scale placements nodes={joined + 1} c=1",
            "placements/s",
            [r.count / r.elapsed for r in results],
            [x for r in results for x in r.latencies],
        )

        # A Resync of every node to N watchers opened at one instant.
        start_at = time.monotonic() + 3.0
        with ctx.Pool(2) as pool:
            pending = [pool.apply_async(_resync_client, (address, n, start_at)) for n in _split(watchers, 2)]
            got = [x for p in pending for x in p.get(timeout=300)]
        if any(n < joined + 1 for _, n in got):
            raise AssertionError(f"a Resync held {min(n for _, n in got)} of {joined + 1} nodes")
        until_all = max(at for at, _ in got) * 1000
        _report(
            f"scale resync nodes={joined + 1} watchers={watchers}", "ms until all", [until_all], [a for a, _ in got]
        )

        # The victim's lease ends; its sessions are moved.
        head = _head(address)
        with ctx.Pool(1) as pool:
            watching = pool.apply_async(
                _moved_watcher, (address, head, victim_id, victim_n, time.monotonic() + 3.0 + MOVE_TIMEOUT)
            )
            time.sleep(3.0)  # the watcher's interpreter is up and its stream open
            lease_end = _end_lease(cluster.database_url, victim_id)
            _log(f"node {victim_id}'s lease ends at {lease_end:.3f}; waiting for its {victim_n:,} sessions to move")
            moves = watching.get(timeout=MOVE_TIMEOUT + 60)
        if len(moves) < victim_n:
            print(f"scale failover: only {len(moves)} of {victim_n} sessions moved in {MOVE_TIMEOUT:.0f} s", flush=True)
        if moves:
            arrived = [a - lease_end for a, _ in moves]
            _report(
                f"scale failover sessions={len(moves)} {size}",
                "ms after the lease ended, the last",
                [max(arrived) * 1000],
                arrived,
            )
            stamped = sorted(t - lease_end for _, t in moves)
            print(
                f"scale failover event times after the lease ended: first {stamped[0]:.3f} s, "
                f"last {stamped[-1]:.3f} s (database clock)",
                flush=True,
            )
        _log(f"replica RSS at the end {_rss_mb(server):.0f} MB")
