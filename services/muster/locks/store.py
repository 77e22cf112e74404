"""Every SQL statement of the lock service, behind named async methods.

Per lock name, every change runs in a transaction that first locks the lock's row, so grants,
releases, expiries and breaks of one name serialize while different names run in parallel.
Grants to waiters happen inside the transaction that frees the lock (a release, an expiry, a
break), in waiter order: the waiting RPC, on whichever replica, only picks its grant up.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from muster.api.locks.v1 import lock_pb2
from muster.core import clock, events, metrics
from muster.core.db import retry_serialization
from muster.core.errors import InvalidArgumentError, NotFoundError
from muster.locks import convert
from muster.locks.errors import (
    FiringClaimedError,
    FiringDoneError,
    LockHeldError,
    LockNotHeldError,
    MisfiredError,
    StaleTokenError,
)
from muster.locks.models import Firing, FiringState, Hold, LockInfo, Mode, Waiter, compatible

log = logging.getLogger(__name__)

# Creates the lock's row if need be and locks it; within the transaction now() is fixed, so the
# grant's times are known here, and a lease id is drawn for an immediate grant.
LOCK_AND_NOW = """
INSERT INTO locks.locks AS l (name) VALUES ($1)
ON CONFLICT (name) DO UPDATE SET fence = l.fence
RETURNING fence, now() AS now, nextval('locks.lease_ids') AS next_lease_id
"""
LOCK_ROW = "SELECT fence, now() AS now FROM locks.locks WHERE name = $1 FOR UPDATE"
LOCK_ROW_NOWAIT = "SELECT fence, now() AS now FROM locks.locks WHERE name = $1 FOR UPDATE SKIP LOCKED"
# One round trip: drop what expired (returning the expired holds) and read the live holds and queue.
# Live means "not deleted here", not "expire_time > now() in this statement's snapshot": a keep-alive
# or an outage credit committed while the DELETE waited for the row makes it skip the row (it is
# re-checked against the new expiry), and the snapshot still shows the old expiry; judging by that,
# the hold would be neither expired nor live, and its waiter would be granted beside it.
STATE = """
WITH expired AS (DELETE FROM locks.holds WHERE name = $1 AND expire_time <= now() RETURNING *),
     dead AS (DELETE FROM locks.waiters WHERE name = $1 AND deadline <= now() RETURNING waiter_id)
SELECT 1 AS part, e.lease_id, e.name, e.token, e.mode, e.holder, e.node_id, e.request_id, e.ttl, e.grant_time,
       e.expire_time, 0::bigint AS waiter_id
FROM expired e
UNION ALL
SELECT 2, h.lease_id, h.name, h.token, h.mode, h.holder, h.node_id, h.request_id, h.ttl, h.grant_time,
       h.expire_time, 0
FROM locks.holds h WHERE h.name = $1 AND h.lease_id NOT IN (SELECT lease_id FROM expired)
UNION ALL
SELECT 3, 0, w.name, 0, w.mode, w.holder, w.node_id, w.request_id, w.ttl, NULL, NULL, w.waiter_id
FROM locks.waiters w
WHERE w.name = $1 AND w.granted_lease_id IS NULL AND w.waiter_id NOT IN (SELECT waiter_id FROM dead)
ORDER BY 1, 4, 12
"""
LIVE_HOLDS = "SELECT * FROM locks.holds WHERE name = $1 AND expire_time > now() ORDER BY token"
NEXT_LEASE_IDS = "SELECT nextval('locks.lease_ids') AS id FROM generate_series(1, $1)"
# One round trip: bump the fence, record the hold, mark the waiter, append the event.
GRANT = """
WITH f AS (UPDATE locks.locks SET fence = $2 WHERE name = $1),
     h AS (INSERT INTO locks.holds (lease_id, name, token, mode, holder, node_id, request_id, ttl, grant_time,
                                    expire_time)
           VALUES ($3, $1, $2, $4, $5, $6, $7, $8::interval, $9::timestamptz, $9::timestamptz + $8::interval)),
     w AS (UPDATE locks.waiters SET granted_lease_id = $3 WHERE waiter_id = $10)
SELECT core.append_event($11, $6, $12)
"""
ENQUEUE = """
INSERT INTO locks.waiters (name, mode, holder, node_id, request_id, ttl, deadline)
VALUES ($1, $2, $3, $4, $5, $6::interval, now() + $7::interval)
RETURNING waiter_id
"""
WAITER_STATUS = """
SELECT w.granted_lease_id, h.* FROM locks.waiters w
LEFT JOIN locks.holds h ON h.lease_id = w.granted_lease_id
WHERE w.waiter_id = $1
"""
DELETE_WAITER = "DELETE FROM locks.waiters WHERE waiter_id = $1 RETURNING name, granted_lease_id"
HOLD_AND_LOCK = """
SELECT h.*, l.fence, now() AS now FROM locks.holds h JOIN locks.locks l ON l.name = h.name
WHERE h.lease_id = $1 FOR UPDATE OF l
"""
DELETE_HOLD = "DELETE FROM locks.holds WHERE lease_id = $1 RETURNING *"
RELEASE_WITH_EVENT = """
WITH d AS (DELETE FROM locks.holds WHERE lease_id = $1 RETURNING lease_id)
SELECT core.append_event($2, $3, $4) FROM d
"""
KEEP_ALIVE = """
UPDATE locks.holds SET expire_time = now() + ttl
WHERE lease_id = $1 AND expire_time > now()
RETURNING expire_time, now() AS now
"""
BREAK_HOLDS = "DELETE FROM locks.holds WHERE name = $1 RETURNING *"
MOVE_FENCE = "UPDATE locks.locks SET fence = fence + 1 WHERE name = $1 RETURNING fence"
VALIDATE = """
SELECT l.fence,
       EXISTS (SELECT 1 FROM locks.holds h WHERE h.name = l.name AND h.token = $2 AND h.expire_time > now()) AS live
FROM locks.locks l WHERE l.name = $1
"""
LIST_LOCKS = """
SELECT l.name, l.fence FROM locks.locks l
WHERE l.name > $1
  AND (EXISTS (SELECT 1 FROM locks.holds h WHERE h.name = l.name)
       OR EXISTS (SELECT 1 FROM locks.waiters w WHERE w.name = l.name AND w.granted_lease_id IS NULL))
ORDER BY l.name LIMIT $2
"""
HOLDS_OF = "SELECT * FROM locks.holds WHERE name = ANY($1::text[]) ORDER BY name, token"
WAITERS_OF = """
SELECT * FROM locks.waiters WHERE name = ANY($1::text[]) AND granted_lease_id IS NULL ORDER BY name, waiter_id
"""
NOW = "SELECT now()"
DUE_NAMES = """
SELECT name FROM locks.holds WHERE expire_time <= now()
UNION
SELECT name FROM locks.waiters WHERE deadline <= now()
"""
NODE_HOLDS = "SELECT lease_id, name FROM locks.holds WHERE node_id = $1"
OUTAGE_MARKER = "SELECT last_outage_id FROM locks.outage_marker WHERE id = 1 FOR UPDATE"
SET_OUTAGE_MARKER = "UPDATE locks.outage_marker SET last_outage_id = $1 WHERE id = 1"
CREDIT_HOLDS = "UPDATE locks.holds SET expire_time = expire_time + $1::interval"
CREDIT_WAITERS = "UPDATE locks.waiters SET deadline = deadline + $1::interval"
CREDIT_FIRINGS = "UPDATE locks.firings SET expire_time = expire_time + $1::interval WHERE state = 1"

FIRING_FOR_UPDATE = "SELECT *, now() AS now FROM locks.firings WHERE job = $1 AND scheduled_time = $2 FOR UPDATE"
INSERT_FIRING = """
INSERT INTO locks.firings (job, scheduled_time, holder, node_id, token, state, recoverable, expire_time,
                           claim_request_id)
VALUES ($1, $2, $3, $4, 1, $5, $6, now() + $7::interval, $8)
ON CONFLICT (job, scheduled_time) DO NOTHING
RETURNING *
"""
RECLAIM_FIRING = """
UPDATE locks.firings SET holder = $3, node_id = $4, token = token + 1, attempt = attempt + 1, state = 1,
       claim_time = now(), expire_time = now() + $5::interval, recoverable = $6, claim_request_id = $7
WHERE job = $1 AND scheduled_time = $2
RETURNING *
"""
SET_FIRING_STATE = """
UPDATE locks.firings SET state = $3::smallint,
       complete_time = CASE WHEN $3::smallint IN (2, 5) THEN now() ELSE complete_time END
WHERE job = $1 AND scheduled_time = $2
RETURNING *
"""
EXPIRED_FIRINGS = """
UPDATE locks.firings SET state = 3 WHERE state = 1 AND expire_time <= now() RETURNING *
"""
LIST_FIRINGS = """
SELECT * FROM locks.firings WHERE ($1 = '' OR job = $1) ORDER BY scheduled_time DESC, job LIMIT $2
"""


@dataclass(frozen=True)
class Acquired:
    """An acquire's result: a hold now, or a waiter to wait on."""

    hold: Hold | None
    waiter_id: int = 0
    deadline: float = 0.0  # loop time


class LockStore:
    """The lock service's tables.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes.
    """

    def __init__(self, pool: asyncpg.Pool, numberer: events.Numberer) -> None:
        self._pool = pool
        self._numberer = numberer
        self._grants: dict[int, asyncio.Future[None]] = {}

    def _committed(self) -> None:
        self._numberer.kick()

    # -- granting ------------------------------------------------------------------------------

    async def _grant(
        self,
        con: asyncpg.Connection,
        name: str,
        token: int,
        lease_id: int,
        now: datetime,
        mode: Mode,
        holder: str,
        node_id: int,
        request_id: str,
        ttl: timedelta,
        waiter_id: int = 0,
    ) -> Hold:
        """Grants in one statement (fence, hold, waiter, event); the caller holds the lock row."""
        hold = Hold(lease_id, name, token, mode, holder, node_id, ttl, now, now + ttl)
        payload = lock_pb2.LockGranted(lease=convert.hold_to_proto(hold), waiter_id=waiter_id)
        await con.fetchval(
            GRANT,
            name,
            token,
            lease_id,
            int(mode),
            holder,
            node_id,
            request_id,
            ttl,
            now,
            waiter_id,
            events.kind_of(payload),
            payload.SerializeToString(),
        )
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

    async def _settle(
        self, con: asyncpg.Connection, name: str, fence: int, now: datetime
    ) -> tuple[int, list[Any], list[asyncpg.Record]]:
        """Expires dead holds and waiters of ``name`` and grants waiters in order (the lock row is locked).

        Returns the fence, the live holds — those granted here included, so that the caller never
        grants beside them — and the waiters still queued, for the caller to decide on.
        """
        rows = await con.fetch(STATE, name)
        holds: list[Any] = [r for r in rows if r["part"] == 2]
        queue = [r for r in rows if r["part"] == 3]
        for row in rows:
            if row["part"] == 1:
                await self._released(con, row, "EXPIRED")
        held = [Mode(r["mode"]) for r in holds]
        go = 0
        for w in queue:
            if not compatible(Mode(w["mode"]), held):
                break  # FIFO: nobody overtakes the first waiter that cannot go
            held.append(Mode(w["mode"]))
            go += 1
        if go:
            ids = [r["id"] for r in await con.fetch(NEXT_LEASE_IDS, go)]
            for w, lease_id in zip(queue[:go], ids, strict=True):
                fence += 1
                await self._grant(
                    con,
                    name,
                    fence,
                    lease_id,
                    now,
                    Mode(w["mode"]),
                    w["holder"],
                    w["node_id"],
                    w["request_id"],
                    w["ttl"],
                    w["waiter_id"],
                )
                holds.append(
                    {
                        "lease_id": lease_id,
                        "name": name,
                        "token": fence,
                        "mode": w["mode"],
                        "holder": w["holder"],
                        "node_id": w["node_id"],
                        "request_id": w["request_id"],
                        "ttl": w["ttl"],
                        "grant_time": now,
                        "expire_time": now + w["ttl"],
                        "waiter_id": w["waiter_id"],
                    }
                )
        return fence, holds, queue[go:]

    # -- acquire, keep alive, release ----------------------------------------------------------

    async def acquire(
        self, name: str, *, ttl: timedelta, wait: timedelta, mode: Mode, holder: str, node_id: int, request_id: str
    ) -> Acquired:
        """Grants at once, refuses (wait 0), or queues a waiter for :meth:`wait_for_grant`.

        Raises:
            LockHeldError: held by another and ``wait`` is 0.
        """
        loop = asyncio.get_running_loop()

        async def attempt() -> tuple[Acquired | None, LockHeldError | None]:
            async with self._pool.acquire() as con, con.transaction():
                locked = await con.fetchrow(LOCK_AND_NOW, name)
                fence, holds, queue = await self._settle(con, name, locked["fence"], locked["now"])
                if request_id:  # a retried acquire: the same hold, or the same place in line
                    for h in holds:
                        if h["request_id"] == request_id:
                            return Acquired(Hold.from_row(h)), None
                    for w in queue:
                        if w["request_id"] == request_id:
                            return Acquired(None, w["waiter_id"], loop.time() + wait.total_seconds()), None
                if not queue and compatible(mode, [Mode(h["mode"]) for h in holds]):
                    hold = await self._grant(
                        con,
                        name,
                        fence + 1,
                        locked["next_lease_id"],
                        locked["now"],
                        mode,
                        holder,
                        node_id,
                        request_id,
                        ttl,
                    )
                    return Acquired(hold), None
                if wait <= timedelta(0):
                    top = holds[0] if holds else None
                    return None, LockHeldError(
                        name, top["holder"] if top else "a waiter ahead", top["token"] if top else 0
                    )
                waiter_id = await con.fetchval(ENQUEUE, name, int(mode), holder, node_id, request_id, ttl, wait)
                return Acquired(None, waiter_id, loop.time() + wait.total_seconds()), None

        result, refusal = await retry_serialization(attempt)
        self._committed()
        if refusal is not None:
            raise refusal
        assert result is not None
        return result

    def granted(self, waiter_id: int) -> None:
        """Wakes the local RPC waiting on ``waiter_id`` (called for LockGranted events)."""
        fut = self._grants.get(waiter_id)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_for_grant(self, name: str, waiter_id: int, deadline: float, poll: float = 1.0) -> Hold:
        """Waits until the waiter is granted (woken by its LockGranted event; a slow poll as fallback).

        Raises:
            LockHeldError: the wait ended first. Cancelling gives the place in line up (and any grant back).
        """
        loop = asyncio.get_running_loop()
        try:
            while True:
                fut = self._grants[waiter_id] = loop.create_future()
                async with self._pool.acquire() as con:
                    row = await con.fetchrow(WAITER_STATUS, waiter_id)
                if row is None:
                    break  # the sweep dropped it (its deadline passed)
                if row["granted_lease_id"] is not None:
                    await self._forget_waiter(waiter_id)
                    if row["lease_id"] is None:
                        raise LockNotHeldError(row["granted_lease_id"])  # granted, then expired unseen
                    return Hold.from_row(row)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(min(remaining, poll)):  # (wait_for can swallow a cancel)
                        await fut
                except TimeoutError:
                    pass
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

    async def _forget_waiter(self, waiter_id: int) -> None:
        async with self._pool.acquire() as con:
            await con.execute(DELETE_WAITER, waiter_id)

    async def _abandon(self, name: str, waiter_id: int, *, keep_grant: bool) -> Hold | None:
        """Leaves the line; a grant that raced in is kept (timeout) or given back (cancel).

        The lock's row is locked before the waiter's, in the order every grant takes them (a grant
        holds the lock row and marks the waiter): the other order deadlocked against a settle.
        """
        async with self._pool.acquire() as con, con.transaction():
            locked = await con.fetchrow(LOCK_ROW, name)
            row = await con.fetchrow(DELETE_WAITER, waiter_id)
            if row is None or locked is None:
                return None
            if row["granted_lease_id"] is not None:
                hold_row = await con.fetchrow("SELECT * FROM locks.holds WHERE lease_id = $1", row["granted_lease_id"])
                if hold_row is not None and keep_grant:
                    return Hold.from_row(hold_row)
                if hold_row is not None:
                    await con.execute(DELETE_HOLD, row["granted_lease_id"])
                    await self._released(con, hold_row, "RELEASED")
            await self._settle(con, row["name"], locked["fence"], locked["now"])  # those behind may go now
        self._committed()
        return None

    async def keep_alive(self, lease_id: int) -> tuple[datetime, datetime]:
        """Extends a hold by its ttl from the database's now; returns (expire_time, now).

        Raises:
            LockNotHeldError: it expired (by the database's clock), was broken, or was released.
        """
        async with self._pool.acquire() as con:
            row = await con.fetchrow(KEEP_ALIVE, lease_id)
        if row is None:
            raise LockNotHeldError(lease_id)
        return row["expire_time"], row["now"]

    async def release(self, lease_id: int, reason: str = "RELEASED") -> bool:
        """Releases a hold and grants the next waiters; False when it was already gone."""

        granted: list[int] = []

        async def attempt() -> bool:
            granted.clear()
            async with self._pool.acquire() as con, con.transaction():
                row = await con.fetchrow(HOLD_AND_LOCK, lease_id)
                if row is None:
                    return False
                hold = Hold.from_row(row)
                payload = lock_pb2.LockReleased(lease=convert.hold_to_proto(hold), reason=reason)
                appended = await con.fetchval(
                    RELEASE_WITH_EVENT, lease_id, events.kind_of(payload), hold.node_id, payload.SerializeToString()
                )
                if appended is None:
                    return False  # it expired or was released meanwhile
                if reason != "RELEASED":
                    log.info(
                        "lock %s: hold %s (token %s) of %s released: %s",
                        hold.name,
                        lease_id,
                        hold.token,
                        hold.holder,
                        reason,
                        extra={"event": "lock_released", "lock": hold.name},
                    )
                _, holds, _ = await self._settle(con, hold.name, row["fence"], row["now"])
                granted.extend(h["waiter_id"] for h in holds if isinstance(h, dict))  # granted here
                metrics.lock_hold.record(1000 * (row["now"] - hold.grant_time).total_seconds())
                return True

        done = await retry_serialization(attempt)
        if done:
            self._committed()
            # The hand-off: a waiter waiting on this replica learns of its grant now, not when the
            # LockGranted event has been numbered and read back (others still learn it that way).
            for waiter_id in granted:
                self.granted(waiter_id)
        return done

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
            await self._settle(con, name, fence, locked["now"])
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
                    await self._settle(con, name, locked["fence"], locked["now"])
                    settled += 1
        self._committed()
        return settled

    async def release_node(self, node_id: int) -> int:
        """Releases every hold of a node whose registry lease expired (or that was deleted)."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(NODE_HOLDS, node_id)
        released = 0
        for row in rows:
            released += await self.release(row["lease_id"], reason="NODE_EXPIRED")
        return released

    # -- single-run jobs -----------------------------------------------------------------------

    async def claim_firing(
        self,
        job: str,
        scheduled: datetime,
        *,
        ttl: timedelta,
        holder: str,
        node_id: int,
        recoverable: bool,
        misfire_threshold: timedelta,
        request_id: str = "",
    ) -> Firing:
        """Claims one firing: exactly one claimer succeeds; an expired recoverable claim may be claimed again.

        A claim retried with the same ``request_id`` while it holds gets the same claim (and token) back.

        Raises:
            FiringClaimedError, FiringDoneError, MisfiredError, InvalidArgumentError (a future firing).
        """

        async def attempt() -> tuple[Firing | None, Exception | None]:
            async with self._pool.acquire() as con, con.transaction():
                now = await con.fetchval(NOW)
                if scheduled > now + timedelta(seconds=5):
                    return None, InvalidArgumentError(
                        "scheduled_time", "is in the future by the database's clock; claim a firing when it is due"
                    )
                row = await con.fetchrow(FIRING_FOR_UPDATE, job, scheduled)
                late = now - scheduled
                if row is None:
                    misfired = misfire_threshold > timedelta(0) and late > misfire_threshold
                    state = FiringState.SKIPPED if misfired else FiringState.CLAIMED
                    new = await con.fetchrow(
                        INSERT_FIRING, job, scheduled, holder, node_id, int(state), recoverable, ttl, request_id
                    )
                    if new is None:  # a concurrent claimer inserted it first
                        return None, None
                    firing = Firing.from_row(new)
                    await self._firing_event(con, firing)
                    if misfired:
                        return None, MisfiredError(job, late.total_seconds())
                    return firing, None
                current = Firing.from_row(row)
                expired = current.state == FiringState.EXPIRED or (
                    current.state == FiringState.CLAIMED and row["expire_time"] <= row["now"]
                )
                if current.state == FiringState.CLAIMED and not expired:
                    if request_id and row["claim_request_id"] == request_id:
                        return current, None  # our own claim, retried after its answer was lost
                    return None, FiringClaimedError(job, current.holder, current.token)
                if expired and current.recoverable:
                    firing = Firing.from_row(
                        await con.fetchrow(
                            RECLAIM_FIRING, job, scheduled, holder, node_id, ttl, recoverable, request_id
                        )
                    )
                    await self._firing_event(con, firing)
                    return firing, None
                if expired and current.state == FiringState.CLAIMED:
                    lost = Firing.from_row(
                        await con.fetchrow(SET_FIRING_STATE, job, scheduled, int(FiringState.EXPIRED))
                    )
                    await self._firing_event(con, lost)
                    return None, FiringDoneError(job, "EXPIRED", current.holder)
                return None, FiringDoneError(job, current.state.name, current.holder)

        while True:
            firing, err = await retry_serialization(attempt)
            if firing is None and err is None:
                continue  # lost the insert race: read the winner's row
            break
        self._committed()
        if err is not None:
            raise err
        assert firing is not None
        return firing

    async def _firing_event(self, con: asyncpg.Connection, firing: Firing) -> None:
        await events.append(con, lock_pb2.FiringChanged(firing=convert.firing_to_proto(firing)), node_id=firing.node_id)

    async def complete_firing(self, job: str, scheduled: datetime, token: int, *, failed: bool) -> Firing:
        """Marks a claimed firing done (or failed).

        Raises:
            StaleTokenError: the firing was claimed again since (a newer token).
            FiringDoneError: it is already complete.
        """
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(FIRING_FOR_UPDATE, job, scheduled)
            if row is None:
                raise NotFoundError(f"job {job} has no firing at that time", domain="muster.locks", job=job)
            current = Firing.from_row(row)
            if current.token != token:
                raise StaleTokenError(job, token, current.token)
            if current.state not in (FiringState.CLAIMED, FiringState.EXPIRED):
                raise FiringDoneError(job, current.state.name, current.holder)
            state = FiringState.FAILED if failed else FiringState.COMPLETED
            firing = Firing.from_row(await con.fetchrow(SET_FIRING_STATE, job, scheduled, int(state)))
            await self._firing_event(con, firing)
        self._committed()
        return firing

    async def list_firings(self, job: str, limit: int) -> tuple[list[Firing], datetime]:
        """The newest firings (of one job, or all)."""
        async with self._pool.acquire() as con:
            rows = await con.fetch(LIST_FIRINGS, job, limit)
            now = await con.fetchval(NOW)
        return [Firing.from_row(r) for r in rows], now
