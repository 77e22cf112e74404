"""The protobuf payloads the database builds (core.pb_*, core 0002) are the bytes Python would build.

The lock hot path writes its events in plpgsql because their values (the grant's time, the token,
the lease id) exist only in the database. A watcher decodes them with the generated classes, so
every byte must be what ``SerializeToString`` gives for the same values: field order, varints of
large and zero values, nested messages, durations and timestamps with sub-second parts, and UTF-8.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from muster.api.locks.v1 import lock_pb2
from muster.locks import convert
from muster.locks.models import Hold

CASES = [
    # name, mode, holder, node id, ttl
    ("a", 1, "h:1", 0, timedelta(seconds=15)),
    ("jobs/nightly-éß-雪", 2, "hôte:4242", 7, timedelta(milliseconds=1500)),
    ("x" * 300, 1, "", 2**41 + 5, timedelta(microseconds=1)),
    ("ttl-hours", 2, "h", 1, timedelta(hours=1)),
]


@pytest.mark.parametrize(("name", "mode", "holder", "node_id", "ttl"), CASES)
async def test_lock_events_built_by_the_database_are_the_bytes_python_builds(
    database_url: str, name: str, mode: int, holder: str, node_id: int, ttl: timedelta
) -> None:
    con = await asyncpg.connect(database_url)
    try:
        async with con.transaction():
            await con.execute("INSERT INTO locks.locks (name, fence) VALUES ($1, $2)", name, 2**42)  # a big token
            row = await con.fetchrow(
                "SELECT * FROM locks.grant($1, $2::smallint, $3, $4, $5, $6, $7)",
                name,
                mode,
                holder,
                node_id,
                "req-1",
                ttl,
                2**40 + 3,
            )
            await con.execute("SELECT locks.released_event(h, 'EXPIRED') FROM locks.holds h WHERE h.name = $1", name)
            events = await con.fetch(
                "SELECT kind, node_id, payload FROM core.events WHERE revision IS NULL ORDER BY append_id"
            )
    finally:
        await con.close()
    hold = Hold.from_row(row)
    lease = convert.hold_to_proto(hold)
    granted = lock_pb2.LockGranted(lease=lease, waiter_id=2**40 + 3)
    released = lock_pb2.LockReleased(lease=lease, reason="EXPIRED")
    assert [e["kind"] for e in events] == ["muster.api.locks.v1.LockGranted", "muster.api.locks.v1.LockReleased"]
    assert all(e["node_id"] == node_id for e in events)
    assert bytes(events[0]["payload"]) == granted.SerializeToString()
    assert bytes(events[1]["payload"]) == released.SerializeToString()
    # And it reads back as the same values (a subsecond grant time survives the trip).
    assert lock_pb2.LockGranted.FromString(bytes(events[0]["payload"])).lease.grant_time.nanos % 1000 == 0
    assert lock_pb2.LockGranted.FromString(bytes(events[0]["payload"])) == granted


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**31, 2**40 + 1, 2**63 - 1])
async def test_varints_of_every_size_match(database_url: str, value: int) -> None:
    con = await asyncpg.connect(database_url)
    try:
        encoded = bytes(await con.fetchval("SELECT core.pb_int(3, $1::bigint)", value))
    finally:
        await con.close()
    expected = lock_pb2.Lease(token=value).SerializeToString()  # token is field 3, int64
    assert encoded == expected
