"""Locks for applications: ``async with cluster.lock(name) as lease:``.

The lease is kept alive in the background. Its deadline is judged on this process's monotonic
clock from the moment each renewal was *sent* (the server's expiry is at least that moment plus
the ttl), and the body is cancelled a safety margin before it, so the body never runs while the
server could grant the lock to someone else. Guarded writes should still carry ``lease.token`` to
a fenced resource: a process that was frozen runs nothing while frozen, and on waking its expired
timer cancels the body before the body's own timers resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import grpc

from muster.api.locks.v1 import lock_pb2
from muster.api.locks.v1 import locks_service_pb2 as pb
from muster.client._channel import Endpoint, backoff
from muster.client._lockstream import LockStream, StreamDown
from muster.client._retry import call_again
from muster.client.errors import (
    LockHeldError,
    LockLostError,
    LockNotHeldError,
    MusterError,
    from_rpc_error,
    from_status,
)

if TYPE_CHECKING:
    pass


class LockMode(enum.Enum):
    """Exclusive (one writer) or shared (many readers)."""

    EXCLUSIVE = lock_pb2.LOCK_MODE_EXCLUSIVE
    SHARED = lock_pb2.LOCK_MODE_SHARED


class LeaseState(enum.Enum):
    """HELD: renewed in time. IN_JEOPARDY: renewals are failing, the deadline nears. LOST: gone."""

    HELD = "held"
    IN_JEOPARDY = "in_jeopardy"
    LOST = "lost"


def _ts(ts: Any) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


_HOST = socket.gethostname()
_IDS = itertools.count(1)
_ID_PREFIX = uuid.uuid4().hex[:16]
_RESULTS = {"acquire": "acquired", "release": "released", "keep_alive": "kept_alive"}


def default_holder() -> str:
    """``host:pid``."""
    return f"{_HOST}:{os.getpid()}"


def _request_id() -> str:
    """A request id unique to this call: a random prefix per process and a counter (cheaper than uuid4)."""
    return f"{_ID_PREFIX}{os.getpid():x}-{next(_IDS)}"


@dataclass(frozen=True, slots=True)
class LockInfo:
    """A lock as ``list_locks`` shows it."""

    name: str
    fence: int
    holders: list[dict[str, Any]]
    waiters: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Firing:
    """A claimed (or listed) firing of a single-run job."""

    job: str
    scheduled_time: datetime
    holder: str
    node_id: int
    token: int
    state: str
    recoverable: bool
    attempt: int
    claim_time: datetime | None
    expire_time: datetime | None

    @classmethod
    def from_proto(cls, msg: lock_pb2.Firing) -> Firing:
        """From a Firing message."""
        scheduled = _ts(msg.scheduled_time)
        assert scheduled is not None
        return cls(
            msg.job,
            scheduled,
            msg.holder,
            msg.node_id,
            msg.token,
            lock_pb2.Firing.State.Name(msg.state).removeprefix("STATE_"),
            msg.recoverable,
            msg.attempt,
            _ts(msg.claim_time),
            _ts(msg.expire_time),
        )


class LockLease:
    """A held lock. ``token`` is the fencing token; ``state`` follows the renewals."""

    def __init__(self, msg: lock_pb2.Lease, local_deadline: float) -> None:
        self.name = msg.name
        self.lease_id = msg.lease_id
        self.token = msg.token
        self.mode = LockMode(msg.mode)
        self.holder = msg.holder
        self.ttl = msg.ttl.ToTimedelta()
        self.expire_time = _ts(msg.expire_time)
        self.local_deadline = local_deadline
        self.state = LeaseState.HELD

    def remaining(self) -> float:
        """Seconds until the local deadline (negative once passed)."""
        return self.local_deadline - time.monotonic()

    def ensure_held(self) -> None:
        """Raises LockLostError unless the lease is still held by the local clock: call before a guarded write."""
        if self.state is LeaseState.LOST or self.remaining() <= 0:
            self.state = LeaseState.LOST
            raise LockLostError(f"the lease on {self.name} (token {self.token}) is lost", reason="LOCK_NOT_HELD")

    def __repr__(self) -> str:
        return f"LockLease(name={self.name!r}, token={self.token}, state={self.state.value})"


class LocksApi:
    """The lock service's calls (mixed into :class:`muster.client.Cluster`)."""

    _locks: Endpoint
    _lock_stream: LockStream

    async def _lock_op(self, field: str, request: Any, method: str, timeout: timedelta) -> Any:
        """One operation on the lock Session stream; a unary call (with retries) while it is down."""
        try:
            resp = await self._lock_stream.request(timeout.total_seconds(), **{field: request})
        except StreamDown:
            return await self._locks_call(method, request, timeout=timeout)
        if resp.WhichOneof("result") == "error":
            err = from_status(resp.error.code, resp.error.message, resp.error.details)
            if call_again(err):
                return await self._locks_call(method, request, timeout=timeout)  # retried, as a unary call is
            raise err
        return getattr(resp, _RESULTS[field])

    async def _locks_call(
        self, method: str, request: Any, *, retry: bool = True, timeout: timedelta | None = None
    ) -> Any:
        return await self._call(self._locks, method, request, retry=retry, timeout=timeout)  # type: ignore[attr-defined]

    async def acquire(
        self,
        name: str,
        *,
        ttl: timedelta = timedelta(seconds=15),
        wait: timedelta = timedelta(0),
        mode: LockMode = LockMode.EXCLUSIVE,
        holder: str | None = None,
        node_id: int = 0,
    ) -> LockLease:
        """Acquires a lock without keeping it alive (see :meth:`lock` for the managed form).

        Raises:
            LockHeldError: held by another after ``wait`` (0: at once).
        """
        req = pb.AcquireRequest(
            name=name, mode=mode.value, holder=holder or default_holder(), node_id=node_id, request_id=_request_id()
        )
        req.ttl.FromTimedelta(ttl)
        req.wait.FromTimedelta(wait)
        sent = time.monotonic()
        resp = await self._lock_op("acquire", req, "Acquire", wait + self.config.deadline)  # type: ignore[attr-defined]
        lease = LockLease(resp.lease, sent + ttl.total_seconds())
        if time.monotonic() - sent > ttl.total_seconds() / 10:
            # Waited for a grant: the grant's own time is unknown here, so renew now to know a tight deadline.
            try:
                await self.renew(lease)
            except LockNotHeldError as exc:
                raise LockHeldError(
                    f"{name} was granted but its lease ran out before it could be renewed", reason="LOCK_HELD"
                ) from exc
        return lease

    async def renew(self, lease: LockLease) -> None:
        """One keep-alive; moves the lease's local deadline on (from when it was sent).

        Raises:
            LockNotHeldError: the hold is gone (expired by the database's clock, broken, released).
        """
        sent = time.monotonic()
        req = pb.KeepAliveRequest(lease_id=lease.lease_id)
        try:
            resp = await self._lock_stream.request(self.config.deadline.total_seconds(), keep_alive=req)  # type: ignore[attr-defined]
        except StreamDown:
            resp = None
        if resp is not None and resp.WhichOneof("result") == "kept_alive":
            answer = resp.kept_alive
        elif resp is not None and resp.WhichOneof("result") == "error":
            err = from_status(resp.error.code, resp.error.message, resp.error.details)
            if isinstance(err, LockNotHeldError):
                lease.state = LeaseState.LOST
            raise err
        else:
            answer = await self._renew_unary(lease)
        lease.expire_time = _ts(answer.expire_time)
        lease.local_deadline = sent + lease.ttl.total_seconds()
        lease.state = LeaseState.HELD

    async def _renew_unary(self, lease: LockLease) -> pb.KeepAliveResponse:
        """One keep-alive on a KeepAlive stream of its own (while the Session stream is down)."""
        call = self._locks.stub().KeepAlive(timeout=self.config.deadline.total_seconds())  # type: ignore[attr-defined]
        try:
            await call.write(pb.KeepAliveRequest(lease_id=lease.lease_id))
            await call.done_writing()
            answer = await call.read()
            if answer is grpc.aio.EOF:
                await call  # raises the stream's status
                raise LockNotHeldError(f"no answer renewing {lease.name}", reason="LOCK_NOT_HELD")
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc)
            if isinstance(err, LockNotHeldError):
                lease.state = LeaseState.LOST
            raise err from exc
        return answer  # type: ignore[no-any-return]

    async def release(self, lease: LockLease) -> bool:
        """Releases a lock (idempotent); False when it was already gone."""
        lease.state = LeaseState.LOST
        resp = await self._lock_op(
            "release",
            pb.ReleaseRequest(lease_id=lease.lease_id),
            "Release",
            self.config.deadline,  # type: ignore[attr-defined]
        )
        return bool(resp.released)

    def lock(
        self,
        name: str,
        *,
        ttl: timedelta = timedelta(seconds=15),
        wait: timedelta = timedelta(seconds=30),
        mode: LockMode = LockMode.EXCLUSIVE,
        holder: str | None = None,
        node_id: int = 0,
    ) -> HeldLock:
        """``async with cluster.lock("name") as lease:`` — acquire, keep alive, release.

        Entering never succeeds without the lock (LockHeldError after ``wait``). If the lease is
        lost, the body is cancelled and LockLostError comes out of the ``async with``.
        """
        return HeldLock(self, name, ttl=ttl, wait=wait, mode=mode, holder=holder, node_id=node_id)  # type: ignore[arg-type]

    def try_lock(
        self,
        name: str,
        *,
        ttl: timedelta = timedelta(seconds=15),
        mode: LockMode = LockMode.EXCLUSIVE,
        holder: str | None = None,
        node_id: int = 0,
    ) -> HeldLock:
        """Like :meth:`lock`, but raises LockHeldError at once when the lock is held."""
        return self.lock(name, ttl=ttl, wait=timedelta(0), mode=mode, holder=holder, node_id=node_id)

    async def list_locks(self) -> list[LockInfo]:
        """Locks that are held or waited for, with holders (tokens, expiry) and waiters in order."""
        out: list[LockInfo] = []
        token = ""
        while True:
            resp = await self._locks_call("ListLocks", pb.ListLocksRequest(page_token=token))
            for lock in resp.locks:
                out.append(
                    LockInfo(
                        lock.name,
                        lock.fence,
                        [
                            {
                                "lease_id": h.lease_id,
                                "holder": h.holder,
                                "token": h.token,
                                "node_id": h.node_id,
                                "mode": LockMode(h.mode).name,
                                "expire_time": _ts(h.expire_time),
                            }
                            for h in lock.holders
                        ],
                        [
                            {
                                "waiter_id": w.waiter_id,
                                "holder": w.holder,
                                "mode": LockMode(w.mode).name,
                                "deadline": _ts(w.deadline),
                            }
                            for w in lock.waiters
                        ],
                    )
                )
            token = resp.next_page_token
            if not token:
                return out

    async def break_lock(self, name: str) -> tuple[int, int]:
        """Releases every hold and moves the fence on; returns (new fence, holds released). Not retried."""
        resp = await self._locks_call("BreakLock", pb.BreakLockRequest(name=name), retry=False)
        return int(resp.fence), int(resp.released)

    async def validate_fence(self, name: str, token: int) -> bool:
        """Whether ``token`` is still a live hold of ``name`` (no newer grant, no break)."""
        return bool((await self._locks_call("ValidateFence", pb.ValidateFenceRequest(name=name, token=token))).valid)

    async def claim_firing(
        self,
        job: str,
        scheduled_time: datetime,
        *,
        ttl: timedelta = timedelta(minutes=5),
        recoverable: bool = False,
        misfire_threshold: timedelta = timedelta(0),
        holder: str | None = None,
        node_id: int = 0,
        request_id: str | None = None,
    ) -> Firing:
        """Claims one firing of a single-run job: exactly one claimer succeeds.

        Retried safely on another replica when one cannot answer: the claim carries a request id the
        server recognizes, so a claim whose answer was lost comes back with the same token.

        Raises:
            FiringClaimedError: another claimer holds it (``metadata["holder"]``).
            FiringDoneError: it already ran, failed, or expired without recovery.
            MisfiredError: too late: skipped.
        """
        req = pb.ClaimFiringRequest(
            job=job,
            holder=holder or default_holder(),
            node_id=node_id,
            recoverable=recoverable,
            request_id=request_id or _request_id(),
        )
        req.scheduled_time.FromDatetime(scheduled_time)
        req.ttl.FromTimedelta(ttl)
        req.misfire_threshold.FromTimedelta(misfire_threshold)
        return Firing.from_proto((await self._locks_call("ClaimFiring", req)).firing)

    async def complete_firing(self, firing: Firing, *, failed: bool = False) -> Firing:
        """Marks a claimed firing done. Raises StaleTokenError if it was claimed again since."""
        req = pb.CompleteFiringRequest(job=firing.job, token=firing.token, failed=failed)
        req.scheduled_time.FromDatetime(firing.scheduled_time)
        return Firing.from_proto((await self._locks_call("CompleteFiring", req)).firing)

    async def list_jobs(self, job: str = "", *, limit: int = 100) -> tuple[list[Firing], datetime | None]:
        """The newest firings (of one job, or all) and the database's time."""
        resp = await self._locks_call("ListJobs", pb.ListJobsRequest(job=job, page_size=limit))
        return [Firing.from_proto(f) for f in resp.firings], _ts(resp.server_time)


class HeldLock:
    """The ``async with cluster.lock(...)`` context: acquires, renews in the background, releases."""

    def __init__(
        self,
        api: LocksApi,
        name: str,
        *,
        ttl: timedelta,
        wait: timedelta,
        mode: LockMode,
        holder: str | None,
        node_id: int,
    ) -> None:
        self._api = api
        self._args = {"ttl": ttl, "wait": wait, "mode": mode, "holder": holder, "node_id": node_id}
        self.name = name
        self.lease: LockLease | None = None
        self._task: asyncio.Task[Any] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cancelled_by_us = False
        ttl_s = ttl.total_seconds()
        self._margin = min(max(ttl_s * 0.1, 0.05), 2.0)

    async def __aenter__(self) -> LockLease:
        self._task = asyncio.current_task()
        self.lease = await self._api.acquire(self.name, **self._args)
        self._arm()
        self._renewer = asyncio.create_task(self._renew_loop(), name=f"muster-lock-{self.name}")
        return self.lease

    def _arm(self) -> None:
        assert self.lease is not None
        if self._timer is not None:
            self._timer.cancel()
        delay = self.lease.local_deadline - self._margin - time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        """The local deadline (minus the margin) passed without a renewal: the lease is lost; stop the body."""
        assert self.lease is not None
        self.lease.state = LeaseState.LOST
        if self._task is not None and not self._task.done() and not self._cancelled_by_us:
            self._cancelled_by_us = True
            self._task.cancel()

    async def _renew_loop(self) -> None:
        assert self.lease is not None
        lease = self.lease
        ttl = lease.ttl.total_seconds()
        attempt = 0
        hint: timedelta | None = None
        while lease.state is not LeaseState.LOST:
            await asyncio.sleep(ttl / 3 if attempt == 0 else backoff(attempt, self._api.config, hint))  # type: ignore[attr-defined]
            if lease.state is LeaseState.LOST:
                return
            try:
                await self._api.renew(lease)
                attempt = 0
                self._arm()
            except LockNotHeldError:
                self._expire()
                return
            except MusterError as exc:
                # Renewals failing: in jeopardy until the local deadline's timer declares it lost.
                # Only a transient failure moves to another replica (a verdict is the same on any).
                if exc.transient:
                    self._api._locks.fail_over()
                hint = exc.retry_after
                lease.state = LeaseState.IN_JEOPARDY
                attempt += 1

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewer
        lease = self.lease
        lost = lease is not None and lease.state is LeaseState.LOST
        if lease is not None:
            with contextlib.suppress(MusterError):
                await asyncio.shield(self._api.release(lease))
        if self._cancelled_by_us and exc_type is asyncio.CancelledError:
            assert self._task is not None and lease is not None
            if self._task.uncancel() == 0:
                raise LockLostError(
                    f"the lease on {self.name} (token {lease.token}) was lost; the body was cancelled",
                    reason="LOCK_NOT_HELD",
                ) from exc
        if lost and exc_type is None and lease is not None:
            raise LockLostError(
                f"the lease on {self.name} (token {lease.token}) was lost before the body ended", reason="LOCK_NOT_HELD"
            )
