"""Domain values to protos."""

from __future__ import annotations

from datetime import UTC

from muster.api.locks.v1 import lock_pb2
from muster.locks.models import Firing, Hold, LockInfo, Mode, Waiter


def hold_to_proto(hold: Hold) -> lock_pb2.Lease:
    """A Lease message."""
    msg = lock_pb2.Lease(
        name=hold.name,
        lease_id=hold.lease_id,
        token=hold.token,
        mode=int(hold.mode),
        holder=hold.holder,
        node_id=hold.node_id,
    )
    msg.grant_time.FromDatetime(hold.grant_time)
    msg.expire_time.FromDatetime(hold.expire_time)
    msg.ttl.FromTimedelta(hold.ttl)
    return msg


def hold_from_proto(msg: lock_pb2.Lease) -> Hold:
    """A Hold from a Lease message (a LockGranted event's)."""
    return Hold(
        msg.lease_id,
        msg.name,
        msg.token,
        Mode(msg.mode),
        msg.holder,
        msg.node_id,
        msg.ttl.ToTimedelta(),
        msg.grant_time.ToDatetime(tzinfo=UTC),
        msg.expire_time.ToDatetime(tzinfo=UTC),
    )


def waiter_to_proto(waiter: Waiter) -> lock_pb2.Waiter:
    """A Waiter message."""
    msg = lock_pb2.Waiter(waiter_id=waiter.waiter_id, holder=waiter.holder, mode=int(waiter.mode))
    msg.enqueue_time.FromDatetime(waiter.enqueue_time)
    msg.deadline.FromDatetime(waiter.deadline)
    return msg


def lock_to_proto(lock: LockInfo) -> lock_pb2.Lock:
    """A Lock message."""
    return lock_pb2.Lock(
        name=lock.name,
        fence=lock.fence,
        holders=[hold_to_proto(h) for h in lock.holders],
        waiters=[waiter_to_proto(w) for w in lock.waiters],
    )


def firing_to_proto(firing: Firing) -> lock_pb2.Firing:
    """A Firing message."""
    msg = lock_pb2.Firing(
        job=firing.job,
        holder=firing.holder,
        node_id=firing.node_id,
        token=firing.token,
        state=int(firing.state),
        recoverable=firing.recoverable,
        attempt=firing.attempt,
    )
    msg.scheduled_time.FromDatetime(firing.scheduled_time)
    msg.claim_time.FromDatetime(firing.claim_time)
    msg.expire_time.FromDatetime(firing.expire_time)
    return msg
