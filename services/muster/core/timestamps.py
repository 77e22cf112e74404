"""Datetimes as ``google.protobuf.Timestamp`` fields, exactly and fast.

``Timestamp.FromDatetime`` goes through ``calendar.timegm`` and costs about 3.5 µs; a ListNodes of
10,000 nodes sets 30,000 of them. Subtracting the epoch is exact (microseconds) and four times faster.
"""

from __future__ import annotations

from datetime import UTC, datetime

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def fields(dt: datetime) -> dict[str, int]:
    """``{"seconds": …, "nanos": …}`` of an aware datetime: pass it as a Timestamp field's value."""
    d = dt - EPOCH
    return {"seconds": d.days * 86400 + d.seconds, "nanos": d.microseconds * 1000}
