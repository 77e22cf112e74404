"""The chaos run's client processes. Each records every operation as a JSON line (line-buffered, so
a SIGKILL loses nothing already written) with its invocation and completion times on the machine's
monotonic clock (shared by every process here, and left alone by libfaketime when
FAKETIME_DONT_FAKE_MONOTONIC=1), and its result.

Usage: python workload.py ROLE CONFIG_JSON

Roles:
    watch   follows the event stream (``mode``: ``client`` through muster.client's Watch, ``raw``
            straight over gRPC, resuming from its own through_revision) until the stop file names a
            revision it has reached; then writes its final view of the nodes.
    lock    tasks contending for one lock, writing their critical sections through a fenced row.
    jobs    a Scheduler running a recoverable interval job; every claim, execution and completion.
    place   places sessions (and reports some started / ended), recording the chosen node and revision.
    admin   operator actions at set times: drain a node, rotate the keys, undrain.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

mono = time.monotonic


class Log:
    """One JSON object per line, flushed line by line."""

    def __init__(self, path: str, name: str) -> None:
        self._f = open(path, "a", buffering=1)  # noqa: SIM115 - line-buffered for the process's life
        self.name = name

    def write(self, **rec: Any) -> None:
        rec.setdefault("p", self.name)
        self._f.write(json.dumps(rec, default=str) + "\n")


def _node(n: Any) -> list[Any]:
    """What the checkers compare of a node: [id, address, state, mode, health, lease_id]."""
    return [n.id, n.address, n.state.name, n.mode.name, n.health.name, n.lease_id]


def _event_record(ev: Any) -> dict[str, Any]:
    """An event as the checkers need it: revision, kind, node, and the entity's resulting state."""
    from muster.api.balancer.v1 import balancer_pb2
    from muster.api.registry.v1 import node_pb2

    rec: dict[str, Any] = {"rev": ev.revision, "kind": ev.kind, "node": ev.node_id}
    if ev.time is not None:
        rec["time"] = ev.time.timestamp()
    if ev.node is not None:
        rec["n"] = _node(ev.node)
    p = ev.payload
    if isinstance(p, node_pb2.NodeModeChanged):
        rec["mode"] = node_pb2.Node.Mode.Name(p.mode).removeprefix("MODE_")
    elif isinstance(p, balancer_pb2.SessionMoved):
        rec.update(sid=p.session.id, snode=p.session.node_id, prev=p.previous_id, pnode=p.previous_node_id)
    elif isinstance(p, (balancer_pb2.SessionPlaced, balancer_pb2.SessionStarted)):
        rec.update(sid=p.session.id, snode=p.session.node_id)
    return rec


def _stop_at(stop_file: str) -> int | None:
    try:
        text = Path(stop_file).read_text().strip()
    except OSError:
        return None
    return int(text) if text else None


# -- watch ----------------------------------------------------------------------------------------


async def watch(cfg: dict[str, Any], log: Log) -> None:
    from muster.client import Cluster, apply_to_nodes

    nodes: dict[int, Any] = {}
    hard_end = cfg["until"] + cfg.get("final_grace", 120)
    log.write(op="start", mode=cfg["mode"], kinds=cfg.get("kinds", []), wall=time.time(), t=mono())
    async with Cluster.connect(cfg["addresses"], deadline=timedelta(seconds=5)) as cluster:
        if cfg["mode"] == "raw":
            through = await _watch_raw(cluster, cfg, log, nodes, hard_end)
        else:
            through = await _watch_client(cluster, cfg, log, nodes, hard_end, apply_to_nodes)
    log.write(
        op="final",
        through=through,
        nodes=sorted(_node(n) for n in nodes.values()),
        stop_at=_stop_at(cfg["stop_file"]),
        t=mono(),
        timed_out=mono() > hard_end,
    )


async def _watch_client(cluster: Any, cfg: dict[str, Any], log: Log, nodes: dict, hard_end: float, apply: Any) -> int:
    from muster.client import Event, Progress, Resync
    from muster.client._watch import Watch

    w = Watch(
        cluster,
        start_revision=0,
        kinds=tuple(cfg.get("kinds", ())),
        progress=True,
        progress_interval=timedelta(milliseconds=500),
    )
    states: list[str] = []
    w.on_state_change(lambda s: states.append(s.name))
    async with w:
        async for item in w:
            t = mono()
            if isinstance(item, Resync):
                log.write(op="resync", rev=item.revision, t=t, nodes=[_node(n) for n in item.nodes])
                apply(nodes, item)
            elif isinstance(item, Event):
                log.write(op="event", t=t, **_event_record(item))
                apply(nodes, item)
            elif isinstance(item, Progress):
                log.write(op="progress", through=item.through_revision, head=item.head_revision, t=t)
            if states:
                log.write(op="state", states=states[:], t=t, reconnects=w.reconnects)
                states.clear()
            target = _stop_at(cfg["stop_file"])
            if (target is not None and w.through_revision >= target) or mono() > hard_end:
                return w.through_revision
    return w.through_revision


async def _watch_raw(cluster: Any, cfg: dict[str, Any], log: Log, nodes: dict, hard_end: float) -> int:
    """WatchEvents by hand: every message as the server sent it, resuming from its through_revision."""
    import grpc
    from google.protobuf import duration_pb2

    from muster.api.registry.v1 import registry_service_pb2 as pb
    from muster.client import Event, Resync, apply_to_nodes

    endpoint = cluster._registry_endpoint()
    through = 0
    conn = 0
    while mono() < hard_end:
        conn += 1
        address = endpoint.address
        req = pb.WatchEventsRequest(
            start_revision=through,
            kinds=cfg.get("kinds", []),
            progress_interval=duration_pb2.Duration(nanos=500_000_000),
        )
        call = endpoint.stub().WatchEvents(req)
        log.write(op="connect", conn=conn, start=through, address=address, t=mono())
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(call.read(), 3.0)
                except TimeoutError:
                    log.write(op="silent", conn=conn, t=mono())
                    break
                if msg is grpc.aio.EOF:
                    log.write(op="eof", conn=conn, t=mono())
                    break
                t = mono()
                which = msg.WhichOneof("kind")
                if which == "events":
                    for ev in msg.events.events:
                        e = Event.from_proto(ev)
                        log.write(op="event", conn=conn, t=t, **_event_record(e))
                        apply_to_nodes(nodes, e)
                    log.write(op="batch", conn=conn, through=msg.through_revision, t=t)
                elif which == "resync":
                    r = Resync.from_proto(msg.resync)
                    log.write(
                        op="resync",
                        conn=conn,
                        rev=r.revision,
                        through=msg.through_revision,
                        t=t,
                        nodes=[_node(n) for n in r.nodes],
                    )
                    apply_to_nodes(nodes, r)
                else:
                    log.write(
                        op="progress", conn=conn, through=msg.through_revision, head=msg.progress.head_revision, t=t
                    )
                through = max(through, msg.through_revision)
                target = _stop_at(cfg["stop_file"])
                if (target is not None and through >= target) or mono() > hard_end:
                    call.cancel()
                    return through
        except grpc.aio.AioRpcError as exc:
            log.write(op="error", conn=conn, code=exc.code().name, t=mono())
        finally:
            call.cancel()
        endpoint.fail_over()
        await asyncio.sleep(random.uniform(0.05, 0.3))
    return through


# -- lock -----------------------------------------------------------------------------------------

ENTER = """
WITH ok AS (UPDATE chaos.resource SET fence = $1 WHERE id = 1 AND fence <= $1 RETURNING 1)
INSERT INTO chaos.sections (token, phase, worker) SELECT $1, $2, $3 FROM ok RETURNING id
"""


async def lock(cfg: dict[str, Any], log: Log) -> None:
    import asyncpg

    from muster.client import Cluster, LockLostError
    from muster.client import errors as E

    ttl = timedelta(seconds=cfg["ttl"])
    wait = timedelta(seconds=cfg["wait"])
    # min_size=0: no connection at start (the database may be down then); each write connects as needed.
    pool = await asyncpg.create_pool(cfg["database_url"], min_size=0, max_size=cfg["tasks"] + 1, command_timeout=3)
    log.write(op="start", wall=time.time(), t=mono(), pid=os.getpid())
    async with Cluster.connect(cfg["addresses"], deadline=timedelta(seconds=3)) as cluster:
        release = cluster.release

        async def recorded_release(lease: Any) -> bool:
            t0 = mono()
            try:
                ok = await release(lease)
            except E.MusterError as exc:
                log.write(op="release", token=lease.token, lease_id=lease.lease_id, t0=t0, t1=mono(), error=exc.reason)
                raise
            log.write(op="release", token=lease.token, lease_id=lease.lease_id, t0=t0, t1=mono(), released=ok)
            return ok

        cluster.release = recorded_release  # type: ignore[method-assign]

        async def guarded(token: int, phase: str, worker: str) -> Any:
            try:
                async with pool.acquire() as con:
                    return await con.fetchval(ENTER, token, phase, worker)
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,  # a connection broken by a database restart mid-statement
                TimeoutError,
            ) as exc:
                return f"error:{type(exc).__name__}"

        async def task(k: int) -> None:
            rng = random.Random(f"{cfg['seed']}-{log.name}-{k}")
            worker = f"{log.name}/{k}"
            while mono() < cfg["until"]:
                rec: dict[str, Any] = {"op": "lock", "worker": worker, "t0": mono(), "via": cluster._locks.address}
                checks: list[float] = []
                try:
                    async with cluster.lock(cfg["lock"], ttl=ttl, wait=wait, holder=worker) as lease:
                        rec.update(t_acq=mono(), token=lease.token, lease_id=lease.lease_id)
                        t = mono()
                        lease.ensure_held()
                        checks.append(t)
                        rec["enter"] = await guarded(lease.token, "enter", worker)
                        await asyncio.sleep(rng.uniform(0.01, 0.2))
                        # The body runs again here: it must not be past the lease's local deadline.
                        late = mono() - lease.local_deadline
                        if late > 0:
                            rec["ran_past_deadline"] = late
                        t = mono()
                        lease.ensure_held()
                        checks.append(t)
                        rec["exit"] = await guarded(lease.token, "exit", worker)
                    rec["ok"] = True
                except (LockLostError, E.MusterError) as exc:
                    rec.update(ok=False, error=type(exc).__name__)
                finally:
                    rec["t1"] = mono()
                    rec["held"] = [checks[0], checks[-1]] if checks else None
                    log.write(**rec)
                await asyncio.sleep(rng.uniform(0.0, 0.05))

        await asyncio.gather(*(task(k) for k in range(cfg["tasks"])))
    await pool.close()


# -- jobs -----------------------------------------------------------------------------------------


async def jobs(cfg: dict[str, Any], log: Log) -> None:
    from muster.client import Cluster, Scheduler
    from muster.client import errors as E

    log.write(op="start", wall=time.time(), t=mono(), pid=os.getpid())
    async with Cluster.connect(cfg["addresses"], deadline=timedelta(seconds=3)) as cluster:
        claim, complete = cluster.claim_firing, cluster.complete_firing

        async def recorded_claim(job: str, slot: datetime, **kw: Any) -> Any:
            t0, via = mono(), cluster._locks.address
            try:
                f = await claim(job, slot, **kw)
            except E.MusterError as exc:
                log.write(
                    op="claim",
                    slot=slot.isoformat(),
                    t0=t0,
                    t1=mono(),
                    via=via,
                    error=type(exc).__name__,
                    holder=exc.metadata.get("holder", ""),
                    state=exc.metadata.get("state", ""),
                )
                raise
            log.write(op="claim", slot=slot.isoformat(), t0=t0, t1=mono(), via=via, token=f.token, attempt=f.attempt)
            return f

        async def recorded_complete(firing: Any, *, failed: bool = False) -> Any:
            t0 = mono()
            try:
                f = await complete(firing, failed=failed)
            except E.MusterError as exc:
                log.write(
                    op="complete",
                    slot=firing.scheduled_time.isoformat(),
                    token=firing.token,
                    t0=t0,
                    t1=mono(),
                    error=type(exc).__name__,
                )
                raise
            log.write(
                op="complete",
                slot=firing.scheduled_time.isoformat(),
                token=firing.token,
                t0=t0,
                t1=mono(),
                state=f.state,
            )
            return f

        cluster.claim_firing = recorded_claim  # type: ignore[method-assign]
        cluster.complete_firing = recorded_complete  # type: ignore[method-assign]
        scheduler = Scheduler(cluster, holder=log.name)

        @scheduler.job(
            every=timedelta(seconds=cfg["every"]),
            name=cfg["job"],
            recoverable=True,
            ttl=timedelta(seconds=cfg["ttl"]),
            misfire_threshold=timedelta(seconds=cfg["misfire"]),
        )
        async def tick(firing: Any) -> None:
            slot = firing.scheduled_time.isoformat()
            log.write(op="exec", phase="start", slot=slot, token=firing.token, attempt=firing.attempt, t=mono())
            await asyncio.sleep(cfg["work"])
            log.write(op="exec", phase="end", slot=slot, token=firing.token, attempt=firing.attempt, t=mono())

        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(max(0.0, cfg["until"] - mono()), stop.set)
        while mono() < cfg["until"]:
            try:
                await scheduler.run(stop)  # its first call (the clock) may fail under a fault: try again
                break
            except E.MusterError as exc:
                log.write(op="scheduler_error", error=type(exc).__name__, t=mono())
                await asyncio.sleep(0.3)


# -- place ----------------------------------------------------------------------------------------


async def place(cfg: dict[str, Any], log: Log) -> None:
    from muster.client import Cluster
    from muster.client import errors as E

    rng = random.Random(f"{cfg['seed']}-place")
    log.write(op="start", wall=time.time(), t=mono(), pid=os.getpid())
    started: list[tuple[int, str]] = []
    i = 0
    async with Cluster.connect(cfg["addresses"], deadline=timedelta(seconds=3)) as cluster:
        while mono() < cfg["until"]:
            i += 1
            user = f"u{i % 40}"
            rec: dict[str, Any] = {"op": "place", "user": user, "t0": mono(), "via": cluster._balancer.address}
            try:
                p = await cluster.place_session(user, wait_for_revision=True)
                rec.update(
                    ok=True,
                    sid=p.session.id,
                    node=p.node_id,
                    rev=p.revision,
                    candidates=[c.node_id for c in p.candidates],
                    excluded=[[e.node_id, e.reason] for e in p.excluded],
                )
            except E.MusterError as exc:
                rec.update(ok=False, error=type(exc).__name__, reason=exc.reason)
            rec["t1"] = mono()
            log.write(**rec)
            if rec.get("ok") and rng.random() < 0.5:
                t0 = mono()
                try:
                    await cluster.report_session_started(p.node_id, p.session.id, pid=1000 + i, user=user)
                    log.write(op="started", sid=p.session.id, node=p.node_id, t0=t0, t1=mono(), ok=True)
                    started.append((p.node_id, p.session.id))
                except E.MusterError as exc:
                    log.write(op="started", sid=p.session.id, t0=t0, t1=mono(), ok=False, error=type(exc).__name__)
            if started and rng.random() < 0.1:
                node_id, sid = started.pop(rng.randrange(len(started)))
                t0 = mono()
                try:
                    await cluster.report_session_ended(node_id, sid)
                    log.write(op="ended", sid=sid, node=node_id, t0=t0, t1=mono(), ok=True)
                except E.MusterError as exc:
                    log.write(op="ended", sid=sid, t0=t0, t1=mono(), ok=False, error=type(exc).__name__)
            await asyncio.sleep(rng.uniform(0.05, 0.25))


# -- admin ----------------------------------------------------------------------------------------


async def admin(cfg: dict[str, Any], log: Log) -> None:
    from muster.client import Cluster, NodeMode
    from muster.client import errors as E

    log.write(op="start", wall=time.time(), t=mono(), pid=os.getpid())
    async with Cluster.connect(cfg["addresses"], deadline=timedelta(seconds=3)) as cluster:

        async def node_id(host: str) -> int:
            for n in (await cluster.list_nodes()).nodes:
                if n.host == host:
                    return n.id
            raise LookupError(host)

        for at, action, arg in sorted(cfg["schedule"]):
            await asyncio.sleep(max(0.0, at - mono()))
            for attempt in range(12):
                t0 = mono()
                rec: dict[str, Any] = {"op": action, "arg": arg, "attempt": attempt, "t0": t0}
                try:
                    if action in ("drain", "undrain"):
                        nid = await node_id(arg)
                        rec["node"] = nid
                        mode = NodeMode.DRAINING if action == "drain" else NodeMode.ACTIVE
                        n = await cluster.set_node_mode(nid, mode, wait_for_revision=True)
                        rec.update(ok=True, mode=n.mode.name)
                    elif action == "rotate":
                        status = await cluster.key_status()
                        pending = status.pending
                        if attempt and pending is not None:
                            rec.update(ok=True, version=pending.version, note="an earlier attempt made it")
                        else:
                            v, rev = await cluster.rotate_keys(wait_for_revision=True)
                            rec.update(
                                ok=True, version=v.version, rev=rev, fingerprint=v.fingerprints.secure_cookie_key
                            )
                    rec["t1"] = mono()
                    log.write(**rec)
                    break
                except (E.MusterError, LookupError) as exc:
                    rec.update(ok=False, error=type(exc).__name__, t1=mono())
                    log.write(**rec)
                    if isinstance(exc, E.KeyRotationPendingError):
                        break
                    await asyncio.sleep(0.5)


ROLES = {"watch": watch, "lock": lock, "jobs": jobs, "place": place, "admin": admin}


def main() -> None:
    role, raw = sys.argv[1], sys.argv[2]
    cfg = json.loads(raw)
    # The client library's own random choices (the replica it starts on, backoff jitter) follow the seed.
    random.seed(f"{cfg['seed']}-{cfg['name']}")
    log = Log(cfg["log"], cfg["name"])
    try:
        import uvloop

        uvloop.run(ROLES[role](cfg, log))
    except ImportError:
        asyncio.run(ROLES[role](cfg, log))
    log.write(op="exit", t=mono(), wall=time.time(), utc=datetime.now(UTC).isoformat())


if __name__ == "__main__":
    main()
