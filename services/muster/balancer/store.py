"""Every SQL statement of the balancer, behind named async methods.

**Placements** arrive in batches (``core.batch.GroupCommit``) and are decided by
:func:`muster.balancer.decide.decide` on the per-node counts; the statement that reserves them
(``balancer.place``) first takes the placement lock (the ``balancer.settings`` row, FOR UPDATE) and
writes only if the counts the batch was decided on still hold — so every decision is the one it
would have been under the lock, and no other placement, on any replica, can slip between a
decision and its reservation. A burst therefore spreads exactly (1,000 placements over 5 equal
nodes: 200 each) and no node passes its capacity. A batch costs two round trips and one commit
(its events appended in one statement and numbered in it) while no other batch interferes.

**Moves** (a node's lease expired, or it left) run in batches under the same lock: each batch
selects the node's sessions FOR UPDATE, re-places each by the strategy, deletes the old rows and
inserts the new ones with their ``SessionMoved`` events. Replicas racing to move the same node
serialize on the lock and the second finds nothing left: each session moves exactly once.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import asyncpg

from muster.api.balancer.v1 import balancer_pb2
from muster.balancer.decide import Split, decide, is_capped, reserve_in
from muster.balancer.errors import NoEligibleNodeError, SessionNotFoundError
from muster.balancer.models import (
    BRIEF_CANDIDATES,
    CAPACITY_LABEL,
    Counts,
    Decision,
    NodeInfo,
    Session,
    SessionState,
    new_session_id,
)
from muster.core import events, metrics
from muster.core.db import retry_serialization

log = logging.getLogger(__name__)

LOCK_SETTINGS = "SELECT strategy FROM balancer.settings WHERE id = 1 FOR UPDATE"
STRATEGY = "SELECT strategy FROM balancer.settings WHERE id = 1"
SET_STRATEGY = "UPDATE balancer.settings SET strategy = $1, update_time = now() WHERE id = 1"
BY_REQUEST = "SELECT * FROM balancer.sessions WHERE request_id = ANY($1::text[])"
COUNTS = "SELECT node_id, sessions, placed FROM balancer.node_counts WHERE node_id = ANY($1::bigint[])"
ALL_COUNTS = "SELECT node_id, sessions, placed FROM balancer.node_counts"
INSERT_SESSIONS = """
INSERT INTO balancer.sessions (id, node_id, node_address, route, user_name, kind, state, pid, request_id,
                               place_time, start_time, moved_from)
SELECT u.id, u.node_id, u.address, u.route, u.user_name, u.kind, u.state, u.pid, u.request_id,
       coalesce(u.place_time, now()), u.start_time, u.moved_from
FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::smallint[], $8::int[],
            $9::text[], $10::timestamptz[], $11::timestamptz[], $12::text[])
     AS u(id, node_id, address, route, user_name, kind, state, pid, request_id, place_time, start_time, moved_from)
RETURNING *
"""
PLACEMENT_LOCK = "SELECT * FROM balancer.lock_for_placement($1::bigint[], $2::text[])"
# The placement lock, and then what a batch's decisions need, in one round trip (see the SQL function).
# Without the lock: what a batch decides on before PLACE checks it under the lock.
PLACEMENT_INPUTS = """
SELECT (SELECT strategy FROM balancer.settings WHERE id = 1) AS strategy, now() AS now,
       array_agg(c.node_id) AS ids, array_agg(c.sessions) AS n, array_agg(c.placed) AS pl,
       EXISTS (SELECT 1 FROM balancer.sessions x WHERE x.request_id = ANY($2::text[])) AS retried
FROM balancer.node_counts c WHERE c.node_id = ANY($1::bigint[])
"""
# A decided batch written if what it read still holds (sql/0002_place.sql), in one statement.
PLACE = """
SELECT * FROM balancer.place($1::bigint[], $2::int[], $3::int[], $4::text, $5::text[], $6::text[], $7::bigint[],
                             $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::timestamptz[],
                             $14::bigint[], $15::int[], $16::int[], $17::bytea[])
"""
OPTIMISTIC_ATTEMPTS = 4
ADD_COUNTS = """
INSERT INTO balancer.node_counts AS c (node_id, sessions, placed)
SELECT * FROM unnest($1::bigint[], $2::int[], $3::int[])
ON CONFLICT (node_id) DO UPDATE SET sessions = c.sessions + EXCLUDED.sessions, placed = c.placed + EXCLUDED.placed
"""
SESSION_FOR_UPDATE = "SELECT * FROM balancer.sessions WHERE id = $1 FOR UPDATE"
START = """
UPDATE balancer.sessions SET state = 2, pid = $2, start_time = coalesce(start_time, now()),
    node_id = $3, node_address = $4, route = $5
WHERE id = $1 RETURNING *
"""
DELETE_SESSION = "DELETE FROM balancer.sessions WHERE id = $1 RETURNING *"
SESSION = "SELECT * FROM balancer.sessions WHERE id = $1"
MOVED_TO = "SELECT new_id FROM balancer.moves WHERE old_id = $1"
NODE_SESSIONS_FOR_UPDATE = """
SELECT * FROM balancer.sessions WHERE node_id = $1 ORDER BY place_time, id LIMIT $2 FOR UPDATE
"""
DELETE_SESSIONS = "DELETE FROM balancer.sessions WHERE id = ANY($1::text[])"
RECORD_MOVES = """
INSERT INTO balancer.moves (old_id, new_id) SELECT * FROM unnest($1::text[], $2::text[])
ON CONFLICT (old_id) DO UPDATE SET new_id = EXCLUDED.new_id, move_time = now()
"""
# Ids moved earlier onto a session that moves now point straight at its new id.
FOLLOW_MOVES = """
UPDATE balancer.moves m SET new_id = u.new_id
FROM unnest($1::text[], $2::text[]) AS u(old_id, new_id) WHERE m.new_id = u.old_id
"""
LIST = """
SELECT * FROM balancer.sessions
WHERE ($1::bigint = 0 OR node_id = $1) AND (node_id, place_time, id) > ($2::bigint, $3::timestamptz, $4::text)
ORDER BY node_id, place_time, id LIMIT $5
"""
ALL_SESSIONS = "SELECT * FROM balancer.sessions ORDER BY node_id, place_time, id"
EXPIRE_PLACED = """
DELETE FROM balancer.sessions WHERE id IN (
    SELECT id FROM balancer.sessions WHERE state = 1 AND place_time < now() - $1::interval
    ORDER BY place_time LIMIT 1000 FOR UPDATE SKIP LOCKED
) RETURNING id, node_id
"""
NODES_WITH_SESSIONS = "SELECT DISTINCT node_id FROM balancer.sessions"
# Counted from the sessions themselves (not node_counts, whose rows stay at 0 after a node's last session).
SESSION_COUNTS = """
SELECT node_id, count(*)::int AS sessions, count(*) FILTER (WHERE state = 1)::int AS placed
FROM balancer.sessions GROUP BY node_id ORDER BY node_id
"""
END_NODE_SESSIONS = "DELETE FROM balancer.sessions WHERE node_id = $1 RETURNING id, node_id, state"
END_ALL_SESSIONS = "DELETE FROM balancer.sessions RETURNING id, node_id, state"
NOW = "SELECT now()"


def session_to_proto(s: Session) -> balancer_pb2.Session:
    """A Session message."""
    msg = balancer_pb2.Session()
    _fill(msg, s)
    return msg


def _fill(msg: balancer_pb2.Session, s: Session) -> None:
    msg.id = s.id
    msg.node_id = s.node_id
    msg.node_address = s.node_address
    msg.route = s.route
    msg.user = s.user
    msg.kind = s.kind
    msg.state = int(s.state)  # type: ignore[assignment]
    msg.pid = s.pid
    msg.moved_from = s.moved_from
    msg.place_time.FromDatetime(s.place_time)
    if s.start_time is not None:
        msg.start_time.FromDatetime(s.start_time)


@dataclass
class Ask:
    """One placement to decide in a batch. ``forced`` is the custom strategy's choice, decided before."""

    user: str
    kind: str
    request_id: str
    split: Split
    forced: NodeInfo | None = None
    fallback: str = ""
    everyone: bool = False  # score every candidate for the answer, not only the best few
    labels: dict[str, str] = field(default_factory=dict)  # the requirement (for a refusal's words)


@dataclass
class Placed:
    """A batch's answer to one Ask: the session (and its message, built once for the event and the
    answer), and the decision (None for a deduplicated retry)."""

    session: Session
    message: balancer_pb2.Session
    decision: Decision | None
    append_id: int = 0


@dataclass
class _Plan:
    """A batch decided on the counts it read: the outcomes and the arguments of PLACE."""

    out: list[Placed | Exception]
    args: list[object]
    placing: bool  # something to write
    after: dict[int, Counts]  # the candidates' counts once it is written


@dataclass
class _Rows:
    """Columns for INSERT_SESSIONS."""

    cols: list[list[object]] = field(default_factory=lambda: [[] for _ in range(12)])

    def add(
        self,
        sid: str,
        node: NodeInfo,
        user: str,
        kind: str,
        state: SessionState,
        *,
        pid: int = 0,
        request_id: str = "",
        place_time: datetime | None = None,
        start_time: datetime | None = None,
        moved_from: str = "",
    ) -> None:
        values = (sid, node.id, node.address, node.route, user, kind, int(state), pid, request_id)
        for col, v in zip(self.cols, (*values, place_time, start_time, moved_from), strict=True):
            col.append(v)


def _count_args(deltas: Counter[int], placed: Counter[int]) -> tuple[list[int], list[int], list[int]]:
    ids = sorted(set(deltas) | set(placed))
    return ids, [deltas[i] for i in ids], [placed[i] for i in ids]


class BalancerStore:
    """The balancer's tables.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes.
    """

    def __init__(self, pool: asyncpg.Pool, numberer: events.Numberer) -> None:
        self._pool = pool
        self._numberer = numberer
        # What the last placement statement left: the candidates' counts and the strategy (a batch
        # is decided on them without reading; balancer.place checks them under the lock), and the
        # database's clock against this process's monotonic one (for the place time).
        self._known: dict[int, Counts] = {}
        self._known_strategy = ""
        self._clock: tuple[datetime, float] | None = None

    def _forget_counts(self) -> None:
        """Counts changed outside a placement batch: the next batch reads them."""
        self._known.clear()

    def _inputs(self, ids: list[int]) -> dict[str, object] | None:
        """The last statement's counts as a read of PLACEMENT_INPUTS, if they cover ``ids``."""
        known, none = self._known, Counts()
        if self._clock is None or not self._known_strategy or any(i not in known for i in ids):
            return None
        at, mono = self._clock
        counts = [known.get(i, none) for i in ids]
        return {
            "strategy": self._known_strategy,
            "now": at + timedelta(seconds=time.monotonic() - mono),
            "ids": ids,
            "n": [c.sessions for c in counts],
            "pl": [c.placed for c in counts],
            "retried": False,  # balancer.place finds out
        }

    def _learn(self, ids: list[int], read: asyncpg.Record | dict[str, object], after: dict[int, Counts] | None) -> None:
        self._clock = (read["now"], time.monotonic())  # type: ignore[assignment]
        self._known_strategy = str(read["strategy"])
        if after is not None:
            self._known.update(after)
        else:
            fresh = {i: Counts(n, pl) for i, n, pl in zip(*(read[k] or [] for k in ("ids", "n", "pl")), strict=True)}  # type: ignore[call-overload]
            self._known.update({i: fresh.get(i, Counts()) for i in ids})

    async def revision_of(self, append_id: int) -> int:
        """Waits until the event is numbered; returns its revision."""
        return await self._numberer.revision_of(append_id)

    # -- strategy ------------------------------------------------------------------------------

    async def strategy(self) -> str:
        """The cluster's placement strategy."""
        async with self._pool.acquire() as con:
            return str(await con.fetchval(STRATEGY))

    async def set_strategy(self, name: str) -> tuple[str, int]:
        """Sets the strategy; returns the previous one and the event's append id."""
        async with self._pool.acquire() as con, con.transaction():
            previous = str(await con.fetchval(LOCK_SETTINGS))
            await con.execute(SET_STRATEGY, name)
            append_id = await events.append(con, balancer_pb2.StrategyChanged(strategy=name))
        self._known_strategy = ""
        self._numberer.kick()
        log.info("placement strategy %s (was %s)", name, previous, extra={"event": "strategy_changed"})
        return previous, append_id

    # -- placements ----------------------------------------------------------------------------

    async def counts(self, node_ids: Sequence[int]) -> dict[int, Counts]:
        """Sessions per node (for a dry run: no lock, no reservation)."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(COUNTS, list(node_ids))
        return {r["node_id"]: Counts(r["sessions"], r["placed"]) for r in rows}

    async def reserve(self, asks: list[Ask], key: bytes) -> list[Placed | Exception]:
        """Decides and reserves a batch of placements; one outcome per ask, in order (a refusal, such
        as every candidate being full, is that ask's own :class:`NoEligibleNodeError`).

        The batch is decided on counts read without a lock and written by one statement that checks,
        under the placement lock, that they still hold (two round trips, one commit); when another
        batch got there first, it is decided again on the counts that statement saw. After a few
        such losses it is decided and written inside a transaction holding the lock. A batch that
        fails on one placement's data is split, so that only that placement fails.
        """
        try:
            return await self._reserve(asks, key)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            if len(asks) == 1:
                return [exc]
            half = len(asks) // 2
            return [*await self.reserve(asks[:half], key), *await self.reserve(asks[half:], key)]

    async def _reserve(self, asks: list[Ask], key: bytes) -> list[Placed | Exception]:
        rids = [a.request_id for a in asks if a.request_id]
        ids = sorted({n.id for a in asks for n in a.split.candidates})
        async with self._pool.acquire() as con:
            read = self._inputs(ids)
            if read is None:
                read = await con.fetchrow(PLACEMENT_INPUTS, ids, rids)
                self._learn(ids, read, None)
            for attempt in range(OPTIMISTIC_ATTEMPTS):
                plan = await self._plan(con, asks, key, ids, read)
                if not plan.placing:
                    return plan.out
                row = await retry_serialization(lambda plan=plan: con.fetchrow(PLACE, *plan.args))
                if row["placed"]:
                    metrics.placement_batches.add(1, {"attempt": "again" if attempt else "first"})
                    self._learn(ids, row, plan.after)
                    return self._placed(plan, row)
                # Another batch (another replica's, or a report) got there first: decide again on
                # what the statement saw under the lock.
                self._learn(ids, row, None)
                read = row
            log.debug("a placement batch lost %d races; deciding it under the lock", OPTIMISTIC_ATTEMPTS)

            async def locked() -> tuple[_Plan, asyncpg.Record | None]:
                async with con.transaction():
                    head = await con.fetchrow(PLACEMENT_LOCK, ids, rids)
                    plan = await self._plan(con, asks, key, ids, head)
                    if not plan.placing:
                        return plan, None
                    row = await con.fetchrow(PLACE, *plan.args)
                    if not row["placed"]:  # under the lock nothing can change what it read
                        raise RuntimeError("balancer.place found other counts than the lock's own read")
                    return plan, row

            plan, row = await retry_serialization(locked)
            if row is None:
                return plan.out
            metrics.placement_batches.add(1, {"attempt": "locked"})
            self._learn(ids, row, plan.after)
            return self._placed(plan, row)

    def _placed(self, plan: _Plan, row: asyncpg.Record) -> list[Placed | Exception]:
        self._numberer.numbered(row["head"])
        append_ids = iter(row["append_ids"] or ())
        for p in plan.out:
            if isinstance(p, Placed) and p.decision is not None:
                p.append_id = next(append_ids)
        return plan.out

    async def _plan(
        self,
        con: asyncpg.Connection,
        asks: list[Ask],
        key: bytes,
        ids: list[int],
        read: asyncpg.Record | dict[str, object],
    ) -> _Plan:
        """Decides a batch (pure, but for reading the sessions of retried request ids)."""
        strategy, now = str(read["strategy"]), read["now"]
        counts = {i: Counts(n, pl) for i, n, pl in zip(*(read[k] or [] for k in ("ids", "n", "pl")), strict=True)}
        none = Counts()
        expected = [counts.get(i, none) for i in ids]
        seen: dict[str, Placed] = {}
        if read["retried"]:  # a retry of a placement already made: answer it again
            for r in await con.fetch(BY_REQUEST, [a.request_id for a in asks if a.request_id]):
                s = Session.from_row(r)
                seen[r["request_id"]] = Placed(s, session_to_proto(s), None)
        cols: list[list[object]] = [[] for _ in range(8)]
        payloads: list[bytes] = []
        out: list[Placed | Exception] = []
        fresh: dict[str, Placed] = {}  # request id -> its placement, for duplicates within the batch
        delta: Counter[int] = Counter()
        for a in asks:
            if a.request_id in seen or a.request_id in fresh:
                p = seen.get(a.request_id) or fresh[a.request_id]
                out.append(Placed(p.session, p.message, None))
                continue
            try:
                decision = decide(
                    strategy,
                    a.user,
                    a.split.candidates,
                    counts,
                    excluded=a.split.excluded,
                    forced=a.forced,
                    fallback=a.fallback,
                    limit=None if a.everyone else BRIEF_CANDIDATES,
                    capped=a.split.capped,
                    labels=a.labels,
                )
            except NoEligibleNodeError as exc:
                out.append(exc)
                continue
            winner = decision.winner
            sid = new_session_id(key, winner.route)
            reserve_in(counts, winner.id)
            delta[winner.id] += 1
            session = Session(
                sid, winner.id, winner.address, winner.route, a.user, a.kind, SessionState.PLACED, 0, now, None
            )
            event = balancer_pb2.SessionPlaced(strategy=decision.strategy)
            _fill(event.session, session)
            values = (sid, winner.id, winner.address, winner.route, a.user, a.kind, a.request_id, now)
            for col, v in zip(cols, values, strict=True):
                col.append(v)
            payloads.append(event.SerializeToString())
            placed = Placed(session, event.session, decision)
            out.append(placed)
            if a.request_id:
                fresh[a.request_id] = placed
        c_ids = sorted(delta)
        args: list[object] = [
            ids,
            [c.sessions for c in expected],
            [c.placed for c in expected],
            strategy,
            [a.request_id for a in asks if a.request_id and a.request_id not in seen],
            *cols,
            c_ids,
            [delta[i] for i in c_ids],
            [delta[i] for i in c_ids],
            payloads,
        ]
        return _Plan(out, args, bool(payloads), {i: counts.get(i, none) for i in ids})

    # -- reports -------------------------------------------------------------------------------

    async def started(self, node: NodeInfo, session_id: str, pid: int, user: str, kind: str) -> Session:
        """A node's agent reports a session started: a placed one moves to STARTED (on the reporting
        node); an unknown one is recorded as STARTED there; one moved off its node since is left as
        the move made it (the report is stale).

        Raises:
            SessionNotFoundError: the session was moved and has ended since.
        """
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(SESSION_FOR_UPDATE, session_id)
            if row is None:
                moved_to = await con.fetchval(MOVED_TO, session_id)
                if moved_to is not None:
                    # A late report for an id whose session was moved off its node (found by the chaos
                    # checker): the move stands; the report changes nothing.
                    current = await con.fetchrow(SESSION, moved_to)
                    if current is None:
                        raise SessionNotFoundError(session_id)
                    return Session.from_row(current)
                rows = _Rows()
                rows.add(session_id, node, user, kind, SessionState.STARTED, pid=pid)
                await con.execute(INSERT_SESSIONS, *rows.cols)
                session = Session.from_row(
                    await con.fetchrow(START, session_id, pid, node.id, node.address, node.route)
                )
                await con.execute(ADD_COUNTS, [node.id], [1], [0])
            else:
                before = Session.from_row(row)
                session = Session.from_row(
                    await con.fetchrow(START, session_id, pid, node.id, node.address, node.route)
                )
                if before.state is SessionState.STARTED and before.node_id == node.id and before.pid == pid:
                    return session  # a repeated report: nothing changes
                moves: Counter[int] = Counter({node.id: 1})
                moves[before.node_id] -= 1  # nets to nothing for a new pid on the same node
                placed: Counter[int] = Counter()
                if before.state is SessionState.PLACED:
                    placed[before.node_id] -= 1
                await con.execute(ADD_COUNTS, *_count_args(moves, placed))
            await events.append(
                con,
                balancer_pb2.SessionStarted(
                    session=session_to_proto(session),
                    previous_node_id=0 if row is None else before.node_id,
                    previous_state=0 if row is None else int(before.state),  # type: ignore[arg-type]
                ),
                node_id=node.id,
            )
        self._forget_counts()
        self._numberer.kick()
        return session

    async def ended(self, node_id: int, session_id: str, reason: str = "ENDED") -> Session | None:
        """A session ended: its row goes (repeated reports are harmless); returns it if it was there."""
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(DELETE_SESSION, session_id)
            if row is None:
                return None
            s = Session.from_row(row)
            await con.execute(ADD_COUNTS, [s.node_id], [-1], [-1 if s.state is SessionState.PLACED else 0])
            await events.append(
                con,
                balancer_pb2.SessionEnded(
                    session_id=s.id,
                    node_id=s.node_id,
                    reason=reason,
                    state=int(s.state),  # type: ignore[arg-type]
                ),
                node_id=s.node_id,
            )
        self._forget_counts()
        self._numberer.kick()
        return s

    # -- reads ---------------------------------------------------------------------------------

    async def list_sessions(
        self, node_id: int, after: tuple[int, datetime, str] | None, limit: int
    ) -> tuple[list[Session], datetime]:
        """A page of sessions by (node, place time, id)."""
        key = after or (0, datetime(1970, 1, 1, tzinfo=UTC), "")
        async with self._pool.acquire() as con:
            rows = await con.fetch(LIST, node_id, key[0], key[1], key[2], limit)
            now = await con.fetchval(NOW)
        return [Session.from_row(r) for r in rows], now

    async def all_sessions(self) -> tuple[list[Session], datetime]:
        """Every session (the status view)."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(ALL_SESSIONS)
            now = await con.fetchval(NOW)
        return [Session.from_row(r) for r in rows], now

    async def route(self, session_id: str) -> tuple[Session, bool] | None:
        """The session under this id, or under the id it was moved to; None if neither exists."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(SESSION, session_id)
            if row is not None:
                return Session.from_row(row), False
            new_id = await con.fetchval(MOVED_TO, session_id)
            if new_id is None:
                return None
            row = await con.fetchrow(SESSION, new_id)
        return (Session.from_row(row), True) if row is not None else None

    async def nodes_with_sessions(self) -> set[int]:
        """Nodes that have sessions."""
        async with self._pool.acquire() as con:
            return {r["node_id"] for r in await con.fetch(NODES_WITH_SESSIONS)}

    async def session_counts(self) -> tuple[list[tuple[int, int, int]], int]:
        """Every node's (id, sessions, placed) and the revision they reflect exactly."""
        async with self._pool.acquire() as con, self._numberer.snapshot(con) as revision:
            rows = await con.fetch(SESSION_COUNTS)
        return [(r["node_id"], r["sessions"], r["placed"]) for r in rows], revision

    async def evacuate(
        self, node_id: int, candidates: Callable[[], list[NodeInfo]], key: bytes, *, end_stranded: bool
    ) -> tuple[int, int]:
        """Moves a node's sessions as a failover does; with ``end_stranded``, ends those that no
        other node can take (SessionEnded NODE_DELETED). Returns (moved, ended)."""
        moved = await self.move_sessions(node_id, candidates, key)
        ended = await self.end_sessions(node_id, "NODE_DELETED") if end_stranded else 0
        if ended:
            log.warning(
                "ended %d sessions of node %s: no other node could take them",
                ended,
                node_id,
                extra={"event": "sessions_ended", "node": node_id, "count": ended},
            )
        return moved, ended

    async def end_sessions(self, node_id: int | None, reason: str) -> int:
        """Ends a node's sessions (every session for None), with their SessionEnded events; returns how many."""
        async with self._pool.acquire() as con, con.transaction():
            await con.fetchval(LOCK_SETTINGS)  # after any move or placement in flight on another replica
            if node_id is None:
                rows = await con.fetch(END_ALL_SESSIONS)
            else:
                rows = await con.fetch(END_NODE_SESSIONS, node_id)
            if rows:
                total: Counter[int] = Counter(r["node_id"] for r in rows)
                placed: Counter[int] = Counter(r["node_id"] for r in rows if r["state"] == int(SessionState.PLACED))
                ids = sorted(total)
                await con.execute(ADD_COUNTS, ids, [-total[i] for i in ids], [-placed[i] for i in ids])
                await events.append_many(
                    con,
                    [
                        (
                            balancer_pb2.SessionEnded(
                                session_id=r["id"], node_id=r["node_id"], reason=reason, state=r["state"]
                            ),
                            r["node_id"],
                        )
                        for r in rows
                    ],
                )
        if rows:
            self._forget_counts()
            self._numberer.kick()
        return len(rows)

    # -- moves and expiry ----------------------------------------------------------------------

    async def move_sessions(
        self, node_id: int, candidates: Callable[[], list[NodeInfo]], key: bytes, *, batch: int = 500
    ) -> int:
        """Moves every session of a node to other candidates by the strategy; returns how many moved.

        Stops early (leaving the rest for the next sweep) when there is no candidate.
        """
        moved = 0
        while True:

            async def attempt() -> int:
                async with self._pool.acquire() as con, con.transaction():
                    strategy = str(await con.fetchval(LOCK_SETTINGS))
                    rows = [Session.from_row(r) for r in await con.fetch(NODE_SESSIONS_FOR_UPDATE, node_id, batch)]
                    if not rows:
                        return 0
                    pool = [n for n in candidates() if n.id != node_id]
                    if not pool:
                        log.warning(
                            "node %s's %d+ sessions cannot be moved: no node can take them",
                            node_id,
                            len(rows),
                            extra={"event": "sessions_stranded", "node": node_id},
                        )
                        return -1
                    counts = {
                        r["node_id"]: Counts(r["sessions"], r["placed"])
                        for r in await con.fetch(COUNTS, [n.id for n in pool])
                    }
                    new, payloads = _Rows(), []
                    delta: Counter[int] = Counter({node_id: -len(rows)})
                    placed: Counter[int] = Counter()
                    olds, news = [], []
                    capped = is_capped(pool)
                    for s in rows:
                        try:
                            winner = decide(strategy, s.user, pool, counts, limit=1, capped=capped).winner
                        except NoEligibleNodeError:
                            log.warning(
                                "node %s's sessions cannot all be moved: every other node is full (%s)",
                                node_id,
                                CAPACITY_LABEL,
                                extra={"event": "sessions_stranded", "node": node_id},
                            )
                            break
                        sid = new_session_id(key, winner.route)
                        is_placed = s.state is SessionState.PLACED
                        reserve_in(counts, winner.id, placed=is_placed)
                        delta[winner.id] += 1
                        if is_placed:
                            placed[winner.id] += 1
                            placed[node_id] -= 1
                        new.add(
                            sid,
                            winner,
                            s.user,
                            s.kind,
                            s.state,
                            place_time=s.place_time,
                            start_time=s.start_time,
                            moved_from=s.id,
                        )
                        olds.append(s.id)
                        news.append(sid)
                    if not olds:
                        return -1
                    rows = rows[: len(olds)]
                    delta[node_id] = -len(olds)
                    await con.execute(DELETE_SESSIONS, olds)
                    inserted = {r["id"]: Session.from_row(r) for r in await con.fetch(INSERT_SESSIONS, *new.cols)}
                    await con.execute(FOLLOW_MOVES, olds, news)
                    await con.execute(RECORD_MOVES, olds, news)
                    await con.execute(ADD_COUNTS, *_count_args(delta, placed))
                    for old, s_new in zip(rows, news, strict=True):
                        ns = inserted[s_new]
                        payloads.append(
                            (
                                balancer_pb2.SessionMoved(
                                    session=session_to_proto(ns), previous_id=old.id, previous_node_id=node_id
                                ),
                                ns.node_id,
                            )
                        )
                    await events.append_many(con, payloads)
                    return len(rows)

            n = await retry_serialization(attempt)
            if n <= 0:
                break
            moved += n
            self._forget_counts()
            self._numberer.kick()
        if moved:
            metrics.sessions_moved.add(moved)
            log.info(
                "moved %d sessions off node %s",
                moved,
                node_id,
                extra={"event": "sessions_moved", "node": node_id, "count": moved},
            )
        return moved

    async def expire_placed(self, ttl: timedelta) -> int:
        """Ends placements never started within ``ttl`` (SessionEnded EXPIRED); returns how many."""
        async with self._pool.acquire() as con, con.transaction():
            rows = await con.fetch(EXPIRE_PLACED, ttl)
            if not rows:
                return 0
            by_node = Counter(r["node_id"] for r in rows)
            ids = sorted(by_node)
            await con.execute(ADD_COUNTS, ids, [-by_node[i] for i in ids], [-by_node[i] for i in ids])
            await events.append_many(
                con,
                [
                    (
                        balancer_pb2.SessionEnded(
                            session_id=r["id"],
                            node_id=r["node_id"],
                            reason="EXPIRED",
                            state=balancer_pb2.Session.STATE_PLACED,
                        ),
                        r["node_id"],
                    )
                    for r in rows
                ],
            )
        self._forget_counts()
        self._numberer.kick()
        return len(rows)


def labels_json(labels: dict[str, str]) -> str:
    """Labels as stored."""
    return json.dumps(labels, sort_keys=True)
