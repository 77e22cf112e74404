"""The lock service's domain: holds, waiters, firings. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


class Mode(enum.IntEnum):
    """How a lock is held (LockMode numbers)."""

    EXCLUSIVE = 1
    SHARED = 2


class FiringState(enum.IntEnum):
    """A firing's state (Firing.State numbers)."""

    CLAIMED = 1
    COMPLETED = 2
    EXPIRED = 3
    SKIPPED = 4
    FAILED = 5


@dataclass(frozen=True, slots=True)
class Hold:
    """A granted hold on a lock."""

    lease_id: int
    name: str
    token: int
    mode: Mode
    holder: str
    node_id: int
    ttl: timedelta
    grant_time: datetime
    expire_time: datetime

    @classmethod
    def from_row(cls, row: Any) -> Hold:
        """From a ``locks.holds`` row."""
        return cls(
            row["lease_id"],
            row["name"],
            row["token"],
            Mode(row["mode"]),
            row["holder"],
            row["node_id"],
            row["ttl"],
            row["grant_time"],
            row["expire_time"],
        )


@dataclass(frozen=True, slots=True)
class Waiter:
    """A queued acquire."""

    waiter_id: int
    name: str
    mode: Mode
    holder: str
    enqueue_time: datetime
    deadline: datetime

    @classmethod
    def from_row(cls, row: Any) -> Waiter:
        """From a ``locks.waiters`` row."""
        return cls(
            row["waiter_id"], row["name"], Mode(row["mode"]), row["holder"], row["enqueue_time"], row["deadline"]
        )


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A lock with its holders and waiters."""

    name: str
    fence: int
    holders: list[Hold]
    waiters: list[Waiter]


@dataclass(frozen=True, slots=True)
class Firing:
    """One firing of a single-run job."""

    job: str
    scheduled_time: datetime
    holder: str
    node_id: int
    token: int
    state: FiringState
    recoverable: bool
    attempt: int
    claim_time: datetime
    expire_time: datetime

    @classmethod
    def from_row(cls, row: Any) -> Firing:
        """From a ``locks.firings`` row."""
        return cls(
            row["job"],
            row["scheduled_time"],
            row["holder"],
            row["node_id"],
            row["token"],
            FiringState(row["state"]),
            row["recoverable"],
            row["attempt"],
            row["claim_time"],
            row["expire_time"],
        )


@dataclass(frozen=True, slots=True)
class AcquireOp:
    """An acquire in a batch: grant now, refuse (``wait`` 0), or queue."""

    name: str
    mode: Mode
    holder: str
    node_id: int
    request_id: str
    ttl: timedelta
    wait: timedelta


@dataclass(frozen=True, slots=True)
class ReleaseOp:
    """A release in a batch (``reason`` goes into the LockReleased event)."""

    lease_id: int
    reason: str = "RELEASED"


@dataclass(frozen=True, slots=True)
class KeepAliveOp:
    """A keep-alive in a batch: the hold's expiry moves to the database's now plus its ttl."""

    lease_id: int


LockOp = AcquireOp | ReleaseOp | KeepAliveOp


def compatible(mode: Mode, held: list[Mode]) -> bool:
    """Whether a hold in ``mode`` may join the current holds: shared with shared only."""
    if not held:
        return True
    return mode == Mode.SHARED and all(m == Mode.SHARED for m in held)
