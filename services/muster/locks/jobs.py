"""Single-run jobs: for each firing (job, scheduled time) exactly one claimer succeeds.

A claim is a lease on the database's clock: a recoverable firing whose claimer died before
completing it is claimable again after its expiry (with a higher token).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from muster.api.locks.v1 import lock_pb2
from muster.core import events
from muster.core.db import retry_serialization
from muster.core.errors import InvalidArgumentError, NotFoundError
from muster.locks import convert
from muster.locks.errors import FiringClaimedError, FiringDoneError, MisfiredError, StaleTokenError
from muster.locks.models import Firing, FiringState

NOW = "SELECT now()"

FIRING_FOR_UPDATE = "SELECT *, now() AS now FROM locks.firings WHERE job = $1 AND scheduled_time = $2 FOR UPDATE"
INSERT_FIRING = """
INSERT INTO locks.firings (job, scheduled_time, holder, node_id, token, state, recoverable, expire_time,
                           claim_request_id)
VALUES ($1, $2, $3, $4, core.epoch_floor() + 1, $5, $6, now() + $7::interval, $8)
ON CONFLICT (job, scheduled_time) DO NOTHING
RETURNING *
"""
RECLAIM_FIRING = """
UPDATE locks.firings SET holder = $3, node_id = $4, token = greatest(token, core.epoch_floor()) + 1,
       attempt = attempt + 1, state = 1,
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


class JobStore:
    """The firings table.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes.
    """

    def __init__(self, pool: asyncpg.Pool, numberer: events.Numberer) -> None:
        self._pool = pool
        self._numberer = numberer

    def _committed(self) -> None:
        self._numberer.kick()

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
