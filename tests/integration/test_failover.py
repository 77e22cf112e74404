"""PostgreSQL fails over to a standby under load: replicas follow the new primary by themselves,
no lease expires, fencing tokens keep increasing and no watcher reads a changed event.

A real primary and a streaming standby (Debian's PostgreSQL, tests/replicated.py); the primary
is killed (an immediate stop: with asynchronous replication its last commits may never reach the
standby) and, after longer than a lease, the standby is promoted. Two registry replicas and two lock
replicas serve through one multi-host URL with ``target_session_attrs=read-write``. Without Debian's
PostgreSQL server the tests skip, unless MUSTER_REQUIRE_POSTGRES_PEERS=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Recorder, registry, servers, wait_for
from replicated import ReplicatedPostgres

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import Cluster, MusterError, Scheduler
from muster.client.fencing import fenced_update
from muster.core.server import run_migrations

pytestmark = pytest.mark.timeout(240)
SERVING = health_pb2.HealthCheckResponse.SERVING
EPOCH = 1 << 40


@pytest.fixture(params=["asynchronous", "synchronous"])
def replicated(request):
    with tempfile.TemporaryDirectory(prefix="muster-ha-") as tmp:
        pair = ReplicatedPostgres(Path(tmp), synchronous=request.param == "synchronous")
        pair.start()
        try:
            yield pair
        finally:
            pair.stop()


async def _heartbeats(address: str, node: node_pb2.Node, stop: asyncio.Event) -> None:
    async with registry(address) as stub:
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Heartbeat(pb.HeartbeatRequest(node_id=node.id, lease_id=node.lease_id), timeout=1)
            await asyncio.sleep(0.5)


async def _serving_since(address: str, stop: asyncio.Event, seen: list[tuple[float, int]]) -> None:
    """Records (time, status) each time the replica's health changes (UNKNOWN while it cannot answer)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
            except grpc.aio.AioRpcError:
                status = health_pb2.HealthCheckResponse.UNKNOWN
            if not seen or seen[-1][1] != status:
                seen.append((time.monotonic(), status))
            await asyncio.sleep(0.05)


async def _lock_worker(
    addresses: list[str], url: str, me: str, stop: asyncio.Event, grants: list, pauses: list, errors: list
) -> None:
    """Takes the lock, writes under its token to a fenced table on the same cluster, releases."""
    pool = None
    async with Cluster.connect(addresses) as cluster:
        while not stop.is_set():
            try:
                if pool is None:
                    pool = await asyncpg.create_pool(url, min_size=0, max_size=1, timeout=2)
                asked = time.monotonic()
                async with cluster.lock("critical", ttl=timedelta(seconds=3), wait=timedelta(seconds=20)) as lease:
                    got = time.monotonic()
                    pauses.append((got - asked, asked, me))
                    async with pool.acquire() as con, con.transaction():
                        ok = await fenced_update(
                            con, "app_fenced", key={"id": 1}, values={"writer": me}, token=lease.token
                        )
                        if ok:
                            await con.execute("INSERT INTO app_log (token, writer) VALUES ($1, $2)", lease.token, me)
                    grants.append((got, lease.token, me, ok))
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database or a replica is away: try again
                errors.append((time.monotonic(), exc))
                if pool is not None:
                    with contextlib.suppress(Exception):
                        await pool.close()
                    pool = None
                await asyncio.sleep(0.1)
    if pool is not None:
        await pool.close()


async def _placer(addresses: list[str], stop: asyncio.Event, placed: list) -> None:
    """Places sessions one after another; a failed one is asked again with its request id."""
    async with Cluster.connect(addresses) as cluster:
        i = 0
        while not stop.is_set():
            try:
                p = await cluster.place_session(f"user{i}", request_id=f"place-{i}")
                placed.append((time.monotonic(), p.session.id, p.node_id))
                i += 1
                await asyncio.sleep(0.02)
            except MusterError:
                await asyncio.sleep(0.1)


async def _scheduler(address: str, stop: asyncio.Event, ran: list) -> None:
    """A scheduler running a single-run job every second (the other scheduler races it)."""
    async with Cluster.connect(address) as cluster:
        scheduler = Scheduler(cluster)
        scheduler.ran = ran  # shared with the test, live

        @scheduler.job(every=timedelta(seconds=1), name="tick", ttl=timedelta(seconds=30))
        async def tick(firing) -> None:  # noqa: ANN001
            pass

        await scheduler.run(stop)


async def test_a_failover_under_load_keeps_leases_tokens_and_the_event_stream(replicated) -> None:
    url = replicated.url
    await run_migrations(url, ["registry", "locks"], wait=30)
    con = await asyncpg.connect(url)
    await con.execute("CREATE TABLE app_fenced (id int PRIMARY KEY, writer text, fence bigint NOT NULL DEFAULT 0)")
    await con.execute("INSERT INTO app_fenced (id) VALUES (1)")
    await con.execute("CREATE TABLE app_log (seq bigserial PRIMARY KEY, token bigint NOT NULL, writer text)")
    await con.close()

    key = {"MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    # Leases of 4 s (heartbeats every 0.5 s): long enough that a loaded machine does not expire a
    # node that heartbeats, short enough that the 4.5 s outage outlasts them.
    timing = {"MUSTER_HEARTBEAT_INTERVAL": "500ms", "MUSTER_CHECK_IN_WINDOW": "1500ms", "MUSTER_LEASE_TTL": "4s"}
    with (
        servers(url, 2, env={**key, **timing}, service="registry,keys,balancer") as regs,
        servers(url, 2, env=timing, service="locks") as lockers,
    ):
        addresses = [s.address for s in regs]
        async with registry(addresses[0]) as stub:
            nodes = [(await stub.JoinNode(pb.JoinNodeRequest(host=f"f{i}", port=1))).node for i in range(6)]
        stop, watch_stop = asyncio.Event(), asyncio.Event()
        grants: list = []
        pauses: list = []
        errors: list = []
        health: dict[str, list] = {s.address: [] for s in [*regs, *lockers]}
        watcher = Recorder(addresses)
        tasks = [asyncio.create_task(_heartbeats(addresses[i % 2], n, stop)) for i, n in enumerate(nodes)]
        tasks += [asyncio.create_task(_serving_since(a, watch_stop, seen)) for a, seen in health.items()]
        tasks.append(asyncio.create_task(watcher.run(watch_stop)))
        ran: list = []
        placed: list = []
        tasks.append(asyncio.create_task(_placer(addresses, stop, placed)))
        tasks += [asyncio.create_task(_scheduler(lk.address, stop, ran)) for lk in lockers]
        tasks += [
            asyncio.create_task(_lock_worker([lockers[i % 2].address], url, f"w{i}", stop, grants, pauses, errors))
            for i in range(4)
        ]
        async with registry(addresses[1]) as stub:
            for i in range(20):  # events flowing up to the failover
                await stub.SetNodeMode(
                    pb.SetNodeModeRequest(
                        node_id=nodes[i % 6].id,
                        mode=node_pb2.Node.MODE_DRAINING if i % 2 else node_pb2.Node.MODE_ACTIVE,
                    )
                )
        await wait_for(lambda: len(grants) >= 20, timeout=30, what="lock traffic before the failover")
        held = time.monotonic()
        if not replicated.synchronous:
            # The standby stops receiving; what is acknowledged from here on is lost in the failover.
            replicated.hold_replication()
            held = time.monotonic() + 0.5  # (an answer in flight when the senders stopped may have made it)
        n_held = len(grants)
        if not replicated.synchronous:
            n_ran = len(ran)
            await wait_for(
                lambda: len(grants) >= n_held + 10 and len(ran) > n_ran,
                timeout=30,
                what="grants and a job run the standby will not have",
            )
        lost_tokens = {t for got, t, _, _ in grants[n_held:] if got > held}
        seen_before = {ev.revision for ev in watcher.events}
        killed = time.monotonic()
        await asyncio.to_thread(replicated.primary.kill)
        await asyncio.sleep(4.5)  # longer than a lease (4 s): only the outage credit keeps them
        await asyncio.to_thread(replicated.promote)
        promoted = time.monotonic()

        def all_serving() -> bool:
            return all(seen and seen[-1][0] > killed and seen[-1][1] == SERVING for seen in health.values())

        await wait_for(all_serving, timeout=60, what="every replica SERVING on the new primary")
        back = max(seen[-1][0] for seen in health.values())
        n_before = len(grants)
        try:
            await wait_for(lambda: len(grants) >= n_before + 20, timeout=40, what="lock traffic after the failover")
        except AssertionError:
            import io

            out = io.StringIO()
            for t in tasks[-4:]:
                t.print_stack(limit=30, file=out)
            raise AssertionError([repr(p)[:300] for _, p in errors][-10:], out.getvalue()) from None
        async with registry(addresses[0]) as stub:
            done = await stub.SetNodeMode(
                pb.SetNodeModeRequest(node_id=nodes[4].id, mode=node_pb2.Node.MODE_DRAINING, wait_for_revision=True)
            )
            await wait_for(lambda: watcher.through >= done.revision, timeout=20, what="the watcher to follow")
            await asyncio.sleep(2.0)  # more lease periods with heartbeats flowing
            listed = {n.id: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
        stop.set()
        watch_stop.set()
        _, pending = await asyncio.wait(tasks, timeout=40)
        assert not pending, [t.get_stack(limit=8) for t in pending]
        await asyncio.gather(*tasks)

    con = await asyncpg.connect(url)
    try:
        floor = await con.fetchval("SELECT epoch_floor FROM core.head")
        survived = await con.fetchval("SELECT survived_revision FROM core.epochs WHERE floor = $1", floor)
        log = {r["revision"]: r for r in await con.fetch("SELECT revision, kind, payload FROM core.events")}
        expired = await con.fetchval("SELECT count(*) FROM registry.nodes WHERE state_reason = 'LEASE_EXPIRED'")
        written = [r["token"] for r in await con.fetch("SELECT token FROM app_log ORDER BY seq")]
        sessions = {r["id"] for r in await con.fetch("SELECT id FROM balancer.sessions")}
        counts = {
            r["node_id"]: (r["counted"], r["stored"])
            for r in await con.fetch(
                "SELECT c.node_id, c.sessions AS counted, "
                "(SELECT count(*) FROM balancer.sessions s WHERE s.node_id = c.node_id) AS stored "
                "FROM balancer.node_counts c"
            )
        }
    finally:
        await con.close()

    # The new primary is a new epoch; nothing numbered there reuses an earlier revision.
    assert floor == 2 * EPOCH, floor
    assert done.revision > floor
    # Every node ONLINE, none expired: the outage credit covered the switch.
    assert expired == 0
    assert all(listed[n.id].state == node_pb2.Node.STATE_ONLINE for n in nodes), listed
    # Tokens: strictly increasing in the order the grants were seen, across the failover, and on
    # the fenced table in the order its writes were accepted.
    by_time = [t for _, t, _, _ in sorted(grants)]
    assert by_time == sorted(by_time) and len(set(by_time)) == len(by_time), by_time
    assert written == sorted(written) and len(set(written)) == len(written)
    assert any(t > floor for t in by_time) and any(t < EPOCH for t in by_time)
    # The watcher: revisions strictly increasing; a Resync at the new epoch; an event it saw that
    # survived is the same event on the new primary (never a changed event under an old revision).
    assert watcher.revisions == sorted(set(watcher.revisions))
    assert any(r.revision >= floor for r in watcher.resyncs), [r.revision for r in watcher.resyncs]
    new_epoch = watcher.sequence.index(next(x for x in watcher.sequence if x[0] == "resync" and x[1] >= floor))
    assert all(rev > floor for _, rev in watcher.sequence[new_epoch + 1 :]), "an old revision after the Resync"
    for ev in watcher.events:
        if ev.revision <= survived:
            stored = log[ev.revision]
            assert (stored["kind"], bytes(stored["payload"])) == (ev.kind, ev.payload.value), ev.revision
    # Single-run jobs: every slot ran, and once per epoch at most — a slot claimed on the old
    # primary whose claim was lost is claimed again on the new one, once; with synchronous
    # replication no claim is lost, so every slot ran exactly once.
    slots: dict = {}
    for _, slot, token in ran:
        slots.setdefault(slot, []).append(token)
    assert slots, "the schedulers ran nothing"
    for slot, tokens in slots.items():
        epochs = [t >> 40 for t in tokens]
        assert len(set(epochs)) == len(epochs), (slot, tokens)
        if replicated.synchronous:
            assert len(tokens) == 1, (slot, tokens)
    every = [s for s in sorted(slots) if s <= max(slots) - timedelta(seconds=3)]  # not the ones cut by the stop
    assert all((b - a) == timedelta(seconds=1) for a, b in zip(every, every[1:], strict=False)), "a slot never ran"
    # Placements: the counts a placement is decided on agree with the sessions stored (no node can
    # be overcommitted by counts that lost a write); each acknowledged placement is stored once;
    # with synchronous replication every one survived.
    assert all(counted == stored for counted, stored in counts.values()), counts
    ids = [sid for _, sid, _ in placed]
    assert len(ids) == len(set(ids)) and any(t > killed for t, _, _ in placed)
    if replicated.synchronous:
        assert set(ids) <= sessions, set(ids) - sessions
    else:  # asynchronous: a standby lags, so what survived is a prefix of unknown length
        assert sessions & set(ids)
    accepted = [t for _, t, _, ok in sorted(grants) if ok]
    if replicated.synchronous:
        # Nothing acknowledged is lost: every accepted fenced write, every event the watcher read.
        # (A write whose commit was in flight may be there too: it was never acknowledged.)
        assert set(accepted) <= set(written)
        assert all(ev.revision <= survived for ev in watcher.events if ev.revision < floor)
    else:
        # The failover did lose acknowledged work: grants, and events the watcher had already
        # read — and the watcher was resynced past them.
        assert len(written) < len(accepted) and not lost_tokens & set(written)
        assert any(r > survived for r in seen_before), (survived, max(seen_before))
    # The longest the watcher went without a message across the failover (events flow all along).
    gaps = [b - a for a, b in zip(watcher.received, watcher.received[1:], strict=False) if b > killed - 1]
    # What it took (printed for the closing note): death to SERVING, the longest lock wait.
    print(
        f"\nfailover ({'synchronous' if replicated.synchronous else 'asynchronous'}): primary killed, "
        f"promoted after {promoted - killed:.1f}s; every replica SERVING "
        f"{back - killed:.1f}s after the kill ({back - promoted:.1f}s after the promotion); longest lock "
        f"wait {max(pauses)[0]:.1f}s; longest watcher pause {max(gaps):.1f}s; "
        f"{len(grants)} grants, {len(written)} fenced writes survived; "
        f"{len(placed)} placements, {len(slots)} job slots, "
        f"{sum(len(t) > 1 for t in slots.values())} run again after the failover"
    )
