"""Heartbeats absorbed: simulated nodes on long-lived KeepAlive streams, each at its interval.

Every node heartbeats once per interval with its phase spread evenly over the interval; each
KeepAlive stream carries the heartbeats of many nodes. A heartbeat's latency is measured from its
*scheduled* send to its answer, so a client or server that falls behind shows as lag.

Two figures, one line each:

- ``heartbeats-absorbed``: N nodes (10,000; 1,000 in quick mode) at the interval the server
  answers in JoinNode (the replica runs with ``MUSTER_HEARTBEAT_INTERVAL=1s`` here);
- ``heartbeats-absorbed max-sustained``: the same nodes at shorter and shorter simulated
  intervals; the highest absorbed rate of a step whose p99 lag stayed under one interval, whose
  answers kept up with the offered rate and in which every node's ``last_seen_time`` moved (a
  failing step is tried once more; the ramp ends at the first step that fails twice).

Each step is checked against the database: every node's ``last_seen_time`` must have moved
during it (by the database's clock), and every node whose heartbeat was answered must be among
them (an acknowledged heartbeat missing from the database fails the workload). Per step, the
details (offered and absorbed rates, lag, the database check, CPU of the replica, of the client
processes and of the whole machine) go to stderr; the clients share the machine with the replica
and PostgreSQL, so read the replica's CPU share before blaming it.
"""

from __future__ import annotations

import asyncio
import collections
import math
import multiprocessing
import multiprocessing.pool
import os
import sys
import time
from dataclasses import dataclass, field

from bench.cluster import control_plane
from bench.workloads import Options, _join_all, _loop_run, _report, _sleep_until

PROCESSES = 2  # client processes (the machine's cores are shared with the replica and PostgreSQL)
STREAMS_PER_PROCESS = 8  # KeepAlive streams per client process
SERVER_INTERVAL = "1s"  # the nodes' interval, answered by JoinNode
KEEP_UP = 0.97  # a step keeps up when its answers reach this share of its offered rate
WARM_UP = 0.2  # share of a step's window before answers are counted
TICK = 0.02  # batched: a stream sends the heartbeats due within each 20 ms tick as one message


@dataclass
class StepResult:
    """One client process's share of one step."""

    offered: int  # heartbeats scheduled within the window
    answered: int  # answers received within the window, after its warm-up
    seconds: float
    lags: list[float]  # per scheduled heartbeat: scheduled send to answer (unanswered: a lower bound)
    unanswered: int = 0
    errors: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0  # this client process's CPU time during the step
    acknowledged: set[int] = field(default_factory=set)  # nodes with at least one answered heartbeat


def _keepalive_client(
    address: str,
    nodes: list[tuple[int, int, float]],
    streams: int,
    interval: float,
    seconds: float,
    start_at: float,
    batched: bool = False,
) -> StepResult:
    """Simulates ``nodes`` (id, lease id, phase in [0, 1)) over ``streams`` KeepAlive streams.

    With ``batched``, each stream sends the heartbeats that are due together as one message
    (``KeepAliveRequest.heartbeats``, what a client keeping many leases alive does), else one
    heartbeat per message."""

    async def main() -> StepResult:
        import grpc

        from muster.api.registry.v1 import node_pb2
        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        load = node_pb2.Load(load1=0.5, load5=0.4, load15=0.3, cpu_count=4, session_count=2)
        per_stream: list[list[tuple[pb.KeepAliveRequest, int, float]]] = [[] for _ in range(streams)]
        for i, (node_id, lease_id, phase) in enumerate(sorted(nodes, key=lambda n: n[2])):
            req = pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=node_id, lease_id=lease_id, load=load))
            per_stream[i % streams].append((req, node_id, phase * interval))
        offered = answered = unanswered = 0
        lags: list[float] = []
        errors: list[str] = []
        acknowledged: set[int] = set()

        async with grpc.aio.insecure_channel(address) as ch:
            await ch.channel_ready()
            stub = g.RegistryServiceStub(ch)
            await _sleep_until(start_at)
            cpu0 = time.process_time()
            t0 = time.monotonic()
            t_end = t0 + seconds
            # Throughput is counted once answers flow (after the first fifth of the window), so
            # that the first answers' latency is not mistaken for a shortfall.
            counted_from = t0 + WARM_UP * seconds

            async def one(beats: list[tuple[pb.KeepAliveRequest, int, float]]) -> None:
                nonlocal offered, answered, unanswered
                call = stub.KeepAlive()
                sent: collections.deque[list[tuple[float, int]]] = collections.deque()

                async def reader() -> None:
                    nonlocal answered
                    try:
                        while True:
                            msg = await call.read()
                            if msg is grpc.aio.EOF:
                                return
                            batch = sent.popleft()
                            failed = {e.index for e in msg.errors}
                            if failed:
                                errors.append(f"{len(failed)} heartbeats failed: {msg.errors[0].message}")
                            now = time.monotonic()
                            for i, (at, node_id) in enumerate(batch):
                                if i in failed:
                                    continue
                                acknowledged.add(node_id)
                                lags.append(now - at)
                                if counted_from <= now <= t_end:
                                    answered += 1
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")

                reading = asyncio.create_task(reader())
                due: list[tuple[pb.KeepAliveRequest, float, int]] = []

                async def flush() -> None:
                    nonlocal offered
                    if not due:
                        return
                    sent.append([(at, node_id) for _, at, node_id in due])
                    offered += len(due)
                    if batched:
                        msg = pb.KeepAliveRequest(heartbeats=[r.heartbeat for r, _, _ in due])
                        due.clear()
                        await call.write(msg)
                    else:
                        req = due[0][0]
                        due.clear()
                        await call.write(req)

                try:
                    base = t0
                    while base < t_end and not reading.done():
                        for req, node_id, offset in beats:
                            at = base + offset
                            if at >= t_end:
                                break
                            # Batched, a stream wakes once per tick and sends what is due by then in one
                            # message (a client beating for many leases); else at each heartbeat's time.
                            send_at = math.ceil(at / TICK) * TICK if batched else at
                            delay = send_at - time.monotonic()
                            if delay > 0.001:  # send everything due, then sleep until the next one
                                await flush()
                                await asyncio.sleep(delay)
                            due.append((req, at, node_id))
                            if not batched or len(due) >= 1_000:
                                await flush()
                        base += interval
                    await flush()
                    await call.done_writing()
                    # Answers still owed get one interval (at least a second) to arrive.
                    await asyncio.wait({reading}, timeout=max(1.0, interval))
                except grpc.aio.AioRpcError:
                    await asyncio.wait({reading}, timeout=1.0)
                finally:
                    reading.cancel()
                    call.cancel()
                now = time.monotonic()
                unanswered += sum(len(b) for b in sent)
                lags.extend(now - at for b in sent for at, _ in b)  # a lower bound of their lag

            await asyncio.gather(*(one(b) for b in per_stream if b))
            cpu = time.process_time() - cpu0
        return StepResult(offered, answered, seconds, lags, unanswered, errors, cpu, acknowledged)

    return _loop_run(main())


# -- measuring the replica -----------------------------------------------------------------------


def _processes() -> dict[int, tuple[int, bytes]]:
    """Every process: pid -> (parent pid, command line)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = (ppid, f.read())
        except (OSError, IndexError, ValueError):
            continue
    return out


def _server_pids() -> list[int]:
    """The replica processes this process started (children running ``muster.cli.main``)."""
    me = os.getpid()
    return [pid for pid, (ppid, cmd) in _processes().items() if ppid == me and b"muster.cli.main" in cmd]


def _postgres_pids() -> list[int]:
    """The embedded PostgreSQL this process started: its postmaster and the postmaster's children."""
    me, procs = os.getpid(), _processes()
    masters = {pid for pid, (ppid, cmd) in procs.items() if ppid == me and b"postgres" in cmd}
    return [*masters, *(pid for pid, (ppid, _) in procs.items() if ppid in masters)]


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    idle = cpu[3] + cpu[4]
    return sum(cpu) - idle, sum(cpu)


async def _db_now(url: str) -> object:
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        return await con.fetchval("SELECT now()")
    finally:
        await con.close()


async def _moved_since(url: str, since: object, ids: list[int]) -> set[int]:
    """Which of ``ids`` have a ``last_seen_time`` at or after ``since`` (the database's clock)."""
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch(
            "SELECT id FROM registry.nodes WHERE id = ANY($1::bigint[]) AND last_seen_time >= $2", ids, since
        )
        return {r["id"] for r in rows}
    finally:
        await con.close()


@dataclass
class Step:
    interval: float
    offered: float  # heartbeats/s scheduled
    absorbed: float  # heartbeats/s answered within the window
    lags: list[float]
    moved: int  # nodes whose last_seen_time moved during the step (database clock)
    nodes: int
    lost: int  # nodes whose heartbeat was answered but whose row did not move (must be 0)
    errors: list[str]
    unanswered: int
    server_cpu: float  # share of one core
    postgres_cpu: float  # share of one core, the postmaster and its backends
    clients_cpu: float  # share of one core, all client processes together
    machine_busy: float  # share of the whole machine

    @property
    def p99(self) -> float:
        lat = sorted(self.lags)
        return lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("inf")

    @property
    def sustained(self) -> bool:
        return (
            not self.errors
            and not self.lost
            and self.moved == self.nodes
            and self.absorbed >= KEEP_UP * self.offered
            and self.p99 < self.interval
        )


def _step(
    pool: multiprocessing.pool.Pool,
    cluster_url: str,
    address: str,
    nodes: list[tuple[int, int]],
    interval: float,
    seconds: float,
    lead: float,
    batched: bool = False,
) -> Step:
    n = len(nodes)
    with_phase = [(node_id, lease_id, i / n) for i, (node_id, lease_id) in enumerate(nodes)]
    shares = [with_phase[i::PROCESSES] for i in range(PROCESSES)]
    since = asyncio.run(_db_now(cluster_url))
    servers = _server_pids()
    start_at = time.monotonic() + lead
    pending = [
        pool.apply_async(_keepalive_client, (address, share, STREAMS_PER_PROCESS, interval, seconds, start_at, batched))
        for share in shares
    ]
    # CPU use over the measured window only (the clients start together at start_at).
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = sum(_cpu_seconds(p) for p in servers)
    pg = _postgres_pids()
    pg0 = sum(_cpu_seconds(p) for p in pg)
    busy0, total0 = _machine_busy()
    time.sleep(seconds)
    cpu1 = sum(_cpu_seconds(p) for p in servers)
    pg1 = sum(_cpu_seconds(p) for p in pg)
    busy1, total1 = _machine_busy()
    results = [p.get(timeout=120) for p in pending]
    moved = asyncio.run(_moved_since(cluster_url, since, [node_id for node_id, _ in nodes]))
    acknowledged = set().union(*(r.acknowledged for r in results))
    return Step(
        interval=interval,
        offered=sum(r.offered for r in results) / seconds,
        absorbed=sum(r.answered for r in results) / ((1 - WARM_UP) * seconds),
        lags=[x for r in results for x in r.lags],
        moved=len(moved),
        nodes=n,
        lost=len(acknowledged - moved),
        errors=[e for r in results for e in r.errors],
        unanswered=sum(r.unanswered for r in results),
        server_cpu=(cpu1 - cpu0) / seconds,
        postgres_cpu=(pg1 - pg0) / seconds,
        clients_cpu=sum(r.cpu_seconds for r in results) / seconds,
        machine_busy=(busy1 - busy0) / max(1, total1 - total0),
    )


def _describe(s: Step) -> str:
    lat = sorted(s.lags)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    verdict = "sustained" if s.sustained else "NOT sustained"
    extra = f" errors {len(s.errors)} (first: {s.errors[0]})" if s.errors else ""
    return (
        f"  interval {s.interval * 1000:.0f} ms: offered {s.offered:,.0f}/s absorbed {s.absorbed:,.0f}/s "
        f"lag p50 {p50:.1f} ms p99 {s.p99 * 1000:.1f} ms, unanswered {s.unanswered}, "
        f"db: {s.moved}/{s.nodes} nodes' last_seen_time moved ({s.lost} answered but not moved); "
        f"cpu: replica {s.server_cpu:.0%} ({s.server_cpu / max(s.absorbed, 1) * 1e6:.0f} us/heartbeat) "
        f"postgres {s.postgres_cpu:.0%} clients {s.clients_cpu:.0%} machine {s.machine_busy:.0%} -> {verdict}{extra}"
    )


def heartbeats_absorbed(opts: Options) -> None:
    """Heartbeats absorbed: 10,000 nodes at their interval over KeepAlive streams, then the max sustained rate."""
    n = 1_000 if opts.quick else 10_000
    seconds = 1.5 if opts.quick else max(2.0, opts.seconds)
    # The ramp's offered rates (heartbeats/s); each step's simulated interval is n / rate.
    ramp = (
        (2_000, 5_000, 10_000, 20_000)
        if opts.quick
        else (5_000, 7_500, 8_750, 10_000, 12_500, 15_000, 20_000, 25_000, 30_000, 40_000)
    )
    env = {
        "MUSTER_HEARTBEAT_INTERVAL": SERVER_INTERVAL,
        # Joining 10,000 nodes takes a while: nobody may expire or go suspect meanwhile.
        "MUSTER_CHECK_IN_WINDOW": "5m",
        "MUSTER_LEASE_TTL": "10m",
        "MUSTER_REAP_INTERVAL": "1s",
    }
    with control_plane(1, fsync=opts.fsync, env=env) as cluster:
        address = cluster.addresses[0]
        nodes = _join_all(address, n, "hba")
        interval = _answered_interval(address)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(PROCESSES) as pool:
            lead = 3.0  # spawned interpreters need a moment to import gRPC
            for batched in (False, True):
                lead = _series(pool, cluster.database_url, address, nodes, interval, seconds, ramp, opts, lead, batched)


def _series(
    pool: multiprocessing.pool.Pool,
    database_url: str,
    address: str,
    nodes: list[tuple[int, int]],
    interval: float,
    seconds: float,
    ramp: tuple[int, ...],
    opts: Options,
    lead: float,
    batched: bool,
) -> float:
    """The at-interval figure and the ramp, with one heartbeat per message or (``batched``) the
    heartbeats due together in one message; returns the lead for the next step."""
    n, streams = len(nodes), PROCESSES * STREAMS_PER_PROCESS
    name = "heartbeats-absorbed batched" if batched else "heartbeats-absorbed"
    runs, lats = [], []
    how = "heartbeats due together in one message" if batched else "one heartbeat per message"
    print(f"# {name}: {n:,} nodes, {streams} KeepAlive streams, {how}", file=sys.stderr, flush=True)
    for _ in range(opts.runs):
        s = _step(pool, database_url, address, nodes, interval, max(seconds, interval), lead, batched)
        lead = 1.0
        print(_describe(s), file=sys.stderr, flush=True)
        if s.lost:
            raise AssertionError(f"answered heartbeats missing from the database: {_describe(s)}")
        runs.append(s.absorbed)
        lats += s.lags
    _report(
        f"{name} nodes={n} interval={interval * 1000:.0f}ms streams={streams} replicas=1", "heartbeats/s", runs, lats
    )
    best: Step | None = None
    for rate in ramp:
        step_interval = n / rate
        # A step that fails is tried once more (the machine is shared: one hiccup must not
        # end the ramp); the ramp ends at the first step that fails twice.
        for _ in range(2):
            # At least one whole interval, so that every node heartbeats during the step.
            step_seconds = max(seconds, step_interval)
            s = _step(pool, database_url, address, nodes, step_interval, step_seconds, lead, batched)
            print(_describe(s), file=sys.stderr, flush=True)
            if s.lost:
                raise AssertionError(f"answered heartbeats missing from the database: {_describe(s)}")
            if s.sustained:
                break
        if not s.sustained:
            break
        best = s
    if best is None:
        print(f"{name} max-sustained: no step of the ramp was sustained", flush=True)
    else:
        _report(
            f"{name} max-sustained nodes={n} interval={best.interval * 1000:.0f}ms streams={streams} replicas=1",
            "heartbeats/s",
            [best.absorbed],
            best.lags,
        )
    return lead


def _answered_interval(address: str) -> float:
    """The heartbeat interval the replica answers (what a real node would use)."""

    async def main() -> float:
        import grpc

        from muster.api.registry.v1 import registry_service_pb2 as pb
        from muster.api.registry.v1 import registry_service_pb2_grpc as g

        async with grpc.aio.insecure_channel(address) as ch:
            r = await g.RegistryServiceStub(ch).JoinNode(pb.JoinNodeRequest(host="hba-probe", port=8787))
            return r.heartbeat_interval.ToMilliseconds() / 1000

    return asyncio.run(main())


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    heartbeats_absorbed(
        Options(runs=1 if quick else 3, seconds=1.0 if quick else 5.0, concurrency=64, fsync=True, quick=quick)
    )
