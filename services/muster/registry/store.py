"""Every SQL statement of the registry, behind named async methods.

Each change appends its event in the same transaction (``events.append``) and kicks this
process's numbering pass after the commit. Liveness is judged on the database's clock only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from muster.api.registry.v1 import node_pb2
from muster.core import clock, events, metrics
from muster.core.batch import GroupCommit
from muster.core.db import retry_serialization
from muster.registry import convert
from muster.registry.errors import (
    LeaseExpiredError,
    NodeDeletingError,
    NodeHasSessionsError,
    NodeKeysRefusedError,
    NodeLimitReachedError,
    NodeNotFoundError,
    StaleLeaseError,
)
from muster.registry.models import (
    COUNTED_STATES,
    Cluster,
    Health,
    HeartbeatResult,
    Load,
    Mode,
    Node,
    Refusal,
    State,
)

log = logging.getLogger(__name__)

NODE_FOR_UPDATE_BY_ADDRESS = "SELECT * FROM registry.nodes WHERE address = $1 FOR UPDATE"
NODE_FOR_UPDATE = "SELECT * FROM registry.nodes WHERE id = $1 FOR UPDATE"
NODE_BY_ID = "SELECT * FROM registry.nodes WHERE id = $1"
LOCK_CLUSTER = "SELECT 1 FROM registry.cluster WHERE id = 1 FOR UPDATE"
COUNT_COUNTED = "SELECT count(*) FROM registry.nodes WHERE state = ANY($1::smallint[]) AND address <> $2"
UPSERT_NODE = """
INSERT INTO registry.nodes AS n (
    address, host, port, ipv4, labels, state, state_reason, health, lease_id, join_request_id,
    last_seen_time, check_in_deadline, lease_expire_time, load1, load5, load15, cpu_count, session_count,
    state_message, state_details
) VALUES (
    $1, $2, $3, $4, $5::jsonb, $6, $7, $8, nextval('registry.lease_ids'), $9,
    now(), now() + $10::interval, now() + $11::interval, $12, $13, $14, $15, $16, $17, $18::jsonb
)
ON CONFLICT (address) DO UPDATE SET
    host = EXCLUDED.host, port = EXCLUDED.port, ipv4 = EXCLUDED.ipv4, labels = EXCLUDED.labels,
    state = EXCLUDED.state, state_reason = EXCLUDED.state_reason, health = EXCLUDED.health,
    lease_id = EXCLUDED.lease_id, join_request_id = EXCLUDED.join_request_id, state_time = now(),
    last_seen_time = now(), check_in_deadline = EXCLUDED.check_in_deadline,
    lease_expire_time = EXCLUDED.lease_expire_time, load1 = EXCLUDED.load1, load5 = EXCLUDED.load5,
    load15 = EXCLUDED.load15, cpu_count = EXCLUDED.cpu_count, session_count = EXCLUDED.session_count,
    state_message = EXCLUDED.state_message, state_details = EXCLUDED.state_details
RETURNING *
"""
# A HOT update: no indexed column changes (0004 dropped the index on lease_expire_time), and the
# row is not joined with itself. Rows are updated in node id order (the arrays come sorted).
HEARTBEAT_BATCH = """
UPDATE registry.nodes n SET
    last_seen_time = now(), check_in_deadline = now() + $8::interval, lease_expire_time = now() + $9::interval,
    load1 = u.l1, load5 = u.l5, load15 = u.l15, cpu_count = u.cpus, session_count = u.sessions
FROM unnest($1::bigint[], $2::bigint[], $3::float8[], $4::float8[], $5::float8[], $6::int[], $7::int[])
    AS u(id, lease_id, l1, l5, l15, cpus, sessions)
WHERE n.id = u.id AND n.lease_id = u.lease_id AND n.state = 2
RETURNING n.id, n.lease_id, n.lease_expire_time, now() AS now
"""
NODES_BY_IDS = "SELECT id, lease_id, state, state_reason FROM registry.nodes WHERE id = ANY($1::bigint[])"
SET_STATE = """
UPDATE registry.nodes SET state = $2, state_reason = $3, health = 0, state_time = now(),
    state_message = '', state_details = '{}'
WHERE id = $1 RETURNING *
"""
DELETE_NODE = "DELETE FROM registry.nodes WHERE id = $1 AND state = 4 RETURNING id, address"
# A batch of mode changes in one statement (one round trip, one commit). The nodes' rows are
# locked in id order (no deadlock between batches or replicas); the items are then taken in arrival
# order (`i`): an item changes the mode when it differs from the mode the item before it on the same
# node left (or the stored one), and each such change appends its event in that order. The row is
# written once, with the last item's mode. One row per item: the node as stored (NULL id for a
# missing node), and the append id of the item's event (0 for a no-op).
SET_MODES = """
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::smallint[], $3::bytea[]) WITH ORDINALITY AS u(id, mode, payload, i)
), locked AS (
    SELECT n.* FROM registry.nodes n WHERE n.id IN (SELECT id FROM u) ORDER BY n.id FOR UPDATE
), seq AS (
    SELECT u.i, u.id, u.mode, u.payload, l.mode AS stored,
           u.mode <> coalesce(lag(u.mode) OVER (PARTITION BY u.id ORDER BY u.i), l.mode) AS changed,
           row_number() OVER (PARTITION BY u.id ORDER BY u.i DESC) = 1 AS last
    FROM u JOIN locked l ON l.id = u.id
), written AS (
    UPDATE registry.nodes n SET mode = s.mode FROM seq s
    WHERE n.id = s.id AND s.last AND s.mode <> s.stored
    RETURNING n.id
), appended AS (
    SELECT s.i, core.append_event($4, s.id, s.payload) AS append_id FROM seq s WHERE s.changed ORDER BY s.i
)
SELECT l.*, u.i AS item, u.mode AS new_mode, coalesce(a.append_id, 0) AS append_id
FROM u LEFT JOIN locked l ON l.id = u.id LEFT JOIN appended a ON a.i = u.i
ORDER BY u.i
"""
# Revisions of events this process appended and had numbered (a pass that started after their commit).
REVISIONS_OF = "SELECT append_id, revision FROM core.events WHERE append_id = ANY($1::bigint[])"
RESET_NODES = "DELETE FROM registry.nodes"
RESET_CLUSTER = """
UPDATE registry.cluster SET epoch = epoch + 1, uid = gen_random_uuid(), create_time = now()
WHERE id = 1 RETURNING uid::text, epoch, create_time
"""
GET_CLUSTER = """
SELECT c.uid::text, c.epoch, c.create_time,
       (SELECT count(*) FROM registry.nodes) AS node_count,
       (SELECT count(*) FROM registry.nodes WHERE state = 2 AND health = 1) AS online_count,
       now() AS now
FROM registry.cluster c WHERE c.id = 1
"""
LIST_NODES_PAGE = """
SELECT *, (state <> 2)::int AS rank, now() AS now FROM registry.nodes
WHERE ((state <> 2)::int, id) > ($1::int, $2::bigint)
ORDER BY (state <> 2)::int, id LIMIT $3
"""
SNAPSHOT_NODES = """
SELECT * FROM registry.nodes WHERE cardinality($1::bigint[]) = 0 OR id = ANY($1::bigint[])
ORDER BY (state <> 2)::int, id
"""
CLUSTER_EPOCH = "SELECT epoch FROM registry.cluster WHERE id = 1"
ONLINE_NODES = "SELECT * FROM registry.nodes WHERE state = 2 ORDER BY id"
LIST_LOADS_PAGE = """
SELECT id, state, mode, health, last_seen_time, load1, load5, load15, cpu_count, session_count, now() AS now
FROM registry.nodes WHERE id > $1 ORDER BY id LIMIT $2
"""
OUTAGE_MARKER = "SELECT last_outage_id FROM registry.outage_marker WHERE id = 1 FOR UPDATE"
SET_OUTAGE_MARKER = "UPDATE registry.outage_marker SET last_outage_id = $1 WHERE id = 1"
CREDIT_LEASES = """
UPDATE registry.nodes SET lease_expire_time = lease_expire_time + $1::interval,
                          check_in_deadline = check_in_deadline + $1::interval
WHERE state = 2
"""
SWEEP_HEALTH = """
UPDATE registry.nodes SET health = CASE WHEN now() > check_in_deadline THEN 2 ELSE 1 END
WHERE state = 2 AND health <> CASE WHEN now() > check_in_deadline THEN 2 ELSE 1 END
RETURNING *
"""
SWEEP_EXPIRED = """
UPDATE registry.nodes SET state = 3, state_reason = 'LEASE_EXPIRED', health = 0, state_time = now()
WHERE state = 2 AND lease_expire_time < now()
RETURNING *
"""
# The node view's refresh of what heartbeats change without events (since a time, or every row).
LIVE_SINCE = """
SELECT id, lease_id, last_seen_time, lease_expire_time, load1, load5, load15, cpu_count, session_count,
       now() AS now
FROM registry.nodes WHERE $1::timestamptz IS NULL OR last_seen_time >= $1
"""
DB_NOW = "SELECT now()"
STUCK_DELETING = "SELECT id FROM registry.nodes WHERE state = 4 AND state_time < now() - $1::interval"


@dataclass(frozen=True)
class Written:
    """The result of a change: its value and the append id of its (last) event."""

    node: Node | None
    append_id: int
    # The numbering pass kicked after the change's commit (its event is numbered once it resolves).
    numbered: asyncio.Future[int] | None = None


@dataclass(frozen=True)
class Timing:
    """The cluster's lease timing (server configuration)."""

    heartbeat_interval: timedelta
    check_in_window: timedelta
    lease_ttl: timedelta
    max_nodes: int


@dataclass(frozen=True)
class Page:
    """One page of nodes."""

    nodes: list[Node]
    next_key: tuple[int, int] | None
    revision: int
    server_time: datetime


@dataclass(frozen=True)
class LoadsPage:
    """One page of loads."""

    rows: list[asyncpg.Record]
    next_id: int | None
    server_time: datetime


def _state_name(state: int) -> str:
    return State(state).name


def _node_event(payload_cls: type, node: Node) -> object:
    return payload_cls(node=convert.node_to_proto(node))


class RegistryStore:
    """The registry's tables.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes (kicked after every commit that appended events).
        timing: lease timing.
    """

    def __init__(self, pool: asyncpg.Pool, numberer: events.Numberer, timing: Timing) -> None:
        self._pool = pool
        self._numberer = numberer
        self.timing = timing
        self._revisions: GroupCommit[int, int | None] = GroupCommit(
            self._revisions_of, max_batch=1_000, name="registry-revisions"
        )
        # Mode changes: one statement per batch; two in flight (rows are locked in id order).
        self._modes: GroupCommit[tuple[int, Mode], Written] = GroupCommit(
            self.set_modes, max_batch=1_000, in_flight=2, name="registry-modes"
        )

    def _committed(self) -> asyncio.Future[int]:
        return self._numberer.kick()

    async def revision_of(self, append_id: int, numbered: asyncio.Future[int] | None = None) -> int:
        """Waits for the event to be numbered; returns its revision.

        With ``numbered`` (the pass kicked after the change's commit, :attr:`Written.numbered`) no
        second pass runs: once that pass is done the event has its revision, looked up in one
        query shared by every change waiting at the same moment. Without it (or if that pass
        failed), a pass of its own.
        """
        if numbered is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(numbered)
                revision = await self._revisions(append_id)
                if revision is not None:
                    return revision
        return await self._numberer.revision_of(append_id)

    async def number_pending(self) -> int:
        """Runs (or joins) a numbering pass that starts after this call; returns the head after it."""
        return await self._numberer.kick()

    async def _revisions_of(self, append_ids: list[int]) -> list[int | None]:
        async with self._pool.acquire() as con:
            rows = await con.fetch(REVISIONS_OF, sorted(set(append_ids)))
        found = {r["append_id"]: r["revision"] for r in rows}
        return [None if found.get(a) is None else int(found[a]) for a in append_ids]

    # -- joins and leases ----------------------------------------------------------------------

    async def join(
        self,
        *,
        host: str,
        port: int,
        address: str,
        ipv4: str,
        labels: dict[str, str],
        request_id: str,
        load: Load,
        refusal: Refusal | None = None,
    ) -> Written:
        """Joins (or re-joins, keeping the id) the node at ``address`` with a new lease.

        A ``refusal`` (the node's keys differ from the cluster's, or its key files cannot be used)
        commits the node in the refusal's INVALID_* state, with its message and details, and raises.

        Raises:
            NodeLimitReachedError: after committing the node as INVALID_LICENSE.
            NodeKeysRefusedError: after committing the node in the refusal's state.
        """
        t = self.timing

        async def attempt() -> tuple[Written, bool]:
            async with self._pool.acquire() as con, con.transaction():
                if t.max_nodes:
                    await con.execute(LOCK_CLUSTER)  # serializes the count against concurrent joins
                existing = await con.fetchrow(NODE_FOR_UPDATE_BY_ADDRESS, address)
                if existing is not None and existing["state"] == State.DELETING:
                    raise NodeDeletingError(existing["id"])  # joining now would undo the operator's delete
                if (
                    existing is not None
                    and request_id
                    and existing["join_request_id"] == request_id
                    and existing["state"] == State.ONLINE
                ):
                    return Written(Node.from_row(existing), 0), False  # a retried join: same lease
                state, reason = State.ONLINE, "JOINED"
                message, details = "", {}
                if refusal is not None:
                    state, reason, message, details = refusal.state, "KEYS_REFUSED", refusal.message, refusal.details
                elif t.max_nodes:
                    counted = await con.fetchval(COUNT_COUNTED, [int(s) for s in COUNTED_STATES], address)
                    if counted >= t.max_nodes:
                        state, reason = State.INVALID_LICENSE, "NODE_LIMIT_REACHED"
                row = await con.fetchrow(
                    UPSERT_NODE,
                    address,
                    host,
                    port,
                    ipv4,
                    json.dumps(labels),
                    int(state),
                    reason,
                    int(Health.OK if state == State.ONLINE else Health.NONE),
                    request_id,
                    t.check_in_window,
                    t.lease_ttl,
                    load.load1,
                    load.load5,
                    load.load15,
                    load.cpu_count,
                    load.session_count,
                    message,
                    json.dumps(details),
                )
                node = Node.from_row(row)
                append_id = await events.append(
                    con, node_pb2.NodeJoined(node=convert.node_to_proto(node)), node_id=node.id
                )
                return Written(node, append_id), state != State.ONLINE

        written, refused = await retry_serialization(attempt)
        if written.append_id:
            written = dataclasses.replace(written, numbered=self._committed())
            log.info(
                "node %s joined from %s (%s)",
                written.node.id,
                address,
                written.node.state.name,
                extra={"event": "node_joined", "node": written.node.id},
            )
        if refused and refusal is not None:
            raise NodeKeysRefusedError(written.node.id, refusal)
        if refused:
            raise NodeLimitReachedError(written.node.id, t.max_nodes)
        return written

    async def heartbeats(self, batch: Sequence[tuple[int, int, Load]]) -> list[HeartbeatResult | Exception]:
        """Renews many leases in one statement (group commit); returns a result or error per item, in order.

        Keyed by the lease too: a stale incarnation's heartbeat in the same batch as the current
        one's must not decide the current one's answer. Two heartbeats of one lease in a batch are
        one renewal (the later load wins) and get the same answer.
        """
        t = self.timing
        latest = {(node_id, lease_id): load for node_id, lease_id, load in batch}
        keys = sorted(latest)
        args = (
            [k[0] for k in keys],
            [k[1] for k in keys],
            [latest[k].load1 for k in keys],
            [latest[k].load5 for k in keys],
            [latest[k].load15 for k in keys],
            [latest[k].cpu_count for k in keys],
            [latest[k].session_count for k in keys],
            t.check_in_window,
            t.lease_ttl,
        )

        async def attempt() -> list[asyncpg.Record]:
            async with self._pool.acquire() as con:
                return await con.fetch(HEARTBEAT_BATCH, *args)

        rows = await retry_serialization(attempt)
        metrics.heartbeats.add(len(rows))
        out: dict[tuple[int, int], HeartbeatResult | Exception] = {
            (r["id"], r["lease_id"]): HeartbeatResult(r["lease_expire_time"], r["now"]) for r in rows
        }
        missing = [k for k in keys if k not in out]
        if missing:
            async with self._pool.acquire() as con:
                found = {r["id"]: r for r in await con.fetch(NODES_BY_IDS, [i for i, _ in missing])}
            for i, lease_id in missing:
                r = found.get(i)
                if r is None:
                    out[(i, lease_id)] = NodeNotFoundError(i)
                elif r["lease_id"] != lease_id:
                    out[(i, lease_id)] = StaleLeaseError(i, lease_id)
                else:
                    out[(i, lease_id)] = LeaseExpiredError(i, _state_name(r["state"]), r["state_reason"])
        return [out[(node_id, lease_id)] for node_id, lease_id, _ in batch]

    async def leave(self, node_id: int, lease_id: int) -> Written:
        """Sets the node OFFLINE with reason LEFT (a clean stop)."""
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(NODE_FOR_UPDATE, node_id)
            self._check_lease(row, node_id, lease_id)
            if row["state"] == State.OFFLINE:
                return Written(Node.from_row(row), 0)
            append_id, node = await self._set_state(con, row, State.OFFLINE, "LEFT")
        numbered = self._committed()
        log.info("node %s left", node_id, extra={"event": "node_left", "node": node_id})
        return Written(node, append_id, numbered)

    @staticmethod
    def _check_lease(row: asyncpg.Record | None, node_id: int, lease_id: int) -> None:
        if row is None:
            raise NodeNotFoundError(node_id)
        if row["lease_id"] != lease_id:
            raise StaleLeaseError(node_id, lease_id)

    async def _set_state(
        self, con: asyncpg.Connection, row: asyncpg.Record, state: State, reason: str
    ) -> tuple[int, Node]:
        new = Node.from_row(await con.fetchrow(SET_STATE, row["id"], int(state), reason))
        payload = node_pb2.NodeStateChanged(node=convert.node_to_proto(new), previous_state=row["state"])
        return await events.append(con, payload, node_id=new.id), new

    # -- operator changes ----------------------------------------------------------------------

    async def delete(self, node_id: int, *, force: bool, lease_id: int | None = None) -> Written:
        """Deletes a node in two transactions: DELETING with its event, then the removal with its event.

        Raises:
            NodeHasSessionsError: the node is ONLINE with sessions and ``force`` is not set.
        """
        async with self._pool.acquire() as con:
            async with con.transaction():
                row = await con.fetchrow(NODE_FOR_UPDATE, node_id)
                if lease_id is not None:
                    self._check_lease(row, node_id, lease_id)
                if row is None:
                    raise NodeNotFoundError(node_id)
                if row["state"] == State.ONLINE and row["session_count"] > 0 and not force:
                    raise NodeHasSessionsError(node_id, row["session_count"])
                if row["state"] != State.DELETING:
                    await self._set_state(con, row, State.DELETING, "DELETED" if lease_id is None else "LEFT")
            self._committed()
            written = await self._finish_delete(con, node_id)
        log.info("node %s deleted", node_id, extra={"event": "node_deleted", "node": node_id})
        return written

    async def _finish_delete(self, con: asyncpg.Connection, node_id: int) -> Written:
        async with con.transaction():
            row = await con.fetchrow(DELETE_NODE, node_id)
            if row is None:
                return Written(None, 0)  # another replica finished it
            append_id = await events.append(
                con, node_pb2.NodeDeleted(node_id=row["id"], address=row["address"]), node_id=row["id"]
            )
        return Written(None, append_id, self._committed())

    async def set_modes(self, items: Sequence[tuple[int, Mode]]) -> list[Written | Exception]:
        """Drains or undrains nodes in one statement (group commit); a result or error per item, in order.

        Items are applied in order: each one that changes its node's mode appends one event, a
        no-op one (the mode already set, by the store or by an earlier item of the batch) none, and
        a missing node is that item's NodeNotFoundError. Each result's node has the mode the item
        left; the numbering pass is kicked once for the batch.
        """
        kind = events.kind_of(node_pb2.NodeModeChanged())
        payloads = [node_pb2.NodeModeChanged(node_id=n, mode=int(m)).SerializeToString() for n, m in items]

        async def attempt() -> list[asyncpg.Record]:
            async with self._pool.acquire() as con:
                return await con.fetch(SET_MODES, [n for n, _ in items], [int(m) for _, m in items], payloads, kind)

        rows = await retry_serialization(attempt)
        numbered = self._committed() if any(r["append_id"] for r in rows) else None
        out: list[Written | Exception] = []
        for (node_id, mode), r in zip(items, rows, strict=True):
            if r["id"] is None:
                out.append(NodeNotFoundError(node_id))
                continue
            node = dataclasses.replace(Node.from_row(r), mode=mode)
            if r["append_id"]:
                log.info("node %s mode %s", node_id, mode.name, extra={"event": "node_mode", "node": node_id})
            out.append(Written(node, r["append_id"], numbered if r["append_id"] else None))
        return out

    async def set_mode(self, node_id: int, mode: Mode) -> Written:
        """Drains or undrains one node, batched with the changes arriving meanwhile (see :meth:`set_modes`).

        Raises:
            NodeNotFoundError: no such node.
        """
        return await self._modes((node_id, mode))

    async def reset(self) -> tuple[Cluster, int, int]:
        """Removes every node and redefines the cluster (new uid, epoch + 1).

        Returns the cluster, how many nodes were removed, and the event's append id.
        """
        async with self._pool.acquire() as con, con.transaction():
            await con.execute(LOCK_CLUSTER)
            status = await con.execute(RESET_NODES)
            deleted = int(status.split()[-1])
            row = await con.fetchrow(RESET_CLUSTER)
            cluster = Cluster(row["uid"], row["epoch"], row["create_time"])
            payload = node_pb2.ClusterReset(cluster=self.cluster_proto(cluster))
            append_id = await events.append(con, payload)
        self._committed()
        log.warning(
            "cluster reset: %d nodes removed, epoch %d", deleted, cluster.epoch, extra={"event": "cluster_reset"}
        )
        return cluster, deleted, append_id

    def cluster_proto(self, cluster: Cluster) -> node_pb2.Cluster:
        """The cluster with this server's timing."""
        t = self.timing
        return convert.cluster_to_proto(
            cluster,
            max_nodes=t.max_nodes,
            heartbeat_interval=t.heartbeat_interval,
            check_in_window=t.check_in_window,
            lease_ttl=t.lease_ttl,
        )

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, node_id: int) -> Node:
        """One node."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(NODE_BY_ID, node_id)
        if row is None:
            raise NodeNotFoundError(node_id)
        return Node.from_row(row)

    async def get_cluster(self) -> tuple[Cluster, int, datetime]:
        """The cluster, the revision it reflects (every committed change numbered), and the database's time."""
        async with self._pool.acquire() as con, self._numberer.snapshot(con) as revision:
            r = await con.fetchrow(GET_CLUSTER)
        return Cluster(r["uid"], r["epoch"], r["create_time"], r["node_count"], r["online_count"]), revision, r["now"]

    async def list_nodes(self, after: tuple[int, int], limit: int) -> Page:
        """A page of nodes (ONLINE first, then by id) from a snapshot that reflects exactly its revision."""
        async with self._pool.acquire() as con, self._numberer.snapshot(con) as revision:
            rows = await con.fetch(LIST_NODES_PAGE, after[0], after[1], limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        now = rows[0]["now"] if rows else datetime.now().astimezone()
        next_key = (rows[-1]["rank"], rows[-1]["id"]) if more else None
        return Page([Node.from_row(r) for r in rows], next_key, revision, now)

    async def snapshot(self, node_ids: frozenset[int]) -> tuple[list[Node], int, int]:
        """Every node (or the given ones), the cluster epoch, and the revision they reflect exactly."""
        async with self._pool.acquire() as con, self._numberer.snapshot(con) as revision:
            rows = await con.fetch(SNAPSHOT_NODES, sorted(node_ids))
            epoch = await con.fetchval(CLUSTER_EPOCH)
        return [Node.from_row(r) for r in rows], int(epoch), revision

    async def node_status(self, node_id: int) -> tuple[Node, list[Node], int]:
        """One node's view: itself, the online nodes, and the revision."""
        async with self._pool.acquire() as con, self._numberer.snapshot(con) as revision:
            row = await con.fetchrow(NODE_BY_ID, node_id)
            online = await con.fetch(ONLINE_NODES)
        if row is None:
            raise NodeNotFoundError(node_id)
        return Node.from_row(row), [Node.from_row(r) for r in online], revision

    async def list_loads(self, after_id: int, limit: int) -> LoadsPage:
        """A page of loads by node id."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(LIST_LOADS_PAGE, after_id, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        now = rows[0]["now"] if rows else datetime.now().astimezone()
        return LoadsPage(rows, rows[-1]["id"] if more else None, now)

    async def live_since(self, since: datetime | None) -> tuple[list[asyncpg.Record], datetime]:
        """What heartbeats change without events (last seen, expiry, load) of the nodes seen since
        ``since`` (every node for None), and the database's time."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(LIVE_SINCE, since)
            now = rows[0]["now"] if rows else await con.fetchval(DB_NOW)
        return rows, now

    # -- the reaper ----------------------------------------------------------------------------

    async def sweep(self, *, outage_threshold: timedelta, max_credit: timedelta) -> int:
        """One reaper pass: tick the outage clock, credit outages, then suspect, recover, expire.

        Safe with every replica sweeping at once: passes serialize on the clock row, and each
        transition re-checks its condition under the row lock. Returns how many events it wrote.
        """
        written = 0
        async with self._pool.acquire() as con:
            async with con.transaction():
                credit = await clock.credit_due(
                    con,
                    threshold=outage_threshold,
                    cap=max_credit,
                    marker_query=OUTAGE_MARKER,
                    set_marker_query=SET_OUTAGE_MARKER,
                )
                if credit is not None:
                    await con.execute(CREDIT_LEASES, credit)
                for row in await con.fetch(SWEEP_HEALTH):
                    node = Node.from_row(row)
                    cls = node_pb2.NodeSuspected if node.health == Health.MISSED_CHECK_IN else node_pb2.NodeRecovered
                    await events.append(con, cls(node=convert.node_to_proto(node)), node_id=node.id)
                    written += 1
                    log.info(
                        "node %s %s",
                        node.id,
                        "missed its check-in" if cls is node_pb2.NodeSuspected else "checked in again",
                        extra={"event": "node_health", "node": node.id, "health": node.health.name},
                    )
                for row in await con.fetch(SWEEP_EXPIRED):
                    node = Node.from_row(row)
                    payload = node_pb2.NodeStateChanged(
                        node=convert.node_to_proto(node), previous_state=int(State.ONLINE)
                    )
                    await events.append(con, payload, node_id=node.id)
                    written += 1
                    log.warning(
                        "node %s lease expired: OFFLINE",
                        node.id,
                        extra={"event": "node_lease_expired", "node": node.id},
                    )
                stuck = [r["id"] for r in await con.fetch(STUCK_DELETING, timedelta(seconds=10))]
            for node_id in stuck:
                w = await self._finish_delete(con, node_id)
                written += bool(w.append_id)
        if written:
            self._committed()
        return written
