"""Outage credit: the control plane's own outage never expires a lease.

Every replica ticks ``core.clock`` each second on the database's clock. The first tick after a gap
longer than ``outage_threshold`` (no replica could reach the database, or none ran) records an
outage in ``core.outages`` with the credited time (the gap, capped) and writes an
``OutageCredited`` event. Each service's sweep calls :func:`tick` first in its own transaction and
then applies the outages it has not applied yet to its own leases, before expiring anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from muster.api.events.v1 import event_pb2
from muster.core import events

log = logging.getLogger(__name__)

LOCK_CLOCK = "SELECT last_tick, now() AS now FROM core.clock WHERE id = 1 FOR UPDATE"
SET_TICK = "UPDATE core.clock SET last_tick = greatest(last_tick, now()) WHERE id = 1"
RECORD_OUTAGE = """
INSERT INTO core.outages (start_time, end_time, credited) VALUES ($1, $2, $3) RETURNING id
"""
OUTAGES_AFTER = "SELECT id, credited FROM core.outages WHERE id > $1 ORDER BY id"


@dataclass(frozen=True)
class Outage:
    """A recorded outage and the time credited for it."""

    id: int
    credited: timedelta


async def tick(con: asyncpg.Connection, *, threshold: timedelta, cap: timedelta) -> datetime:
    """Ticks the clock in the caller's transaction, recording an outage if the last tick is too old.

    Returns the database's time. Serializes with every other tick on the clock row.
    """
    row = await con.fetchrow(LOCK_CLOCK)
    now, last = row["now"], row["last_tick"]
    gap = now - last
    if gap > threshold:
        credited = min(gap, cap)
        await con.fetchval(RECORD_OUTAGE, last, now, credited)
        outage = event_pb2.OutageCredited()
        outage.outage.FromTimedelta(gap)
        outage.credited.FromTimedelta(credited)
        await events.append(con, outage)
        log.warning(
            "no replica reached the database for %.1fs; crediting %.1fs to leases",
            gap.total_seconds(),
            credited.total_seconds(),
            extra={"event": "outage_credited"},
        )
    await con.execute(SET_TICK)
    return now


async def outages_after(con: asyncpg.Connection, last_applied: int) -> list[Outage]:
    """Outages recorded after ``last_applied`` (a service's marker), oldest first."""
    rows = await con.fetch(OUTAGES_AFTER, last_applied)
    return [Outage(r["id"], r["credited"]) for r in rows]


async def credit_due(
    con: asyncpg.Connection, *, threshold: timedelta, cap: timedelta, marker_query: str, set_marker_query: str
) -> timedelta | None:
    """A service sweep's preamble, in its transaction: tick, then claim the outages not yet credited.

    ``marker_query`` locks and reads the service's last credited outage id; ``set_marker_query`` moves
    it on (both the service's own statements). Returns the time to add to the service's leases, or None.
    """
    await tick(con, threshold=threshold, cap=cap)
    outages = await outages_after(con, await con.fetchval(marker_query))
    if not outages:
        return None
    await con.execute(set_marker_query, outages[-1].id)
    return sum((o.credited for o in outages), timedelta())
