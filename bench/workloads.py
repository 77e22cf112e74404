"""The workloads. Clients run in separate processes (spawned, never forked after gRPC loads)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.cluster import control_plane


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    runs: int
    seconds: float
    concurrency: int
    fsync: bool
    quick: bool


@dataclass
class Result:
    """One run of one client process."""

    count: int
    elapsed: float
    latencies: list[float]


def _report(name: str, unit: str, runs: list[float], latencies: list[float]) -> None:
    value = statistics.median(runs)
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
    print(
        f"{name} {value:,.0f} {unit} (runs {len(runs)}: {min(runs):,.0f}..{max(runs):,.0f}) "
        f"p50 {p50:.2f} ms p99 {p99:.2f} ms",
        flush=True,
    )


def _run_clients(target: Callable[..., Result], args_per_process: list[tuple]) -> list[Result]:
    """Runs ``target(*args, start_at)`` in one spawned process each; all start together."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 3.0  # spawned interpreters need a moment to import gRPC
    with ctx.Pool(len(args_per_process)) as pool:
        pending = [pool.apply_async(target, (*args, start_at)) for args in args_per_process]
        return [p.get(timeout=600) for p in pending]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _loop_run(coro) -> Result:  # noqa: ANN001
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


async def _sleep_until(start_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))


# -- the ceiling ---------------------------------------------------------------------------------


def _upsert_client(url: str, tasks: int, seconds: float, offset: int, start_at: float) -> Result:
    async def main() -> Result:
        import asyncpg

        pool = await asyncpg.create_pool(url, min_size=tasks, max_size=tasks)
        lat: list[float] = []
        count = 0
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(i: int) -> None:
            nonlocal count
            key = offset + i
            while time.monotonic() < end:
                s = time.monotonic()
                await pool.execute(
                    "INSERT INTO bench_upserts (id, v) VALUES ($1, 1) "
                    "ON CONFLICT (id) DO UPDATE SET v = bench_upserts.v + 1",
                    key,
                )
                lat.append(time.monotonic() - s)
                count += 1

        await asyncio.gather(*(one(i) for i in range(tasks)))
        elapsed = time.monotonic() - t0
        await pool.close()
        return Result(count, elapsed, lat)

    return _loop_run(main())


def upserts(opts: Options) -> None:
    """The machine's ceiling: single-row upserts straight through asyncpg at concurrency 64."""
    import asyncpg

    with control_plane(0, fsync=opts.fsync) as cluster:

        async def setup() -> None:
            con = await asyncpg.connect(cluster.database_url)
            await con.execute("CREATE TABLE bench_upserts (id int PRIMARY KEY, v int NOT NULL)")
            await con.close()

        asyncio.run(setup())
        runs, lats = [], []
        for _ in range(opts.runs):
            results = _run_clients(
                _upsert_client,
                [(cluster.database_url, n, opts.seconds, i * 1000) for i, n in enumerate(_split(opts.concurrency, 2))],
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"postgres-upserts c={opts.concurrency}", "upserts/s", runs, lats)


# -- registry ------------------------------------------------------------------------------------


def _join_client(address: str, tasks: int, joins: int, prefix: str, start_at: float) -> Result:
    async def main() -> Result:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            await ch.channel_ready()
            lat: list[float] = []
            todo = list(range(joins))
            await _sleep_until(start_at)
            t0 = time.monotonic()

            async def one() -> None:
                while todo:
                    i = todo.pop()
                    s = time.monotonic()
                    await stub.JoinNode(pb.JoinNodeRequest(host=f"{prefix}-{i}", port=8787))
                    lat.append(time.monotonic() - s)

            await asyncio.gather(*(one() for _ in range(tasks)))
            return Result(joins, time.monotonic() - t0, lat)

    return _loop_run(main())


def _heartbeat_client(address: str, tasks: int, beats: int, nodes: list[tuple[int, int]], start_at: float) -> Result:
    async def main() -> Result:
        import grpc

        from muster.api.registry.v1 import node_pb2
        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            await ch.channel_ready()
            lat: list[float] = []
            remaining = beats
            await _sleep_until(start_at)
            t0 = time.monotonic()

            async def one(k: int) -> None:
                nonlocal remaining
                j = k
                while remaining > 0:
                    remaining -= 1
                    node_id, lease_id = nodes[j % len(nodes)]
                    j += tasks
                    s = time.monotonic()
                    await stub.Heartbeat(
                        pb.HeartbeatRequest(
                            node_id=node_id,
                            lease_id=lease_id,
                            load=node_pb2.Load(load1=0.5, load5=0.4, load15=0.3, cpu_count=4, session_count=2),
                        )
                    )
                    lat.append(time.monotonic() - s)

            await asyncio.gather(*(one(k) for k in range(tasks)))
            return Result(beats, time.monotonic() - t0, lat)

    return _loop_run(main())


def _join_all(address: str, count: int, prefix: str) -> list[tuple[int, int]]:
    async def main() -> list[tuple[int, int]]:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            sem = asyncio.Semaphore(64)

            async def one(i: int) -> tuple[int, int]:
                async with sem:
                    r = await stub.JoinNode(pb.JoinNodeRequest(host=f"{prefix}-{i}", port=8787))
                    return r.node.id, r.node.lease_id

            return list(await asyncio.gather(*(one(i) for i in range(count))))

    return asyncio.run(main())


def joins(opts: Options) -> None:
    """Joins through one replica: 1,000 distinct nodes at concurrency 64."""
    total = 100 if opts.quick else 1_000
    with control_plane(1, fsync=opts.fsync) as cluster:
        runs, lats = [], []
        for run in range(opts.runs):
            parts = _split(opts.concurrency, 2)
            results = _run_clients(
                _join_client, [(cluster.addresses[0], n, total // 2, f"r{run}p{i}") for i, n in enumerate(parts)]
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"joins n={total} c={opts.concurrency} replicas=1", "joins/s", runs, lats)


def heartbeats(opts: Options) -> None:
    """Heartbeats through one replica: 10,000 heartbeats of 1,000 nodes at concurrency 64."""
    total, nodes_n = (1_000, 100) if opts.quick else (10_000, 1_000)
    with control_plane(1, fsync=opts.fsync) as cluster:
        nodes = _join_all(cluster.addresses[0], nodes_n, "hb")
        runs, lats = [], []
        for _ in range(opts.runs):
            parts = _split(opts.concurrency, 2)
            results = _run_clients(
                _heartbeat_client, [(cluster.addresses[0], n, total // 2, nodes[i::2]) for i, n in enumerate(parts)]
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"heartbeats n={total} c={opts.concurrency} replicas=1", "heartbeats/s", runs, lats)


def _change_client(addresses: list[str], tasks: int, seconds: float, nodes: list[int], start_at: float) -> Result:
    async def main() -> Result:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        stubs = [g.RegistryServiceStub(c) for c in channels]
        for c in channels:
            await c.channel_ready()
        lat: list[float] = []
        count = 0
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(k: int) -> None:
            nonlocal count
            stub, node_id, mode = stubs[k % len(stubs)], nodes[k], 2
            while time.monotonic() < end:
                s = time.monotonic()
                await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node_id, mode=mode))
                lat.append(time.monotonic() - s)
                count += 1
                mode = 3 - mode

        await asyncio.gather(*(one(k) for k in range(tasks)))
        elapsed = time.monotonic() - t0
        for c in channels:
            await c.close()
        return Result(count, elapsed, lat)

    return _loop_run(main())


def _watch_client(address: str, seconds: float, start_at: float) -> Result:
    """Follows the stream from the head until the writers stop and it has caught up; reports how
    many events it saw and how long after the writers stopped it reached the final head."""

    async def main() -> Result:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            head = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
            call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=head))
            seen, last, last_at = 0, head, 0.0
            writers_end = start_at + seconds
            async for msg in call:
                for ev in msg.events.events:
                    if ev.revision != last + 1:
                        raise AssertionError(f"gap: {last} -> {ev.revision}")
                    last = ev.revision
                    seen += 1
                if msg.events.events:
                    last_at = time.monotonic()
                if time.monotonic() > writers_end + 0.5:
                    final = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
                    if last >= final:
                        break
            catch_up = max(0.0, last_at - writers_end)  # when the last change reached the watcher
            call.cancel()
            return Result(seen, catch_up, [])

    return _loop_run(main())


def changes(opts: Options) -> None:
    """State changes through the event log: 64 writers spread over two replicas, a watcher following."""
    with control_plane(2, fsync=opts.fsync, env={"MUSTER_PROGRESS_INTERVAL": "200ms"}) as cluster:
        nodes = [n for n, _ in _join_all(cluster.addresses[0], opts.concurrency, "chg")]
        runs, lats, lags = [], [], []
        for _ in range(opts.runs):
            parts = _split(opts.concurrency, 2)
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 3.0
            with ctx.Pool(3) as pool:
                watcher = pool.apply_async(_watch_client, (cluster.addresses[1], opts.seconds, start_at))
                writers = [
                    pool.apply_async(
                        _change_client,
                        (cluster.addresses, n, opts.seconds, nodes[sum(parts[:i]) : sum(parts[: i + 1])], start_at),
                    )
                    for i, n in enumerate(parts)
                ]
                results = [w.get(timeout=600) for w in writers]
                seen = watcher.get(timeout=600)
            total = sum(r.count for r in results)
            runs.append(total / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
            lags.append(seen.elapsed)
            if seen.count < total:
                raise AssertionError(f"the watcher saw {seen.count} of {total} changes")
        _report(f"state-changes c={opts.concurrency} replicas=2", "changes/s", runs, lats)
        print(
            f"state-changes watcher caught up {max(lags) * 1000:.0f} ms after the writers stopped "
            f"(runs {len(lags)}: {min(lags) * 1000:.0f}..{max(lags) * 1000:.0f} ms)",
            flush=True,
        )


def _store_writer(url: str, tasks: int, seconds: float, nodes: list[int], start_at: float) -> Result:
    """A replica's write path without gRPC: the registry store, this process's numbering passes."""

    async def main() -> Result:
        from datetime import timedelta

        from muster.core import db, events
        from muster.registry.models import Mode
        from muster.registry.store import RegistryStore, Timing

        pool = await db.create_pool(url, min_size=tasks, max_size=tasks, wait=30)
        numberer = events.Numberer(pool, lambda head: None)
        store = RegistryStore(
            pool, numberer, Timing(timedelta(seconds=5), timedelta(seconds=15), timedelta(seconds=30), 0)
        )
        lat: list[float] = []
        count = 0
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(k: int) -> None:
            nonlocal count
            mode = Mode.DRAINING
            while time.monotonic() < end:
                s = time.monotonic()
                await store.set_mode(nodes[k], mode)
                lat.append(time.monotonic() - s)
                count += 1
                mode = Mode.ACTIVE if mode == Mode.DRAINING else Mode.DRAINING

        await asyncio.gather(*(one(k) for k in range(tasks)))
        elapsed = time.monotonic() - t0
        await numberer.kick()
        await pool.close()
        return Result(count, elapsed, lat)

    return _loop_run(main())


def log(opts: Options) -> None:
    """The event log's own capacity: 64 writers in two processes through the store (no gRPC), a watcher on a replica."""
    with control_plane(1, fsync=opts.fsync, env={"MUSTER_PROGRESS_INTERVAL": "200ms"}) as cluster:
        nodes = [n for n, _ in _join_all(cluster.addresses[0], opts.concurrency, "log")]
        runs, lats, lags = [], [], []
        for _ in range(opts.runs):
            parts = _split(opts.concurrency, 2)
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 3.0
            with ctx.Pool(3) as pool:
                watcher = pool.apply_async(_watch_client, (cluster.addresses[0], opts.seconds, start_at))
                writers = [
                    pool.apply_async(
                        _store_writer,
                        (cluster.database_url, n, opts.seconds, nodes[sum(parts[:i]) : sum(parts[: i + 1])], start_at),
                    )
                    for i, n in enumerate(parts)
                ]
                results = [w.get(timeout=600) for w in writers]
                seen = watcher.get(timeout=600)
            total = sum(r.count for r in results)
            runs.append(total / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
            lags.append(seen.elapsed)
            if seen.count < total:
                raise AssertionError(f"the watcher saw {seen.count} of {total} changes")
        _report(f"event-log c={opts.concurrency} writers=2 processes (no gRPC)", "changes/s", runs, lats)
        print(f"event-log watcher caught up {max(lags) * 1000:.0f} ms after the writers stopped", flush=True)


def _floor_client(addresses: list[str], tasks: int, seconds: float, start_at: float) -> Result:
    async def main() -> Result:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channels = [grpc.aio.insecure_channel(a) for a in addresses]
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
        lat: list[float] = []
        count = 0
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(k: int) -> None:
            nonlocal count
            while time.monotonic() < end:
                s = time.monotonic()
                await stubs[k % len(stubs)].Check(health_pb2.HealthCheckRequest())
                lat.append(time.monotonic() - s)
                count += 1

        await asyncio.gather(*(one(k) for k in range(tasks)))
        elapsed = time.monotonic() - t0
        for c in channels:
            await c.close()
        return Result(count, elapsed, lat)

    return _loop_run(main())


def grpc_floor(opts: Options) -> None:
    """The gRPC ceiling: empty health checks over two replicas at concurrency 64, no database work."""
    with control_plane(2, fsync=opts.fsync) as cluster:
        runs, lats = [], []
        for _ in range(opts.runs):
            results = _run_clients(
                _floor_client, [(cluster.addresses, n, opts.seconds) for n in _split(opts.concurrency, 2)]
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"grpc-empty-calls c={opts.concurrency} replicas=2", "calls/s", runs, lats)


def _lock_client(address: str, tasks: int, seconds: float, names: list[str], start_at: float) -> Result:
    """Acquire + release cycles; latencies are whole cycles. Records (acquired, releasing) times."""

    async def main() -> Result:
        from datetime import timedelta

        from muster.client import Cluster

        async with Cluster.connect(address) as cluster:
            lat: list[float] = []
            marks: list[tuple[float, float]] = []
            count = 0
            await _sleep_until(start_at)
            t0 = time.monotonic()
            end = t0 + seconds

            async def one(k: int) -> None:
                nonlocal count
                name = names[k % len(names)]
                while time.monotonic() < end:
                    s = time.monotonic()
                    lease = await cluster.acquire(name, ttl=timedelta(seconds=10), wait=timedelta(seconds=30))
                    got = time.monotonic()
                    await cluster.release(lease)
                    lat.append(time.monotonic() - s)
                    marks.append((got, time.monotonic()))
                    count += 1

            await asyncio.gather(*(one(k) for k in range(tasks)))
            result = Result(count, time.monotonic() - t0, lat)
            result.marks = marks  # type: ignore[attr-defined]
            return result

    return _loop_run(main())


def locks(opts: Options) -> None:
    """Lock acquire+release cycles on distinct names at concurrency 1, 16 and 64."""
    with control_plane(1, fsync=opts.fsync, service="locks") as cluster:
        for conc in (1, 16, 64):
            runs, lats = [], []
            for run in range(opts.runs):
                parts = _split(conc, 2 if conc > 1 else 1)
                args = [
                    (cluster.addresses[0], n, opts.seconds, [f"r{run}-p{i}-n{k}" for k in range(n)])
                    for i, n in enumerate(parts)
                ]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
            _report(f"lock-cycles distinct c={conc}", "cycles/s", runs, lats)


def locks_contended(opts: Options) -> None:
    """Lock acquire+release cycles on one contended name (FIFO waiters) at concurrency 16 and 64."""
    with control_plane(1, fsync=opts.fsync, service="locks") as cluster:
        for conc in (16, 64):
            runs, lats, handoffs = [], [], []
            for run in range(opts.runs):
                args = [(cluster.addresses[0], n, opts.seconds, [f"hot-{run}-{conc}"]) for n in _split(conc, 2)]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
                marks = sorted(m for r in results for m in r.marks)  # type: ignore[attr-defined]
                # One exclusive holder at a time: the gap from a release's start to the next grant.
                handoffs += [b[0] - a[1] for a, b in zip(marks, marks[1:], strict=False) if b[0] > a[1]]
            _report(f"lock-cycles contended c={conc}", "cycles/s", runs, lats)
            if handoffs:
                print(
                    f"lock-handoff contended c={conc} median {statistics.median(handoffs) * 1000:.2f} ms "
                    f"(release sent to the next holder's grant received, n={len(handoffs)})",
                    flush=True,
                )


def _place_client(address: str, tasks: int, seconds: float, start_at: float) -> Result:
    """PlaceSession calls (reservations); latencies are whole calls."""

    async def main() -> Result:
        from muster.client import Cluster

        async with Cluster.connect(address) as cluster:
            lat: list[float] = []
            count = 0
            await _sleep_until(start_at)
            t0 = time.monotonic()
            end = t0 + seconds

            async def one(k: int) -> None:
                nonlocal count
                i = 0
                while time.monotonic() < end:
                    s = time.monotonic()
                    await cluster.place_session(f"user-{k}-{i}", kind="bench")
                    lat.append(time.monotonic() - s)
                    count += 1
                    i += 1

            await asyncio.gather(*(one(k) for k in range(tasks)))
            return Result(count, time.monotonic() - t0, lat)

    return _loop_run(main())


def _balancer_ready(address: str, nodes: int) -> None:
    async def main() -> None:
        from muster.client import Cluster

        async with Cluster.connect(address) as cluster:
            for i in range(nodes):
                await cluster.join_node(f"bench-node-{i}.test", 8787)
            for _ in range(200):
                try:
                    status = await cluster.status()
                    if sum(n.state == "ONLINE" for n in status.nodes) >= nodes:
                        return
                except Exception:  # noqa: BLE001 - still loading its view
                    pass
                await asyncio.sleep(0.1)
            raise RuntimeError("the balancer did not see the nodes")

    asyncio.run(main())


def placements(opts: Options) -> None:
    """PlaceSession (reserving) through one balancer replica over 100 nodes, strategy sessions, at concurrency 64."""
    import base64

    env = {
        "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        # The nodes do not heartbeat here: keep them ONLINE and within the check-in window throughout.
        "MUSTER_HEARTBEAT_INTERVAL": "20m",
        "MUSTER_CHECK_IN_WINDOW": "1h",
        "MUSTER_LEASE_TTL": "1h",
    }
    with control_plane(1, fsync=opts.fsync, env=env, service="registry,keys,balancer") as cluster:
        _balancer_ready(cluster.addresses[0], 100)
        runs, lats = [], []
        for _ in range(opts.runs):
            args = [(cluster.addresses[0], n, opts.seconds) for n in _split(opts.concurrency, 2)]
            results = _run_clients(_place_client, args)
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"placements c={opts.concurrency}", "placements/s", runs, lats)


def _fanout_client(address: str, streams: int, seconds: float, start_at: float) -> dict[int, float]:
    """Opens ``streams`` watch streams; returns, per revision, when the last of them received it."""

    async def main() -> dict[int, float]:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        last: dict[int, float] = {}
        seen: dict[int, int] = {}
        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            await ch.channel_ready()
            head = (await stub.GetCluster(pb.GetClusterRequest())).head_revision
            end = start_at + seconds

            async def follow() -> None:
                call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=head))
                try:
                    while time.monotonic() < end:
                        try:
                            msg = await asyncio.wait_for(call.read(), max(0.1, end - time.monotonic()))
                        except TimeoutError:
                            break
                        if msg is grpc.aio.EOF:
                            break
                        now = time.monotonic()
                        for ev in msg.events.events:
                            seen[ev.revision] = seen.get(ev.revision, 0) + 1
                            if seen[ev.revision] == streams:
                                last[ev.revision] = now
                finally:
                    call.cancel()

            await asyncio.gather(*(follow() for _ in range(streams)))
        return last

    return _loop_run(main())


def _fanout_writer(address: str, changes: int, start_at: float) -> list[tuple[int, float]]:
    async def main() -> list[tuple[int, float]]:
        from muster.client import Cluster, NodeMode

        out = []
        async with Cluster.connect(address) as c:
            node = (await c.join_node("fanout.test", 8787)).node_id
            await _sleep_until(start_at + 2.0)  # every stream is open by then
            for i in range(changes):
                sent = time.monotonic()
                changed = await c.set_node_mode(
                    node, NodeMode.DRAINING if i % 2 == 0 else NodeMode.ACTIVE, wait_for_revision=True
                )
                del changed
                head = (await c.get_cluster()).head_revision
                out.append((head, sent))
                await asyncio.sleep(0.2)
        return out

    return asyncio.run(main())


def fanout(opts: Options) -> None:
    """Event fan-out: a state change reaching all of N = 1, 100, 1,000 watchers (until the last has it)."""
    changes = 5 if opts.quick else 20
    with control_plane(1, fsync=opts.fsync) as cluster:
        address = cluster.addresses[0]
        for n in (1, 100) if opts.quick else (1, 100, 1000):
            seconds = 3.0 + changes * 0.3 + 2.0
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 4.0
            parts = _split(n, 2) if n > 1 else [1]
            with ctx.Pool(len(parts) + 1) as pool:
                watchers = [pool.apply_async(_fanout_client, (address, k, seconds, start_at)) for k in parts]
                writer = pool.apply_async(_fanout_writer, (address, changes, start_at))
                sent = writer.get(timeout=600)
                received = [w.get(timeout=600) for w in watchers]
            delays = []
            for revision, at in sent:
                arrivals = [r.get(revision) for r in received]
                if all(a is not None for a in arrivals):
                    delays.append(max(arrivals) - at)  # type: ignore[type-var,operator]
            if not delays:
                print(f"fanout watchers={n}: no change reached every watcher", flush=True)
                continue
            _report(f"fanout watchers={n}", "changes", [len(delays)], delays)


def _list_client(address: str, start_at: float) -> Result:
    async def main() -> Result:
        from muster.client import Cluster

        async with Cluster.connect(address) as c:
            await _sleep_until(start_at)
            lat = []
            t0 = time.monotonic()
            for _ in range(5):
                s = time.monotonic()
                listed = await c.list_nodes()
                lat.append(time.monotonic() - s)
            return Result(len(listed.nodes), time.monotonic() - t0, lat)

    return _loop_run(main())


def list_nodes(opts: Options) -> None:
    """ListNodes of every node (all pages of 1,000) with 10,000 nodes joined."""
    total = 1_000 if opts.quick else 10_000
    with control_plane(1, fsync=opts.fsync) as cluster:
        _join_all(cluster.addresses[0], total, "ln")
        result = _run_clients(_list_client, [(cluster.addresses[0],)])[0]
        _report(
            f"list-nodes nodes={result.count}", "lists/s", [len(result.latencies) / result.elapsed], result.latencies
        )


ALL: dict[str, Callable[[Options], None]] = {
    "grpc-floor": grpc_floor,
    "upserts": upserts,
    "joins": joins,
    "heartbeats": heartbeats,
    "changes": changes,
    "log": log,
    "locks": locks,
    "locks-contended": locks_contended,
    "placements": placements,
    "fanout": fanout,
    "list-nodes": list_nodes,
}
