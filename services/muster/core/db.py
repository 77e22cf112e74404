"""The asyncpg pool every service shares: waits for the database, survives its restarts."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

log = logging.getLogger(__name__)

# Every Muster connection: a frozen replica cannot hold a lock (the event head) for long.
SERVER_SETTINGS = {
    "idle_in_transaction_session_timeout": "5000",
    "application_name": "muster",
}

T = TypeVar("T")


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One dedicated connection with Muster's session settings."""
    return await asyncpg.connect(dsn, server_settings=SERVER_SETTINGS, **kwargs)


async def wait_for_database(dsn: str, *, timeout: float, what: str = "database") -> None:
    """Returns once the database accepts a connection; raises TimeoutError after ``timeout`` seconds.

    Progress is logged every few seconds so a slow start is visible.
    """
    deadline = time.monotonic() + timeout
    delay, last_log = 0.05, 0.0
    while True:
        try:
            con = await asyncpg.connect(dsn, timeout=5)
            await con.close()
            return
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"the {what} did not accept connections within {timeout:.0f}s ({type(exc).__name__}); "
                    "check MUSTER_DATABASE_URL and that PostgreSQL is running"
                ) from exc
            if now - last_log > 3:
                log.info("waiting for the %s (%s)", what, type(exc).__name__, extra={"event": "db_wait"})
                last_log = now
            await asyncio.sleep(min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, 1.0)


async def _keep_session(con: asyncpg.Connection) -> None:
    """Pool release hook: no reset query.

    asyncpg still rolls back an open transaction on release; the full reset (``UNLISTEN *``,
    ``RESET ALL``, advisory unlock) would cost a round trip per release, and pooled connections
    never hold session state here (LISTEN and session locks live on dedicated connections).
    """


async def _open_epoch(con: asyncpg.Connection) -> None:
    """Every new pooled connection first opens the database's epoch if its timeline is new.

    A primary's timeline never changes under a live connection (a promotion or a restore starts
    the server anew), so after a failover every connection is new and passes here before any
    write: nothing is written on a new timeline — no id drawn from a sequence, no revision, no
    token — before the epoch's jump (core 0003, ``core.epoch_floor()``).
    """
    await con.execute("SELECT core.epoch_floor()")


async def create_pool(dsn: str, *, min_size: int, max_size: int, wait: float, pooled: bool = False) -> asyncpg.Pool:
    """Creates the pool once the database is reachable.

    The pool survives a database restart: a connection that died is replaced on its next use, and
    a call made while the database is down fails fast (callers map it to UNAVAILABLE).

    ``pooled``: ``dsn`` is a pooler in transaction mode (PgBouncer), where consecutive transactions
    may run on different server connections: no prepared statement is kept (asyncpg's statement
    cache is off) and no session setting is sent (PgBouncer refuses unknown startup parameters; set
    ``idle_in_transaction_session_timeout`` on the role instead, see the README).
    """
    await wait_for_database(dsn, timeout=wait)
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={"application_name": SERVER_SETTINGS["application_name"]} if pooled else SERVER_SETTINGS,
        statement_cache_size=0 if pooled else 100,
        init=_open_epoch,
        max_inactive_connection_lifetime=60,
        reset=_keep_session,
        command_timeout=30,
    )


async def retry_serialization(fn: Callable[[], Awaitable[T]], attempts: int = 8) -> T:
    """Runs a whole transaction again on serialization failures and deadlocks."""
    for attempt in range(attempts):
        try:
            return await fn()
        except (asyncpg.SerializationError, asyncpg.DeadlockDetectedError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
    raise AssertionError("unreachable")
