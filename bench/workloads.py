"""The workloads. Clients run in separate processes (spawned, never forked after gRPC loads)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.cluster import control_plane, cpu_seconds


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    runs: int
    seconds: float
    concurrency: int  # --concurrency, else 64
    fsync: bool
    quick: bool
    concurrency_given: bool = False  # --concurrency was given: it replaces a workload's own levels
    replicas: int | None = None  # --replicas, else None: each workload's own (1; 2 for state-changes)
    workers: int = 1  # --workers: server processes per replica sharing its port (muster serve --workers)

    def levels(self, *default: int) -> tuple[int, ...]:
        """The concurrency levels to run: the one asked for, else the workload's own."""
        return (self.concurrency,) if self.concurrency_given else default

    def conc(self, default: int = 64) -> int:
        """The one concurrency level to run: the one asked for, else the workload's own."""
        return self.concurrency if self.concurrency_given else default

    def n_replicas(self, default: int = 1) -> int:
        """How many server replicas to start."""
        return self.replicas or default


@dataclass
class Figure:
    """One printed figure, kept for the plot and the JSON file."""

    name: str
    value: float
    unit: str
    runs: list[float]
    p50_ms: float
    p99_ms: float
    latencies: list[float] = field(repr=False)  # seconds


FIGURES: list[Figure] = []  # every figure _report printed, in order


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
    FIGURES.append(Figure(name, value, unit, list(runs), p50, p99, lat))


def _run_clients(target: Callable[..., Result], args_per_process: list[tuple]) -> list[Result]:
    """Runs ``target(*args, start_at)`` in one spawned process each; all start together."""
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 3.0  # spawned interpreters need a moment to import gRPC
    with ctx.Pool(len(args_per_process)) as pool:
        pending = [pool.apply_async(target, (*args, start_at)) for args in args_per_process]
        return [p.get(timeout=600) for p in pending]


def _workers_tag(opts: Options) -> str:
    """`` workers=N`` in a figure's name when the replicas run several processes, else nothing."""
    return f" workers={opts.workers}" if opts.workers > 1 else ""


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _processes(concurrency: int) -> list[int]:
    """Client tasks per client process: two processes (one when there is a single client)."""
    return _split(concurrency, 2) if concurrency > 1 else [1]


def _replica(addresses: list[str], i: int) -> str:
    """Client process ``i``'s replica: processes are spread over the replicas in turn."""
    return addresses[i % len(addresses)]


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
        conc = opts.conc()
        runs, lats = [], []
        for _ in range(opts.runs):
            results = _run_clients(
                _upsert_client,
                [(cluster.database_url, n, opts.seconds, i * 1000) for i, n in enumerate(_processes(conc))],
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"postgres-upserts c={conc}", "upserts/s", runs, lats)


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
    """Node joins through one replica: 1,000 distinct nodes at concurrency 64."""
    total, conc, replicas = (100 if opts.quick else 1_000), opts.conc(), opts.n_replicas()
    with control_plane(replicas, fsync=opts.fsync) as cluster:
        runs, lats = [], []
        for run in range(opts.runs):
            parts = _processes(conc)
            results = _run_clients(
                _join_client,
                [
                    (_replica(cluster.addresses, i), n, k, f"r{run}p{i}")
                    for i, (n, k) in enumerate(zip(parts, _split(total, len(parts)), strict=True))
                ],
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"joins n={total} c={conc} replicas={replicas}", "joins/s", runs, lats)


def heartbeats(opts: Options) -> None:
    """Heartbeats through one replica: 10,000 heartbeats of 1,000 nodes at concurrency 64."""
    total, nodes_n = (1_000, 100) if opts.quick else (10_000, 1_000)
    conc, replicas = opts.conc(), opts.n_replicas()
    with control_plane(replicas, fsync=opts.fsync) as cluster:
        nodes = _join_all(cluster.addresses[0], nodes_n, "hb")
        runs, lats = [], []
        for _ in range(opts.runs):
            parts = _processes(conc)
            results = _run_clients(
                _heartbeat_client,
                [
                    (_replica(cluster.addresses, i), n, k, nodes[i :: len(parts)])
                    for i, (n, k) in enumerate(zip(parts, _split(total, len(parts)), strict=True))
                ],
            )
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"heartbeats n={total} c={conc} replicas={replicas}", "heartbeats/s", runs, lats)


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
        # Every call changes the mode (so every acknowledged call is one event): start from the
        # opposite of each node's mode now, which an earlier run may have left either way.
        now = [(await stubs[0].GetNode(pb.GetNodeRequest(node_id=n))).node.mode for n in nodes]
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(k: int) -> None:
            nonlocal count
            stub, node_id, mode = stubs[k % len(stubs)], nodes[k], 3 - now[k]
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


def _head(address: str) -> int:
    """The cluster's head revision now (asked before the client processes start, so that a watcher
    whose process starts late still follows from before the first change)."""
    import grpc

    from muster.api.registry.v1 import registry_service_pb2 as pb
    from muster.api.registry.v1 import registry_service_pb2_grpc as g

    with grpc.insecure_channel(address) as ch:
        return g.RegistryServiceStub(ch).GetCluster(pb.GetClusterRequest(), timeout=30).head_revision


def _watch_client(address: str, head: int, seconds: float, start_at: float) -> Result:
    """Follows the stream from ``head`` until the writers stop and it has caught up; reports how
    many events it saw and how long after the writers stopped it reached the final head."""

    async def main() -> Result:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
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
    conc, replicas = opts.conc(), opts.n_replicas(2)
    with control_plane(replicas, fsync=opts.fsync, env={"MUSTER_PROGRESS_INTERVAL": "200ms"}) as cluster:
        nodes = [n for n, _ in _join_all(cluster.addresses[0], conc, "chg")]
        runs, lats, lags = [], [], []
        for _ in range(opts.runs):
            parts = _processes(conc)
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 3.0
            with ctx.Pool(len(parts) + 1) as pool:
                watcher = pool.apply_async(
                    _watch_client, (cluster.addresses[-1], _head(cluster.addresses[-1]), opts.seconds, start_at)
                )
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
        _report(f"state-changes c={conc} replicas={replicas}", "changes/s", runs, lats)
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
        # From the opposite of each node's mode now (an earlier run may have left it either way).
        now = [(await store.get(n)).mode for n in nodes]
        await _sleep_until(start_at)
        t0 = time.monotonic()
        end = t0 + seconds

        async def one(k: int) -> None:
            nonlocal count
            mode = Mode.ACTIVE if now[k] == Mode.DRAINING else Mode.DRAINING
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
    conc = opts.conc()
    with control_plane(1, fsync=opts.fsync, env={"MUSTER_PROGRESS_INTERVAL": "200ms"}) as cluster:
        nodes = [n for n, _ in _join_all(cluster.addresses[0], conc, "log")]
        runs, lats, lags = [], [], []
        for _ in range(opts.runs):
            parts = _processes(conc)
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 3.0
            with ctx.Pool(len(parts) + 1) as pool:
                watcher = pool.apply_async(
                    _watch_client, (cluster.addresses[0], _head(cluster.addresses[0]), opts.seconds, start_at)
                )
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
        _report(f"event-log c={conc} writers={len(parts)} processes (no gRPC)", "changes/s", runs, lats)
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
    conc, replicas = opts.conc(), opts.n_replicas(2)
    with control_plane(replicas, fsync=opts.fsync) as cluster:
        runs, lats = [], []
        for _ in range(opts.runs):
            results = _run_clients(_floor_client, [(cluster.addresses, n, opts.seconds) for n in _processes(conc)])
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"grpc-empty-calls c={conc} replicas={replicas}", "calls/s", runs, lats)


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
    replicas = opts.n_replicas()
    with control_plane(replicas, fsync=opts.fsync, service="locks", workers=opts.workers) as cluster:
        for conc in opts.levels(1, 16, 64):
            runs, lats = [], []
            for run in range(opts.runs):
                args = [
                    (_replica(cluster.addresses, i), n, opts.seconds, [f"r{run}-p{i}-n{k}" for k in range(n)])
                    for i, n in enumerate(_processes(conc))
                ]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
            _report(f"lock-cycles distinct c={conc} replicas={replicas}{_workers_tag(opts)}", "cycles/s", runs, lats)


def locks_contended(opts: Options) -> None:
    """Lock acquire+release cycles on one contended name (FIFO waiters) at concurrency 16 and 64."""
    replicas = opts.n_replicas()
    with control_plane(replicas, fsync=opts.fsync, service="locks", workers=opts.workers) as cluster:
        for conc in opts.levels(16, 64):
            runs, lats, handoffs = [], [], []
            for run in range(opts.runs):
                args = [
                    (_replica(cluster.addresses, i), n, opts.seconds, [f"hot-{run}-{conc}"])
                    for i, n in enumerate(_processes(conc))
                ]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
                marks = sorted(m for r in results for m in r.marks)  # type: ignore[attr-defined]
                # One exclusive holder at a time: the gap from a release's start to the next grant.
                handoffs += [b[0] - a[1] for a, b in zip(marks, marks[1:], strict=False) if b[0] > a[1]]
            _report(f"lock-cycles contended c={conc} replicas={replicas}{_workers_tag(opts)}", "cycles/s", runs, lats)
            if handoffs:
                print(
                    f"lock-handoff contended c={conc} replicas={replicas} "
                    f"median {statistics.median(handoffs) * 1000:.2f} ms "
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
                    placed = await cluster.place_session(f"user-{k}-{i}", kind="bench")
                    lat.append(time.monotonic() - s)
                    if placed.strategy != "sessions":
                        raise AssertionError(f"placed by {placed.strategy!r}, not the sessions strategy")
                    count += 1
                    i += 1

            await asyncio.gather(*(one(k) for k in range(tasks)))
            return Result(count, time.monotonic() - t0, lat)

    return _loop_run(main())


def _balancer_ready(addresses: list[str], nodes: int) -> None:
    """Joins ``nodes`` nodes through the first replica; returns once every replica's balancer shows them ONLINE."""

    async def main() -> None:
        from muster.client import Cluster

        async with Cluster.connect(addresses[0]) as cluster:
            for i in range(nodes):
                await cluster.join_node(f"bench-node-{i}.test", 8787)
        for address in addresses:
            async with Cluster.connect(address) as cluster:
                for _ in range(200):
                    try:
                        status = await cluster.status()
                        if sum(n.state == "ONLINE" for n in status.nodes) >= nodes:
                            break
                    except Exception:  # noqa: BLE001 - still loading its view
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise RuntimeError(f"the balancer at {address} did not see the nodes")

    asyncio.run(main())


def placements(opts: Options) -> None:
    """PlaceSession (reserving) over 100 nodes, strategy sessions, at concurrency 64 through one replica."""
    import base64

    env = {
        "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        # The nodes do not heartbeat here: keep them ONLINE and within the check-in window throughout.
        "MUSTER_HEARTBEAT_INTERVAL": "20m",
        "MUSTER_CHECK_IN_WINDOW": "1h",
        "MUSTER_LEASE_TTL": "1h",
    }
    conc, replicas = opts.conc(), opts.n_replicas()
    with control_plane(replicas, fsync=opts.fsync, env=env, service="registry,keys,balancer") as cluster:
        _balancer_ready(cluster.addresses, 100)
        runs, lats = [], []
        for _ in range(opts.runs):
            args = [(_replica(cluster.addresses, i), n, opts.seconds) for i, n in enumerate(_processes(conc))]
            results = _run_clients(_place_client, args)
            runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
            lats += [x for r in results for x in r.latencies]
        _report(f"placements nodes=100 c={conc} replicas={replicas}", "placements/s", runs, lats)


def _write_revision(path: str, revision: int) -> None:
    """Leaves ``revision`` in ``path`` whole (a tiny local file: fine from the event loop)."""
    Path(path + ".tmp").write_text(str(revision))
    os.replace(path + ".tmp", path)


def _read_revision(path: str) -> int | None:
    try:
        return int(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class FanoutWatchers:
    """What one fan-out watcher process saw."""

    head: int  # the revision its streams were asked to start after (read before any stream opened)
    head_at: float  # when it read that head (monotonic; processes share the clock)
    start: int  # the latest revision a stream of it started after (the head, or its Resync's revision)
    ready_at: float  # when every stream's start was known
    last: dict[int, float]  # per revision, when the last of its streams received it
    gaps: list[str]  # per stream that skipped, duplicated or reordered a revision: what it got wrong


def _fanout_client(address: str, streams: int, done_path: str, ready_path: str, deadline: float) -> FanoutWatchers:
    """Opens ``streams`` watch streams from the head and, once every stream's start is known (the head;
    a Resync's revision when the head is 0), leaves it in ``ready_path`` (the writer starts only when
    every watcher process has); returns, per revision, when
    the last of them received it. A stream stops once it has the writer's last revision (which the
    writer leaves in ``done_path``), or at ``deadline``. Every stream checks that it received every
    revision after the head exactly once, in order (the streams are unfiltered)."""

    async def main() -> FanoutWatchers:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        last: dict[int, float] = {}
        seen: dict[int, int] = {}
        gaps: list[str] = []
        final: int | None = None

        async def wait_for_writer() -> None:
            nonlocal final
            while final is None and time.monotonic() < deadline:
                final = _read_revision(done_path)
                if final is None:
                    await asyncio.sleep(0.05)

        # Four connections per process (own subchannel pools), so that with --workers the kernel
        # spreads the streams over the processes sharing the port.
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)
        ]
        try:
            stubs = [g.RegistryServiceStub(ch) for ch in channels]
            for ch in channels:
                await ch.channel_ready()
            head = (await stubs[0].GetCluster(pb.GetClusterRequest())).head_revision
            head_at = time.monotonic()
            opened = 0
            all_open = asyncio.Event()
            starts: list[int] = []

            def started(at: int) -> None:
                nonlocal opened
                starts.append(at)
                opened += 1
                if opened == streams:
                    all_open.set()

            async def follow(k: int) -> None:
                call = stubs[k % len(stubs)].WatchEvents(pb.WatchEventsRequest(start_revision=head))
                if head:
                    started(head)  # from a revision: the stream starts after it whenever it opens
                at = head
                reading: asyncio.Future | None = None  # never cancelled while following: that would cancel the call
                try:
                    while time.monotonic() < deadline and (final is None or at < final):
                        if reading is None:
                            reading = asyncio.ensure_future(call.read())
                        done, _ = await asyncio.wait({reading}, timeout=0.2)
                        if not done:
                            continue
                        msg, reading = reading.result(), None
                        if msg is grpc.aio.EOF:
                            break
                        if msg.HasField("resync"):  # from revision 0 (a fresh cluster): a snapshot first,
                            at = msg.through_revision  # taken when the stream opened: it starts after that
                            started(at)
                            continue
                        now = time.monotonic()
                        for ev in msg.events.events:
                            if ev.revision != at + 1:
                                gaps.append(f"stream {k}: revision {ev.revision} after {at}")
                            at = max(at, ev.revision)
                            seen[ev.revision] = seen.get(ev.revision, 0) + 1
                            if seen[ev.revision] == streams:
                                last[ev.revision] = now
                    if final is not None and at < final:
                        gaps.append(f"stream {k}: stopped at revision {at} before the last change {final}")
                finally:
                    call.cancel()
                    if reading is not None:
                        reading.cancel()
                        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                            await reading

            ready_at = 0.0

            async def announce() -> None:
                nonlocal ready_at
                await all_open.wait()
                ready_at = time.monotonic()
                _write_revision(ready_path, max(starts))

            await asyncio.gather(wait_for_writer(), announce(), *(follow(k) for k in range(streams)))
        finally:
            for ch in channels:
                await ch.close()
        return FanoutWatchers(head, head_at, max(starts, default=head), ready_at, last, gaps)

    return _loop_run(main())


def _fanout_writer(
    address: str,
    host: str,
    changes: int,
    start_at: float,
    done_path: str,
    ready_paths: list[str],
    server_pids: list[int],
) -> tuple[float, float, list[tuple[int, float]]]:
    """Joins a new node, waits until every watcher process has its streams open (``ready_paths``),
    then drains/undrains the node ``changes`` times; returns when it began and (each change's
    revision, when it was sent), and the CPU seconds the servers spent from the first change until
    0.5 s after the last; leaves the last revision in ``done_path`` for the watchers."""

    async def main() -> tuple[float, float, list[tuple[int, float]]]:
        import grpc

        from muster.api.registry.v1 import node_pb2
        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        draining, active = node_pb2.Node.MODE_DRAINING, node_pb2.Node.MODE_ACTIVE
        out = []
        async with grpc.aio.insecure_channel(address) as ch:
            stub = g.RegistryServiceStub(ch)
            node = (await stub.JoinNode(pb.JoinNodeRequest(host=host, port=8787))).node.id
            await _sleep_until(start_at)
            # A watcher process whose head is read after a change never receives that change (its
            # streams start after it): start only once every one has read its head and opened its streams.
            while any(_read_revision(p) is None for p in ready_paths):  # noqa: ASYNC110 - files, nothing to await
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.0)  # the streams asked for are open by then (a late one would replay)
            began, cpu0 = time.monotonic(), cpu_seconds(server_pids)
            for i in range(changes):
                sent = time.monotonic()
                resp = await stub.SetNodeMode(
                    pb.SetNodeModeRequest(node_id=node, mode=draining if i % 2 == 0 else active, wait_for_revision=True)
                )
                if not resp.revision:
                    raise AssertionError(f"SetNodeMode changed nothing: {resp}")
                out.append((resp.revision, sent))
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)  # the last change's writes drain
            cpu = cpu_seconds(server_pids) - cpu0
        _write_revision(done_path, out[-1][0] if out else 0)
        return began, cpu, out

    return asyncio.run(main())


def fanout(opts: Options) -> None:
    """Event fan-out: a state change reaching all of N = 1, 100, 1,000 watchers (until the last has it)."""
    changes, replicas = (5 if opts.quick else 20), opts.n_replicas()
    # The node written to never heartbeats: keep it within its check-in window (no events but ours).
    env = {"MUSTER_HEARTBEAT_INTERVAL": "20m", "MUSTER_CHECK_IN_WINDOW": "1h", "MUSTER_LEASE_TTL": "1h"}
    with control_plane(replicas, fsync=opts.fsync, env=env, workers=opts.workers) as cluster:
        for n in opts.levels(*((1, 100) if opts.quick else (1, 100, 1000))):
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 4.0
            parts = _processes(n)
            with tempfile.TemporaryDirectory(prefix="muster-bench-fanout-") as tmp, ctx.Pool(len(parts) + 1) as pool:
                done_path = os.path.join(tmp, "done")
                ready = [os.path.join(tmp, f"ready-{i}") for i in range(len(parts))]
                # Only if the writer's last change never arrives: the writer waits for every watcher
                # process first, so this counts from when the last of them could be ready.
                deadline = start_at + 120.0 + changes * 3.0
                watchers = [
                    pool.apply_async(_fanout_client, (_replica(cluster.addresses, i), k, done_path, ready[i], deadline))
                    for i, k in enumerate(parts)
                ]
                # With two replicas the writer uses the last: every change crosses replicas for some watchers.
                writer = pool.apply_async(
                    _fanout_writer,
                    (cluster.addresses[-1], f"fanout-{n}.test", changes, start_at, done_path, ready, cluster.pids),
                )
                began, cpu, sent = writer.get(timeout=600)
                received = [w.get(timeout=600) for w in watchers]
            name = f"fanout watchers={n} replicas={replicas}{_workers_tag(opts)}"
            for i, r in enumerate(received):
                if sent and r.start >= sent[0][0]:  # the barrier above rules it out: a bench bug, say so
                    raise AssertionError(f"{name}: watcher process {i} started after revision {r.start}")
            gaps = [g for r in received for g in r.gaps]
            if gaps:  # a stream that skipped, repeated or reordered a revision: never a benchmark artefact
                raise AssertionError(f"{name}: {len(gaps)} streams got a wrong sequence: {gaps[:5]}")
            delays = []
            for revision, at in sent:
                arrivals = [r.last.get(revision) for r in received]
                if all(a is not None for a in arrivals):
                    delays.append(max(arrivals) - at)  # type: ignore[type-var,operator]
            if len(delays) < len(sent):
                missed = [rev for rev, _ in sent if any(rev not in r.last for r in received)]
                print(
                    f"{name}: revisions {missed} of {[rev for rev, _ in sent]} did not reach every watcher", flush=True
                )
            if delays:
                _report(name, "changes", [len(delays)], delays)
            if n >= 100:  # below that the servers' background work is most of it
                print(
                    f"{name} server CPU per stream message {cpu / (len(sent) * n) * 1e6:.0f} us "
                    f"({cpu:.2f} s for {len(sent)} changes x {n} streams, background work included)",
                    flush=True,
                )


def _list_client(address: str, runs: int, start_at: float) -> list[Result]:
    """``runs`` runs of 5 whole listings each, one after another."""

    async def main() -> list[Result]:
        from muster.client import Cluster

        out = []
        async with Cluster.connect(address) as c:
            await _sleep_until(start_at)
            for _ in range(runs):
                lat = []
                t0 = time.monotonic()
                for _ in range(5):
                    s = time.monotonic()
                    listed = await c.list_nodes()
                    lat.append(time.monotonic() - s)
                out.append(Result(len(listed.nodes), time.monotonic() - t0, lat))
        return out

    return _loop_run(main())


def list_nodes(opts: Options) -> None:
    """ListNodes of every node (all pages of 1,000) with 10,000 nodes joined; one client, one call at a time."""
    total = 1_000 if opts.quick else 10_000
    with control_plane(1, fsync=opts.fsync) as cluster:
        _join_all(cluster.addresses[0], total, "ln")
        results = _run_clients(_list_client, [(cluster.addresses[0], opts.runs)])[0]
        if any(r.count != total for r in results):
            raise AssertionError(f"listed {[r.count for r in results]} nodes of {total}")
        _report(
            f"list-nodes nodes={total}",
            "lists/s",
            [len(r.latencies) / r.elapsed for r in results],
            [x for r in results for x in r.latencies],
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
