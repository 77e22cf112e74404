"""The reference peer: the comparable workloads against a private etcd 3.4 (``--against etcd``).

After each comparable Muster workload, the same shape of work runs against a fresh etcd started
for it (Debian's ``etcd-server``: one member on loopback, free ports, its own temporary data
directory, its default durability — the WAL is fsynced), driven from the same number of client
processes and tasks over a Python grpc.aio client of the etcd v3 API (the stubs ``aetcd`` ships):

- ``locks`` / ``locks-contended``: etcd's standard lock recipe, what ``concurrency.Mutex`` does;
- ``fanout``: one put to N watchers, one ``Watch`` stream each;
- ``heartbeats-absorbed``: lease keep-alives over a few ``LeaseKeepAlive`` streams, the same ramp;
- ``changes``: puts from 64 writers, a watcher following.

Each prints its own figure lines (``etcd ...``); at the end of the run :func:`print_comparison`
prints one line per compared figure, ``<workload> muster X etcd Y ratio Z``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.pool
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from bench import heartbeats
from bench.workloads import (
    FIGURES,
    Figure,
    Options,
    Result,
    _loop_run,
    _processes,
    _read_revision,
    _report,
    _run_clients,
    _sleep_until,
    _write_revision,
)

INSTALL = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server"
LOCK_TTL = 10  # seconds: the session lease of a lock client (Muster's cycles ask ttl=10s)


# -- the server ----------------------------------------------------------------------------------


def binary() -> str | None:
    """The etcd binary, or None when it is not installed."""
    return shutil.which("etcd") or (os.path.exists("/usr/bin/etcd") and "/usr/bin/etcd") or None


def missing() -> str | None:
    """Why ``--against etcd`` cannot run here (with the command that fixes it), or None."""
    if binary() is None:
        return f"etcd is not installed; install Debian's etcd 3.4 with:\n  {INSTALL}"
    try:
        import aetcd.rpc  # noqa: F401 - the v3 stubs the clients use
    except ImportError as e:
        return f"the etcd v3 stubs are missing ({e}); install the dev extra: pip install -e '.[dev]'"
    return None


def version() -> str:
    """``etcd 3.4.x`` as the binary says."""
    out = subprocess.run([binary() or "etcd", "--version"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else "etcd"
    return "etcd " + first.split(":", 1)[1].strip() if ":" in first else first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Etcd:
    """A running private etcd."""

    address: str
    pid: int


@contextlib.contextmanager
def server() -> Iterator[Etcd]:
    """Starts one etcd member on loopback (its own data directory, default durability); stops it
    by its pid at the end."""
    with tempfile.TemporaryDirectory(prefix="muster-bench-etcd-") as tmp:
        client, peer = _free_port(), _free_port()
        while peer == client:
            peer = _free_port()
        log = open(os.path.join(tmp, "etcd.log"), "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [
                binary() or "etcd",
                "--name=bench",
                f"--data-dir={tmp}/data",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=bench=http://127.0.0.1:{peer}",
                "--initial-cluster-state=new",
                "--logger=zap",
                "--log-level=error",
                "--max-concurrent-streams=100000",  # 1,000 watch streams share one connection per process
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            address = f"127.0.0.1:{client}"
            _wait_ready(address, proc, os.path.join(tmp, "etcd.log"))
            yield Etcd(address, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            log.close()


def _wait_ready(address: str, proc: subprocess.Popen, log_path: str) -> None:
    async def ping() -> None:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            await rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=b"ping"), timeout=2)

    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"etcd exited with {proc.returncode}: {f.read()[-2000:]}")
        try:
            asyncio.run(ping())
            return
        except Exception:  # noqa: BLE001 - not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


# -- comparisons ---------------------------------------------------------------------------------


@dataclass
class Pair:
    """One compared figure: a Muster figure and etcd's, from the same run."""

    label: str
    muster: Figure
    etcd: Figure
    metric: str  # "rate": the value (higher is better); "p99"/"p50": latency in ms (lower is better)


PAIRS: list[Pair] = []


def _find(figures: list[Figure], prefix: str) -> Figure | None:
    return next((f for f in figures if f.name.startswith(prefix)), None)


def _pair(label: str, muster: Figure | None, etcd: Figure | None, metric: str) -> None:
    if muster is not None and etcd is not None:
        PAIRS.append(Pair(label, muster, etcd, metric))


def comparison_lines() -> list[str]:
    """``<workload> muster X etcd Y ratio Z`` for every compared figure, ratio = muster / etcd."""
    out = []
    for p in PAIRS:
        if p.metric == "rate":
            m, e = p.muster.value, p.etcd.value
            ratio = m / e if e else float("inf")
            out.append(
                f"{p.label} muster {m:,.0f} etcd {e:,.0f} ratio {ratio:.2f} "
                f"({p.muster.unit}; ratio muster/etcd, above 1: muster faster)"
            )
        else:
            m, e = getattr(p.muster, f"{p.metric}_ms"), getattr(p.etcd, f"{p.metric}_ms")
            ratio = m / e if e else float("inf")
            out.append(
                f"{p.label} {p.metric} muster {m:.2f} ms etcd {e:.2f} ms ratio {ratio:.2f} "
                f"(latency; ratio muster/etcd, below 1: muster faster)"
            )
    return out


def print_comparison() -> None:
    """Prints the comparison lines (nothing when no pair was measured)."""
    if not PAIRS:
        return
    print(f"# muster against {version()}, same run (ratio = muster / etcd)", flush=True)
    for line in comparison_lines():
        print(line, flush=True)


# -- locks: etcd's concurrency.Mutex -------------------------------------------------------------


class _Watches:
    """Watches multiplexed on one ``Watch`` stream (as etcd's Go client does), each waiting for its
    key's deletion; the client picks the watch ids."""

    def __init__(self, stub: object) -> None:
        self._call = stub.Watch()  # type: ignore[attr-defined]
        self._next = 1
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._writing = asyncio.Lock()
        self._reader = asyncio.create_task(self._read())

    async def _write(self, req: object) -> None:
        async with self._writing:
            await self._call.write(req)

    async def wait_deleted(self, key: bytes, revision: int) -> None:
        """Returns once ``key`` is deleted at or after ``revision``."""
        from aetcd.rpc import rpc_pb2

        wid, self._next = self._next, self._next + 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[wid] = fut
        try:
            await self._write(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(key=key, start_revision=revision, watch_id=wid)
                )
            )
            await fut
        finally:
            self._waiting.pop(wid, None)
            await self._write(rpc_pb2.WatchRequest(cancel_request=rpc_pb2.WatchCancelRequest(watch_id=wid)))

    async def _read(self) -> None:
        from aetcd.rpc import kv_pb2

        async for resp in self._call:
            fut = self._waiting.get(resp.watch_id)
            if fut is None or fut.done():
                continue
            if resp.canceled and not resp.created:
                fut.set_exception(RuntimeError(f"watch {resp.watch_id} canceled: {resp.cancel_reason}"))
            elif any(ev.type == kv_pb2.Event.DELETE for ev in resp.events):
                fut.set_result(None)

    async def close(self) -> None:
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


async def _keep_leases_alive(lease_stub: object, leases: list[int], ttl: float) -> None:
    """The session's background keep-alive: every lease every ttl/3 on one stream (as the Go client)."""
    from aetcd.rpc import rpc_pb2

    call = lease_stub.LeaseKeepAlive()  # type: ignore[attr-defined]

    async def drain() -> None:
        async for _ in call:
            pass

    reading = asyncio.create_task(drain())
    try:
        while True:
            await asyncio.sleep(ttl / 3)
            for lease in leases:
                await call.write(rpc_pb2.LeaseKeepAliveRequest(ID=lease))
    finally:
        call.cancel()
        reading.cancel()


def _lock_client(address: str, tasks: int, seconds: float, names: list[str], start_at: float) -> Result:
    """Lock + unlock cycles by etcd's recipe; latencies are whole cycles. Records (acquired,
    released) times, as the Muster lock client does."""

    async def main() -> Result:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            kv, lease_stub = rpc_pb2_grpc.KVStub(ch), rpc_pb2_grpc.LeaseStub(ch)
            watches = _Watches(rpc_pb2_grpc.WatchStub(ch))
            # One session (lease) per task, as each competitor of concurrency.Mutex holds its own.
            leases = [(await lease_stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=LOCK_TTL))).ID for _ in range(tasks)]
            keeping = asyncio.create_task(_keep_leases_alive(lease_stub, leases, LOCK_TTL))
            create, ascend, descend = (
                rpc_pb2.RangeRequest.CREATE,
                rpc_pb2.RangeRequest.ASCEND,
                rpc_pb2.RangeRequest.DESCEND,
            )
            lat: list[float] = []
            marks: list[tuple[float, float]] = []
            count = 0
            await _sleep_until(start_at)
            t0 = time.monotonic()
            end = t0 + seconds

            async def one(k: int) -> None:
                nonlocal count
                pfx = names[k % len(names)].encode() + b"/"
                lease = leases[k]
                key = pfx + f"{lease:x}".encode()
                owner = rpc_pb2.RangeRequest(
                    key=pfx, range_end=_prefix_end(pfx), sort_target=create, sort_order=ascend, limit=1
                )
                txn = rpc_pb2.TxnRequest(
                    compare=[
                        rpc_pb2.Compare(
                            result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=key, create_revision=0
                        )
                    ],
                    success=[
                        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=b"", lease=lease)),
                        rpc_pb2.RequestOp(request_range=owner),
                    ],
                    failure=[
                        rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key)),
                        rpc_pb2.RequestOp(request_range=owner),
                    ],
                )
                unlock = rpc_pb2.DeleteRangeRequest(key=key)
                while time.monotonic() < end:
                    s = time.monotonic()
                    # Lock: put my key (create revision 0 compare) and fetch the owner in one Txn.
                    resp = await kv.Txn(txn)
                    mine = resp.header.revision
                    if not resp.succeeded:
                        mine = resp.responses[0].response_range.kvs[0].create_revision
                    first = resp.responses[1].response_range.kvs
                    if first and first[0].create_revision != mine:
                        # waitDeletes: the last key created before mine, until there is none.
                        while True:
                            before = await kv.Range(
                                rpc_pb2.RangeRequest(
                                    key=pfx,
                                    range_end=_prefix_end(pfx),
                                    sort_target=create,
                                    sort_order=descend,
                                    limit=1,
                                    max_create_revision=mine - 1,
                                )
                            )
                            if not before.kvs:
                                break
                            await watches.wait_deleted(before.kvs[0].key, before.header.revision)
                    got = time.monotonic()
                    await kv.DeleteRange(unlock)  # Unlock
                    lat.append(time.monotonic() - s)
                    marks.append((got, time.monotonic()))
                    count += 1

            await asyncio.gather(*(one(k) for k in range(tasks)))
            elapsed = time.monotonic() - t0
            keeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeping
            await watches.close()
            for lease in leases:
                await lease_stub.LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=lease))
            result = Result(count, elapsed, lat)
            result.marks = marks  # type: ignore[attr-defined]
            return result

    return _loop_run(main())


def locks(opts: Options, muster: list[Figure]) -> None:
    """etcd lock cycles on distinct names at concurrency 1, 16 and 64 (concurrency.Mutex's recipe)."""
    with server() as etcd:
        for conc in opts.levels(1, 16, 64):
            runs, lats = [], []
            for run in range(opts.runs):
                args = [
                    (etcd.address, n, opts.seconds, [f"r{run}-p{i}-n{k}" for k in range(n)])
                    for i, n in enumerate(_processes(conc))
                ]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
            _report(f"etcd lock-cycles distinct c={conc}", "cycles/s", runs, lats)
            label = f"lock-cycles distinct c={conc}"
            _pair(label, _find(muster, label + " "), FIGURES[-1], "rate")


def locks_contended(opts: Options, muster: list[Figure]) -> None:
    """etcd lock cycles on one contended name at concurrency 16 and 64 (waiters watch their predecessor)."""
    import statistics

    with server() as etcd:
        for conc in opts.levels(16, 64):
            runs, lats, handoffs = [], [], []
            for run in range(opts.runs):
                args = [(etcd.address, n, opts.seconds, [f"hot-{run}-{conc}"]) for n in _processes(conc)]
                results = _run_clients(_lock_client, args)
                runs.append(sum(r.count for r in results) / max(r.elapsed for r in results))
                lats += [x for r in results for x in r.latencies]
                marks = sorted(m for r in results for m in r.marks)  # type: ignore[attr-defined]
                handoffs += [b[0] - a[1] for a, b in zip(marks, marks[1:], strict=False) if b[0] > a[1]]
            _report(f"etcd lock-cycles contended c={conc}", "cycles/s", runs, lats)
            if handoffs:
                print(
                    f"etcd lock-handoff contended c={conc} median {statistics.median(handoffs) * 1000:.2f} ms "
                    f"(release done to the next holder's lock returned, n={len(handoffs)})",
                    flush=True,
                )
            label = f"lock-cycles contended c={conc}"
            got = _find(muster, label + " ")
            _pair(label, got, FIGURES[-1], "rate")
            _pair(label, got, FIGURES[-1], "p99")


# -- fan-out: one put to N watchers --------------------------------------------------------------


def _fanout_client(
    address: str, streams: int, key: bytes, done_path: str, ready_path: str, deadline: float
) -> dict[int, float]:
    """Opens ``streams`` Watch streams on ``key`` from the current revision, and leaves that revision in
    ``ready_path`` (the writer starts only when every watcher process has: a process that read it
    after a put would never see that put); returns, per revision, when the last of them received it
    (they stop once all hold the writer's last revision)."""

    async def main() -> dict[int, float]:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        last: dict[int, float] = {}
        seen: dict[int, int] = {}
        async with grpc.aio.insecure_channel(address) as ch:
            await ch.channel_ready()
            head = (await rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=key))).header.revision
            watch = rpc_pb2_grpc.WatchStub(ch)
            create = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(key=key, start_revision=head + 1))
            calls = [watch.Watch() for _ in range(streams)]
            at = [head] * streams
            _write_revision(ready_path, head)

            async def follow(i: int) -> None:
                call = calls[i]
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await call.write(create)
                    while True:
                        msg = await call.read()
                        if msg is grpc.aio.EOF:
                            return
                        now = time.monotonic()
                        for ev in msg.events:
                            rev = ev.kv.mod_revision
                            at[i] = max(at[i], rev)
                            seen[rev] = seen.get(rev, 0) + 1
                            if seen[rev] == streams:
                                last[rev] = now

            async def stop() -> None:
                final = None
                while time.monotonic() < deadline:
                    final = final or _read_revision(done_path)
                    if final is not None and min(at) >= final:
                        break
                    await asyncio.sleep(0.05)
                for c in calls:
                    c.cancel()

            await asyncio.gather(stop(), *(follow(i) for i in range(streams)))
        return last

    return _loop_run(main())


def _fanout_writer(
    address: str, key: bytes, changes: int, start_at: float, done_path: str, ready_paths: list[str]
) -> list[tuple[int, float]]:
    """Once every watcher process is ready, puts ``key`` ``changes`` times, 0.2 s apart; returns (the
    put's revision, when it was sent)."""

    async def main() -> list[tuple[int, float]]:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        out = []
        async with grpc.aio.insecure_channel(address) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            await ch.channel_ready()
            await _sleep_until(start_at)
            while any(_read_revision(p) is None for p in ready_paths):  # noqa: ASYNC110 - files, nothing to await
                await asyncio.sleep(0.05)
            await asyncio.sleep(2.0)  # every stream is open by then
            for i in range(changes):
                sent = time.monotonic()
                resp = await kv.Put(rpc_pb2.PutRequest(key=key, value=b"draining" if i % 2 == 0 else b"active"))
                out.append((resp.header.revision, sent))
                await asyncio.sleep(0.2)
        _write_revision(done_path, out[-1][0] if out else 0)
        return out

    return asyncio.run(main())


def fanout(opts: Options, muster: list[Figure]) -> None:
    """etcd fan-out: one put reaching all of N watchers (one Watch stream each), until the last has it."""
    changes = 5 if opts.quick else 20
    with server() as etcd:
        for n in opts.levels(*((1, 100) if opts.quick else (1, 100, 1000))):
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 4.0
            deadline = start_at + 120.0 + changes * 3.0  # the writer first waits for every watcher process
            parts = _processes(n)
            key = f"bench/fanout/{n}".encode()
            with tempfile.TemporaryDirectory(prefix="muster-bench-fanout-") as tmp, ctx.Pool(len(parts) + 1) as pool:
                done_path = os.path.join(tmp, "done")
                ready = [os.path.join(tmp, f"ready-{i}") for i in range(len(parts))]
                watchers = [
                    pool.apply_async(_fanout_client, (etcd.address, k, key, done_path, ready[i], deadline))
                    for i, k in enumerate(parts)
                ]
                writer = pool.apply_async(_fanout_writer, (etcd.address, key, changes, start_at, done_path, ready))
                sent = writer.get(timeout=600)
                received = [w.get(timeout=600) for w in watchers]
            delays = []
            for revision, at in sent:
                arrivals = [r.get(revision) for r in received]
                if all(a is not None for a in arrivals):
                    delays.append(max(arrivals) - at)  # type: ignore[type-var,operator]
            name = f"etcd fanout watchers={n}"
            if len(delays) < len(sent):
                print(f"{name}: {len(sent) - len(delays)} of {len(sent)} puts did not reach every watcher", flush=True)
            if delays:
                _report(name, "changes", [len(delays)], delays)
                label = f"fanout watchers={n}"
                got = _find(muster, label + " ")
                _pair(label, got, FIGURES[-1], "p50")
                _pair(label, got, FIGURES[-1], "p99")


# -- lease keep-alives (against heartbeats-absorbed) ---------------------------------------------


def _keepalive_client(
    address: str,
    leases: list[tuple[int, float]],
    streams: int,
    interval: float,
    seconds: float,
    start_at: float,
) -> heartbeats.StepResult:
    """Keeps ``leases`` (id, phase in [0, 1)) alive over ``streams`` LeaseKeepAlive streams, each
    once per ``interval`` at its phase (the shape of bench.heartbeats' KeepAlive client)."""

    async def main() -> heartbeats.StepResult:
        import collections

        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        per_stream: list[list[tuple[object, int, float]]] = [[] for _ in range(streams)]
        for i, (lease, phase) in enumerate(sorted(leases, key=lambda n: n[1])):
            per_stream[i % streams].append((rpc_pb2.LeaseKeepAliveRequest(ID=lease), lease, phase * interval))
        offered = answered = unanswered = 0
        lags: list[float] = []
        errors: list[str] = []
        acknowledged: set[int] = set()

        async with grpc.aio.insecure_channel(address) as ch:
            await ch.channel_ready()
            stub = rpc_pb2_grpc.LeaseStub(ch)
            await _sleep_until(start_at)
            cpu0 = time.process_time()
            t0 = time.monotonic()
            t_end = t0 + seconds
            counted_from = t0 + heartbeats.WARM_UP * seconds

            async def one(beats: list[tuple[object, int, float]]) -> None:
                nonlocal offered, answered, unanswered
                call = stub.LeaseKeepAlive()
                sent: collections.deque[tuple[float, int]] = collections.deque()

                async def reader() -> None:
                    nonlocal answered
                    try:
                        while True:
                            msg = await call.read()
                            if msg is grpc.aio.EOF:
                                return
                            at, lease = sent.popleft()
                            if msg.ID != lease or msg.TTL <= 0:
                                errors.append(f"lease {lease}: answered {msg.ID} ttl {msg.TTL}")
                            else:
                                acknowledged.add(lease)
                            now = time.monotonic()
                            lags.append(now - at)
                            if counted_from <= now <= t_end:
                                answered += 1
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")

                reading = asyncio.create_task(reader())
                try:
                    base = t0
                    while base < t_end and not reading.done():
                        for req, lease, offset in beats:
                            at = base + offset
                            if at >= t_end:
                                break
                            delay = at - time.monotonic()
                            if delay > 0.001:
                                await asyncio.sleep(delay)
                            sent.append((at, lease))
                            offered += 1
                            await call.write(req)
                        base += interval
                    await call.done_writing()
                    await asyncio.wait({reading}, timeout=max(1.0, interval))
                except grpc.aio.AioRpcError:
                    await asyncio.wait({reading}, timeout=1.0)
                finally:
                    reading.cancel()
                    call.cancel()
                now = time.monotonic()
                unanswered += len(sent)
                lags.extend(now - at for at, _ in sent)

            await asyncio.gather(*(one(b) for b in per_stream if b))
            cpu = time.process_time() - cpu0
        return heartbeats.StepResult(offered, answered, seconds, lags, unanswered, errors, cpu, acknowledged)

    return _loop_run(main())


def _grant_all(address: str, count: int, ttl: int) -> list[int]:
    async def main() -> list[int]:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            stub = rpc_pb2_grpc.LeaseStub(ch)
            sem = asyncio.Semaphore(64)

            async def one() -> int:
                async with sem:
                    return (await stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=ttl))).ID

            return list(await asyncio.gather(*(one() for _ in range(count))))

    return asyncio.run(main())


def _keepalive_step(
    pool: multiprocessing.pool.Pool,
    etcd: Etcd,
    leases: list[int],
    interval: float,
    seconds: float,
    lead: float,
) -> heartbeats.Step:
    n = len(leases)
    with_phase = [(lease, i / n) for i, lease in enumerate(leases)]
    shares = [with_phase[i :: heartbeats.PROCESSES] for i in range(heartbeats.PROCESSES)]
    start_at = time.monotonic() + lead
    pending = [
        pool.apply_async(
            _keepalive_client, (etcd.address, share, heartbeats.STREAMS_PER_PROCESS, interval, seconds, start_at)
        )
        for share in shares
    ]
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu0 = heartbeats._cpu_seconds(etcd.pid)
    busy0, total0 = heartbeats._machine_busy()
    time.sleep(seconds)
    cpu1 = heartbeats._cpu_seconds(etcd.pid)
    busy1, total1 = heartbeats._machine_busy()
    results = [p.get(timeout=120) for p in pending]
    acknowledged = set().union(*(r.acknowledged for r in results))
    return heartbeats.Step(
        interval=interval,
        offered=sum(r.offered for r in results) / seconds,
        absorbed=sum(r.answered for r in results) / ((1 - heartbeats.WARM_UP) * seconds),
        lags=[x for r in results for x in r.lags],
        moved=len(acknowledged),  # leases renewed (answered with a TTL) during the step
        nodes=n,
        lost=0,
        errors=[e for r in results for e in r.errors],
        unanswered=sum(r.unanswered for r in results),
        server_cpu=(cpu1 - cpu0) / seconds,
        postgres_cpu=0.0,
        clients_cpu=sum(r.cpu_seconds for r in results) / seconds,
        machine_busy=(busy1 - busy0) / max(1, total1 - total0),
    )


def _describe(s: heartbeats.Step) -> str:
    """bench.heartbeats' step line, in etcd's words (leases renewed, etcd's CPU)."""
    return (
        heartbeats._describe(s)
        .replace("db: ", "etcd: ")
        .replace("nodes' last_seen_time moved", "leases renewed")
        .replace(f" ({s.lost} answered but not moved)", "")
        .replace("replica ", "etcd ")
        .replace("us/heartbeat", "us/keep-alive")
    )


def keepalives(opts: Options, muster: list[Figure]) -> None:
    """etcd lease keep-alives: 10,000 leases at a 1 s interval over 16 LeaseKeepAlive streams, then the
    same ramp as heartbeats-absorbed (the max sustained rate)."""
    n = 1_000 if opts.quick else 10_000
    seconds = 1.5 if opts.quick else max(2.0, opts.seconds)
    ramp = (2_000, 5_000, 10_000, 20_000) if opts.quick else (5_000, 7_500, 10_000, 12_500, 15_000, 20_000, 25_000)
    interval = 1.0  # as the Muster replica answers in JoinNode (MUSTER_HEARTBEAT_INTERVAL=1s)
    streams = heartbeats.PROCESSES * heartbeats.STREAMS_PER_PROCESS
    with server() as etcd:
        leases = _grant_all(etcd.address, n, 600)  # long: nobody expires while they are granted
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(heartbeats.PROCESSES) as pool:
            lead = 3.0
            runs, lats = [], []
            print(f"# etcd lease-keepalives: {n:,} leases, {streams} streams", file=sys.stderr, flush=True)
            for _ in range(opts.runs):
                s = _keepalive_step(pool, etcd, leases, interval, max(seconds, interval), lead)
                lead = 1.0
                print(_describe(s), file=sys.stderr, flush=True)
                runs.append(s.absorbed)
                lats += s.lags
            _report(
                f"etcd lease-keepalives leases={n} interval={interval * 1000:.0f}ms streams={streams}",
                "keepalives/s",
                runs,
                lats,
            )
            _pair("heartbeats-absorbed at-interval", _find(muster, "heartbeats-absorbed nodes="), FIGURES[-1], "rate")
            best: heartbeats.Step | None = None
            for rate in ramp:
                step_interval = n / rate
                for _ in range(2):
                    s = _keepalive_step(pool, etcd, leases, step_interval, max(seconds, step_interval), lead)
                    print(_describe(s), file=sys.stderr, flush=True)
                    if s.sustained:
                        break
                if not s.sustained:
                    break
                best = s
            if best is None:
                print("etcd lease-keepalives max-sustained: no step of the ramp was sustained", flush=True)
                return
            _report(
                f"etcd lease-keepalives max-sustained leases={n} interval={best.interval * 1000:.0f}ms "
                f"streams={streams}",
                "keepalives/s",
                [best.absorbed],
                best.lags,
            )
            _pair(
                "heartbeats-absorbed max-sustained",
                _find(muster, "heartbeats-absorbed max-sustained"),
                FIGURES[-1],
                "rate",
            )


# -- puts from 64 writers (against state-changes) ------------------------------------------------


def _put_client(address: str, tasks: int, seconds: float, keys: list[str], start_at: float) -> Result:
    """Every task puts its own key back to back; latencies are one Put."""

    async def main() -> Result:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            await ch.channel_ready()
            lat: list[float] = []
            count = 0
            await _sleep_until(start_at)
            t0 = time.monotonic()
            end = t0 + seconds

            async def one(k: int) -> None:
                nonlocal count
                reqs = [rpc_pb2.PutRequest(key=keys[k].encode(), value=v) for v in (b"draining", b"active")]
                i = 0
                while time.monotonic() < end:
                    s = time.monotonic()
                    await kv.Put(reqs[i % 2])
                    lat.append(time.monotonic() - s)
                    count += 1
                    i += 1

            await asyncio.gather(*(one(k) for k in range(tasks)))
            return Result(count, time.monotonic() - t0, lat)

    return _loop_run(main())


def _put_watcher(address: str, prefix: bytes, head: int, seconds: float, start_at: float) -> Result:
    """Watches ``prefix`` from ``head``, checking revisions only grow, until the writers stop and it
    holds the final revision; reports how many puts it saw and how late it caught up."""

    async def main() -> Result:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            kv = rpc_pb2_grpc.KVStub(ch)
            call = rpc_pb2_grpc.WatchStub(ch).Watch()
            await call.write(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(
                        key=prefix, range_end=_prefix_end(prefix), start_revision=head + 1
                    )
                )
            )
            seen, last, last_at = 0, head, 0.0
            writers_end = start_at + seconds
            final: int | None = None
            caught_up = asyncio.Event()

            async def follow() -> None:
                nonlocal seen, last, last_at
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    async for msg in call:
                        for ev in msg.events:
                            if ev.kv.mod_revision <= last:
                                raise AssertionError(f"out of order: {last} -> {ev.kv.mod_revision}")
                            last = ev.kv.mod_revision
                            seen += 1
                        if msg.events:
                            last_at = time.monotonic()
                        if final is not None and last >= final:
                            caught_up.set()

            async def stop() -> None:
                nonlocal final
                # etcd's progress notifications come every 10 minutes: ask for the head instead.
                await asyncio.sleep(max(0.0, writers_end + 0.5 - time.monotonic()))
                final = (await kv.Range(rpc_pb2.RangeRequest(key=prefix, count_only=True))).header.revision
                if last >= final:
                    caught_up.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(caught_up.wait(), 60)
                call.cancel()

            await asyncio.gather(follow(), stop())
            return Result(seen, max(0.0, last_at - writers_end), [])

    return _loop_run(main())


def puts(opts: Options, muster: list[Figure]) -> None:
    """etcd puts from 64 writers (each its own key) in two processes, a watcher following the prefix."""
    conc = opts.conc()
    prefix = b"bench/puts/"

    async def head(address: str) -> int:
        import grpc
        from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

        async with grpc.aio.insecure_channel(address) as ch:
            return (await rpc_pb2_grpc.KVStub(ch).Range(rpc_pb2.RangeRequest(key=prefix))).header.revision

    with server() as etcd:
        runs, lats, lags = [], [], []
        keys = [f"{prefix.decode()}{k}" for k in range(conc)]
        for _ in range(opts.runs):
            parts = _processes(conc)
            ctx = multiprocessing.get_context("spawn")
            start_at = time.monotonic() + 3.0
            with ctx.Pool(len(parts) + 1) as pool:
                watcher = pool.apply_async(
                    _put_watcher, (etcd.address, prefix, asyncio.run(head(etcd.address)), opts.seconds, start_at)
                )
                writers = [
                    pool.apply_async(
                        _put_client,
                        (etcd.address, n, opts.seconds, keys[sum(parts[:i]) : sum(parts[: i + 1])], start_at),
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
                raise AssertionError(f"the etcd watcher saw {seen.count} of {total} puts")
        _report(f"etcd puts c={conc}", "puts/s", runs, lats)
        print(f"etcd puts watcher caught up {max(lags) * 1000:.0f} ms after the writers stopped", flush=True)
        _pair(f"state-changes c={conc}", _find(muster, f"state-changes c={conc} "), FIGURES[-1], "rate")


# The etcd peer of each comparable Muster workload; it gets the figures that workload printed.
PEERS: dict[str, Callable[[Options, list[Figure]], None]] = {
    "heartbeats-absorbed": keepalives,
    "changes": puts,
    "locks": locks,
    "locks-contended": locks_contended,
    "fanout": fanout,
}
