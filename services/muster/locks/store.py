"""Every SQL statement of the lock service, behind named async methods.

Acquires, releases and keep-alives run in batches through ``locks.run`` (sql/0003_batches.sql):
one statement, one round trip and one commit per batch, every lock row of the batch taken in name
order first (batches on any number of replicas never deadlock), the operations applied in arrival
order. Grants to waiters happen inside the statement that frees the lock (a release, an expiry, a
break), in line order, with their events; the waiting RPC is handed its grant at once on this
replica and learns it from the LockGranted event on any other.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from muster.api.locks.v1 import lock_pb2
from muster.core import clock, events, metrics
from muster.core.db import retry_serialization
from muster.core.errors import NotFoundError, StoreUnavailableError
from muster.locks import convert
from muster.locks.errors import LockHeldError, LockNotHeldError
from muster.locks.jobs import EXPIRED_FIRINGS
from muster.locks.models import (
    AcquireOp,
    Firing,
    Hold,
    KeepAliveOp,
    LockInfo,
    LockOp,
    ReleaseOp,
    Waiter,
)

log = logging.getLogger(__name__)

RUN = """
SELECT * FROM locks.run($1::int[], $2::text[], $3::bigint[], $4::smallint[], $5::text[], $6::bigint[], $7::text[],
                        $8::interval[], $9::interval[], $10::text[])
"""
SETTLE = "SELECT * FROM locks.settle($1)"
LOCK_ROW = "SELECT fence, now() AS now FROM locks.locks WHERE name = $1 FOR UPDATE"
LOCK_ROW_NOWAIT = "SELECT fence, now() AS now FROM locks.locks WHERE name = $1 FOR UPDATE SKIP LOCKED"
LIVE_HOLDS = "SELECT * FROM locks.holds WHERE name = $1 AND expire_time > now() ORDER BY token"
GRANT_OF = "SELECT * FROM locks.holds WHERE waiter_id = $1"
WAITING = "SELECT 1 FROM locks.waiters WHERE waiter_id = $1"
DELETE_WAITER = "DELETE FROM locks.waiters WHERE waiter_id = $1 RETURNING name"
DELETE_HOLD = "DELETE FROM locks.holds WHERE lease_id = $1 RETURNING *"
BREAK_HOLDS = "DELETE FROM locks.holds WHERE name = $1 RETURNING *"
EPOCH_FLOOR = "SELECT core.epoch_floor()"
MOVE_FENCE = "UPDATE locks.locks SET fence = greatest(fence, core.epoch_floor()) + 1 WHERE name = $1 RETURNING fence"
VALIDATE = """
SELECT l.fence,
       EXISTS (SELECT 1 FROM locks.holds h WHERE h.name = l.name AND h.token = $2 AND h.expire_time > now()) AS live
FROM locks.locks l WHERE l.name = $1
"""
LIST_LOCKS = """
SELECT l.name, l.fence FROM locks.locks l
WHERE l.name > $1
  AND (EXISTS (SELECT 1 FROM locks.holds h WHERE h.name = l.name)
       OR EXISTS (SELECT 1 FROM locks.waiters w WHERE w.name = l.name))
ORDER BY l.name LIMIT $2
"""
HOLDS_OF = "SELECT * FROM locks.holds WHERE name = ANY($1::text[]) ORDER BY name, token"
WAITERS_OF = "SELECT * FROM locks.waiters WHERE name = ANY($1::text[]) ORDER BY name, waiter_id"
NOW = "SELECT now()"
DUE_NAMES = """
SELECT name FROM locks.holds WHERE expire_time <= now()
UNION
SELECT name FROM locks.waiters WHERE deadline <= now()
"""
NODE_HOLDS = "SELECT lease_id FROM locks.holds WHERE node_id = $1"
OUTAGE_MARKER = "SELECT last_outage_id FROM locks.outage_marker WHERE id = 1 FOR UPDATE"
SET_OUTAGE_MARKER = "UPDATE locks.outage_marker SET last_outage_id = $1 WHERE id = 1"
CREDIT_HOLDS = "UPDATE locks.holds SET expire_time = expire_time + $1::interval"
CREDIT_WAITERS = "UPDATE locks.waiters SET deadline = deadline + $1::interval"
CREDIT_FIRINGS = "UPDATE locks.firings SET expire_time = expire_time + $1::interval WHERE state = 1"

# locks.outcome statuses (sql/0003_batches.sql)
_GRANTED, _QUEUED, _REFUSED, _RELEASED, _GONE, _KEPT, _NOT_HELD, _WAITER_GRANTED, _EXPIRED, _NUMBERED = range(1, 11)
_OPS = {AcquireOp: 1, ReleaseOp: 2, KeepAliveOp: 3}
_ZERO = timedelta(0)


@dataclass(frozen=True, slots=True)
class Acquired:
    """An acquire's result: a hold now, or a place in line (``waiter_id``) to wait on."""

    hold: Hold | None
    waiter_id: int = 0


Outcome = Acquired | bool | tuple[datetime, datetime] | Exception


class LockStore:
    """The lock service's tables.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes.
    """

    def __init__(self, pool: asyncpg.Pool, numberer: events.Numberer) -> None:
        self._pool = pool
        self._numberer = numberer
        self._grants: dict[int, asyncio.Future[Hold]] = {}

    def _committed(self) -> None:
        self._numberer.kick()

    # -- the batch -----------------------------------------------------------------------------

    async def run(self, ops: list[LockOp]) -> list[Outcome]:
        """Applies a batch in one statement; one outcome per operation, in order.

        An acquire's outcome is :class:`Acquired` or a :class:`LockHeldError` (``wait`` 0); a
        release's is whether it released; a keep-alive's is (expire_time, now) or a
        :class:`LockNotHeldError`. Raising means nothing of the batch committed.
        """
        n = len(ops)
        kinds = [0] * n
        names = [""] * n
        ids = [0] * n
        modes = [0] * n
        holders = [""] * n
        node_ids = [0] * n
        request_ids = [""] * n
        ttls = [_ZERO] * n
        waits = [_ZERO] * n
        reasons = [""] * n
        for i, op in enumerate(ops):
            kinds[i] = _OPS[type(op)]
            if isinstance(op, AcquireOp):
                names[i], modes[i], holders[i], node_ids[i] = op.name, int(op.mode), op.holder, op.node_id
                request_ids[i], ttls[i], waits[i] = op.request_id, op.ttl, op.wait
            else:
                ids[i] = op.lease_id
                if isinstance(op, ReleaseOp):
                    reasons[i] = op.reason

        async def attempt() -> list[asyncpg.Record]:
            async with self._pool.acquire() as con:
                return await con.fetch(
                    RUN, kinds, names, ids, modes, holders, node_ids, request_ids, ttls, waits, reasons
                )

        rows = await retry_serialization(attempt)
        outcomes: list[Outcome | None] = [None] * n
        for row in rows:
            status, i = row["status"], row["i"] - 1
            if status == _NUMBERED:
                self._numberer.numbered(row["token"])
                continue
            if i < 0:
                self._caused(row)
                continue
            op = ops[i]
            if status == _GRANTED:
                outcomes[i] = Acquired(Hold.from_row(row))
            elif status == _QUEUED:
                # Registered before anything can hand it a grant (a release later in this batch).
                self._grants.setdefault(row["waiter_id"], asyncio.get_running_loop().create_future())
                outcomes[i] = Acquired(None, row["waiter_id"])
            elif status == _REFUSED:
                assert isinstance(op, AcquireOp)
                outcomes[i] = LockHeldError(op.name, row["holder"] or "a waiter ahead", row["token"] or 0)
            elif status == _RELEASED:
                assert isinstance(op, ReleaseOp)
                outcomes[i] = True
                metrics.lock_hold.record(1000 * (row["now"] - row["grant_time"]).total_seconds())
                if op.reason != "RELEASED":
                    log.info(
                        "lock %s: hold %s (token %s) of %s released: %s",
                        row["name"],
                        row["lease_id"],
                        row["token"],
                        row["holder"],
                        op.reason,
                        extra={"event": "lock_released", "lock": row["name"]},
                    )
            elif status == _GONE:
                outcomes[i] = False
            elif status == _KEPT:
                outcomes[i] = (row["expire_time"], row["now"])
            elif status == _NOT_HELD:
                assert isinstance(op, KeepAliveOp)
                outcomes[i] = LockNotHeldError(op.lease_id)
        missing = [i for i, o in enumerate(outcomes) if o is None]
        if missing:
            raise RuntimeError(f"locks.run answered no outcome for operations {missing}")
        return outcomes  # type: ignore[return-value]

    def _caused(self, row: asyncpg.Record) -> None:
        """What a batch or a settle caused beside its operations: a grant to a waiter, an expiry."""
        if row["status"] == _WAITER_GRANTED:
            self.granted(row["waiter_id"], Hold.from_row(row))
        elif row["status"] == _EXPIRED:
            log.info(
                "lock %s: hold %s (token %s) of %s expired",
                row["name"],
                row["lease_id"],
                row["token"],
                row["holder"],
                extra={"event": "lock_released", "lock": row["name"], "reason": "EXPIRED"},
            )

    async def _settle(self, con: asyncpg.Connection, name: str) -> None:
        for row in await con.fetch(SETTLE, name):
            self._caused(row)

    # -- waiting -------------------------------------------------------------------------------

    def granted(self, waiter_id: int, hold: Hold) -> None:
        """Hands a grant to the local RPC waiting as ``waiter_id`` (a hand-off, or a LockGranted event)."""
        fut = self._grants.get(waiter_id)
        if fut is not None and not fut.done():
            fut.set_result(hold)

    @property
    def waiting(self) -> bool:
        """Whether any RPC of this replica waits for a grant."""
        return bool(self._grants)

    async def wait_for_grant(self, name: str, waiter_id: int, deadline: float, poll: float = 1.0) -> Hold:
        """Waits until the waiter is granted; ``deadline`` is loop time.

        Woken by the hand-off or the LockGranted event; every ``poll`` seconds it also looks in the
        table (a grant whose event this replica has not read yet).

        Raises:
            LockHeldError: the wait ended first. Cancelling gives the place in line up (and any grant back).
        """
        loop = asyncio.get_running_loop()
        fut = self._grants.setdefault(waiter_id, loop.create_future())
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait((fut,), timeout=min(remaining, poll))
                if fut.done():
                    return fut.result()
                async with self._pool.acquire() as con:
                    row = await con.fetchrow(GRANT_OF, waiter_id)
                    if row is not None:
                        return Hold.from_row(row)
                    if await con.fetchval(WAITING, waiter_id) is None:
                        if waiter_id < await con.fetchval(EPOCH_FLOOR):
                            # Queued before a failover that lost it (ids jump past the new epoch's
                            # floor): the client asks again, with its request id.
                            raise StoreUnavailableError("the database failed over while this acquire waited; retry it")
                        break  # dropped: its deadline passed by the database's clock, or granted and gone
            hold = await asyncio.shield(self._abandon(name, waiter_id, keep_grant=True))
            if hold is not None:
                return hold
            async with self._pool.acquire() as con:
                holds = await con.fetch(LIVE_HOLDS, name)
            top = holds[0] if holds else None
            raise LockHeldError(name, top["holder"] if top else "a waiter ahead", top["token"] if top else 0)
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(name, waiter_id, keep_grant=False))
            raise
        finally:
            self._grants.pop(waiter_id, None)

    async def _abandon(self, name: str, waiter_id: int, *, keep_grant: bool) -> Hold | None:
        """Leaves the line; a grant that raced in is kept (timeout) or given back (cancel).

        The lock's row is locked first, as every grant does, so this never deadlocks with one.
        """

        async def attempt() -> Hold | None:
            async with self._pool.acquire() as con, con.transaction():
                if await con.fetchrow(LOCK_ROW, name) is None:
                    return None
                if await con.fetchval(DELETE_WAITER, waiter_id) is None:
                    row = await con.fetchrow(GRANT_OF, waiter_id)
                    if row is not None and keep_grant:
                        return Hold.from_row(row)
                    if row is not None:
                        await con.execute(DELETE_HOLD, row["lease_id"])
                        await self._released(con, row, "RELEASED")
                await self._settle(con, name)  # those behind may go now
                return None

        hold = await retry_serialization(attempt)
        self._committed()
        return hold

    async def _released(self, con: asyncpg.Connection, row: asyncpg.Record, reason: str) -> None:
        hold = Hold.from_row(row)
        await events.append(
            con, lock_pb2.LockReleased(lease=convert.hold_to_proto(hold), reason=reason), node_id=hold.node_id
        )
        log.info(
            "lock %s: hold %s (token %s) of %s %s",
            hold.name,
            hold.lease_id,
            hold.token,
            hold.holder,
            reason.lower(),
            extra={"event": "lock_released", "lock": hold.name, "reason": reason},
        )

    # -- one at a time (the paths that are not hot) ---------------------------------------------

    async def release(self, lease_id: int, reason: str = "RELEASED") -> bool:
        """Releases one hold and grants the next waiters; False when it was already gone."""
        (released,) = await self.run([ReleaseOp(lease_id, reason)])
        return bool(released)

    async def break_lock(self, name: str) -> tuple[int, int]:
        """Releases every hold of ``name`` and moves its fence on; returns (fence, released)."""
        async with self._pool.acquire() as con, con.transaction():
            locked = await con.fetchrow(LOCK_ROW, name)
            if locked is None:
                raise NotFoundError(
                    f"lock {name} has never been held; `muster locks` lists the locks", domain="muster.locks", lock=name
                )
            rows = await con.fetch(BREAK_HOLDS, name)
            for row in rows:
                await self._released(con, row, "BROKEN")
            fence = await con.fetchval(MOVE_FENCE, name)
            await events.append(con, lock_pb2.LockBroken(name=name, fence=fence))
            await self._settle(con, name)
        self._committed()
        log.warning(
            "lock %s broken: %d holds released, fence moved to %d",
            name,
            len(rows),
            fence,
            extra={"event": "lock_broken", "lock": name},
        )
        return int(fence), len(rows)

    async def validate(self, name: str, token: int) -> tuple[bool, int]:
        """Whether ``token`` is a live hold of ``name``; and the fence."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(VALIDATE, name, token)
        if row is None:
            return False, 0
        return bool(row["live"]), int(row["fence"])

    async def list_locks(self, after: str, limit: int) -> tuple[list[LockInfo], bool, datetime]:
        """Locks held or waited for, by name."""
        async with self._pool.acquire() as con, con.transaction(isolation="repeatable_read", readonly=True):
            rows = await con.fetch(LIST_LOCKS, after, limit + 1)
            names = [r["name"] for r in rows[:limit]]
            holds = await con.fetch(HOLDS_OF, names)
            waiters = await con.fetch(WAITERS_OF, names)
            now = await con.fetchval(NOW)
        by_name = {r["name"]: LockInfo(r["name"], r["fence"], [], []) for r in rows[:limit]}
        for h in holds:
            by_name[h["name"]].holders.append(Hold.from_row(h))
        for w in waiters:
            by_name[w["name"]].waiters.append(Waiter.from_row(w))
        return list(by_name.values()), len(rows) > limit, now

    # -- sweeping ------------------------------------------------------------------------------

    async def sweep(self, *, outage_threshold: timedelta, max_credit: timedelta) -> int:
        """Credits outages, then expires holds, waiters and claims on the database's clock.

        Safe with every replica sweeping at once (each name is settled under its row lock; names
        another replica is settling are skipped). Returns how many locks it settled.
        """
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
                    await con.execute(CREDIT_HOLDS, credit)
                    await con.execute(CREDIT_WAITERS, credit)
                    await con.execute(CREDIT_FIRINGS, credit)
                for row in await con.fetch(EXPIRED_FIRINGS):
                    await events.append(
                        con,
                        lock_pb2.FiringChanged(firing=convert.firing_to_proto(Firing.from_row(row))),
                        node_id=row["node_id"],
                    )
                names = [r["name"] for r in await con.fetch(DUE_NAMES)]
            settled = 0
            for name in names:
                async with con.transaction():
                    locked = await con.fetchrow(LOCK_ROW_NOWAIT, name)
                    if locked is None:
                        continue  # another replica is on it
                    await self._settle(con, name)
                    settled += 1
        self._committed()
        return settled

    async def release_node(self, node_id: int) -> int:
        """Releases every hold of a node whose registry lease expired (or that was deleted)."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(NODE_HOLDS, node_id)
        if not rows:
            return 0
        outcomes = await self.run([ReleaseOp(r["lease_id"], "NODE_EXPIRED") for r in rows])
        return sum(1 for o in outcomes if o is True)
