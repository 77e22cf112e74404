"""LocksService: validates input, calls the store, turns results into protos."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc

from muster.api.locks.v1 import locks_service_pb2 as pb
from muster.api.locks.v1 import locks_service_pb2_grpc
from muster.core import metrics, telemetry, validate
from muster.core.batch import GroupCommit
from muster.core.errors import InvalidArgumentError, MusterError, abort_with, to_status, translate, translate_errors
from muster.locks import convert
from muster.locks.errors import LockHeldError
from muster.locks.jobs import JobStore
from muster.locks.models import AcquireOp, KeepAliveOp, LockOp, Mode, ReleaseOp
from muster.locks.store import Acquired, LockStore, Outcome

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9._:/-]{1,200}$")
_MODES = {0: Mode.EXCLUSIVE, 1: Mode.EXCLUSIVE, 2: Mode.SHARED}


def _name(field: str, value: str) -> str:
    if not _NAME.match(value):
        raise InvalidArgumentError(field, "must be 1-200 characters: letters, digits and . _ : / -")
    return value


def _duration(field: str, msg: object, *, low: timedelta, high: timedelta, allow_zero: bool = False) -> timedelta:
    value = msg.ToTimedelta()  # type: ignore[attr-defined]
    if allow_zero and value == timedelta(0):
        return value
    if not low <= value <= high:
        raise InvalidArgumentError(field, f"must be between {low.total_seconds():g}s and {high.total_seconds():g}s")
    return value


def _holder(field: str, value: str, context: grpc.aio.ServicerContext) -> str:
    if len(value) > 200 or not value.isprintable():
        raise InvalidArgumentError(field, "must be at most 200 printable characters")
    return value or context.peer()


class CancelledOperationError(MusterError):
    """A Session operation withdrawn by its client (``cancel``)."""

    code = grpc.StatusCode.CANCELLED
    reason = "OPERATION_WITHDRAWN"

    def __init__(self) -> None:
        super().__init__("the operation was withdrawn by its client", domain="muster.locks")


def _operation_error(seq: int, exc: Exception) -> pb.SessionResponse:
    err = translate(exc)
    return pb.SessionResponse(
        seq=seq, error=pb.OperationError(code=err.code.value[0], message=str(err), details=err.details())
    )


class LocksServicer(locks_service_pb2_grpc.LocksServiceServicer):
    """The lock service's RPCs.

    Args:
        store: the lock tables.
        jobs: the single-run jobs' table.
        ops: the replica's batcher of lock operations (acquire, release, keep-alive), shared by
            every RPC and every Session stream.
    """

    def __init__(self, store: LockStore, jobs: JobStore, ops: GroupCommit[LockOp, Outcome]) -> None:
        self._store = store
        self._jobs = jobs
        self._ops = ops
        self._undoing: set[asyncio.Task[object]] = set()

    async def _run(self, op: LockOp) -> Outcome:
        outcome = await self._ops(op)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _acquire(
        self, req: pb.AcquireRequest, context: grpc.aio.ServicerContext, prefix: str = ""
    ) -> pb.AcquireResponse:
        name = _name(prefix + "name", req.name)
        ttl = _duration(prefix + "ttl", req.ttl, low=timedelta(milliseconds=100), high=timedelta(hours=1))
        wait = _duration(prefix + "wait", req.wait, low=timedelta(0), high=timedelta(hours=1))
        mode = validate.enum_value(prefix + "mode", req.mode, _MODES)
        if req.node_id < 0:
            raise InvalidArgumentError(prefix + "node_id", "must be 0 or a node id")
        op = AcquireOp(
            name,
            mode,
            _holder(prefix + "holder", req.holder, context),
            req.node_id,
            validate.request_id(prefix + "request_id", req.request_id),
            ttl,
            wait,
        )
        began = time.monotonic()
        fut = self._ops.submit(op)
        try:
            outcome = await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(lambda f: self._undo(name, f))  # the caller is gone: give back what it got
            raise
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, Acquired)
        hold = outcome.hold or await self._store.wait_for_grant(
            name, outcome.waiter_id, asyncio.get_running_loop().time() + wait.total_seconds()
        )
        metrics.lock_wait.record(1000 * (time.monotonic() - began))
        resp = pb.AcquireResponse(lease=convert.hold_to_proto(hold))
        resp.server_time.FromDatetime(hold.grant_time)
        return resp

    def _undo(self, name: str, fut: asyncio.Future[Outcome]) -> None:
        """An acquire whose caller left while its batch ran: its grant is released, its place in line given up."""
        if fut.cancelled() or fut.exception() is not None:
            return
        outcome = fut.result()
        if not isinstance(outcome, Acquired):
            return
        if outcome.hold is not None:
            undo = self._store.release(outcome.hold.lease_id)
        else:
            undo = self._store.wait_for_grant(name, outcome.waiter_id, 0.0)  # abandons at once
        task: asyncio.Task[object] = asyncio.ensure_future(undo)
        self._undoing.add(task)
        task.add_done_callback(self._undone)

    def _undone(self, task: asyncio.Task[object]) -> None:
        self._undoing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, LockHeldError):
                log.warning("giving back an abandoned acquire failed: %s", type(exc).__name__)

    @translate_errors
    async def Acquire(self, request: pb.AcquireRequest, context: grpc.aio.ServicerContext) -> pb.AcquireResponse:
        telemetry.annotate(lock=request.name[:200], node_id=request.node_id)
        return await self._acquire(request, context)

    async def _keep_alive(self, req: pb.KeepAliveRequest, prefix: str = "") -> pb.KeepAliveResponse:
        lease_id = validate.positive_id(prefix + "lease_id", req.lease_id)
        kept = await self._run(KeepAliveOp(lease_id))
        assert isinstance(kept, tuple)
        expire, now = kept
        resp = pb.KeepAliveResponse(lease_id=lease_id)
        resp.expire_time.FromDatetime(expire)
        resp.server_time.FromDatetime(now)
        return resp

    async def _release(self, req: pb.ReleaseRequest, prefix: str = "") -> pb.ReleaseResponse:
        lease_id = validate.positive_id(prefix + "lease_id", req.lease_id)
        return pb.ReleaseResponse(released=bool(await self._run(ReleaseOp(lease_id))))

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """One answer per keep-alive; a lost hold ends the stream with LOCK_NOT_HELD."""
        try:
            async for req in request_iterator:
                await context.write(await self._keep_alive(req))
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped like every unary call
            await abort_with(context, translate(exc))

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Acquires, releases and keep-alives on one stream; each answered by seq, failures included.

        Operations run concurrently (an acquire may wait in line while keep-alives flow) and join
        the replica's batches; ``cancel`` withdraws a waiting one. A client that sends several
        operations in one message (``ops``) gets the answers ready together in one message
        (``results``): a stream message costs as much as a small transaction. When the stream ends,
        its waiting acquires give their places up; holds it acquired stay until released or expired.
        """
        running: dict[int, asyncio.Task[None]] = {}
        withdrawn: set[int] = set()
        ready: list[pb.SessionResponse] = []
        wake = asyncio.Event()
        batched = False

        async def answer(req: pb.SessionRequest, which: str | None) -> None:
            try:
                if which == "acquire":
                    acquired = await self._acquire(req.acquire, context, "acquire.")
                    resp = pb.SessionResponse(seq=req.seq, acquired=acquired)
                elif which == "release":
                    resp = pb.SessionResponse(seq=req.seq, released=await self._release(req.release, "release."))
                elif which == "keep_alive":
                    resp = pb.SessionResponse(
                        seq=req.seq, kept_alive=await self._keep_alive(req.keep_alive, "keep_alive.")
                    )
                else:
                    raise InvalidArgumentError("op", "one of acquire, release, keep_alive, cancel is required")
            except asyncio.CancelledError:
                if not context.done() and req.seq in withdrawn:
                    resp = _operation_error(req.seq, CancelledOperationError())
                else:
                    raise
            except Exception as exc:  # noqa: BLE001 - answered on the stream, the stream goes on
                resp = _operation_error(req.seq, exc)
            finally:
                running.pop(req.seq, None)
                withdrawn.discard(req.seq)
            ready.append(resp)
            wake.set()

        def start(req: pb.SessionRequest) -> None:
            which = req.WhichOneof("op")
            if which == "cancel":
                task = running.get(req.cancel.seq)
                if task is not None:
                    withdrawn.add(req.cancel.seq)
                    task.cancel()
                return
            running[req.seq] = asyncio.create_task(answer(req, which))

        async def write() -> None:
            while True:
                await wake.wait()
                wake.clear()
                while ready:
                    if batched and len(ready) > 1:
                        out, ready[:] = pb.SessionResponse(results=ready), []
                    else:
                        out = ready.pop(0)
                    await context.write(out)
                if finished.is_set():
                    return

        finished = asyncio.Event()  # no more operations: the writer ends once it has written all
        writer = asyncio.create_task(write())
        try:
            async for req in request_iterator:
                if req.ops:
                    batched = True
                    for op in req.ops:
                        start(op)
                else:
                    start(req)
            while running:
                await asyncio.gather(*running.values(), return_exceptions=True)
            finished.set()
            wake.set()
            await writer
        finally:
            for task in list(running.values()):
                task.cancel()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    @translate_errors
    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReleaseResponse:
        return await self._release(request)

    @translate_errors
    async def ListLocks(self, request: pb.ListLocksRequest, context: grpc.aio.ServicerContext) -> pb.ListLocksResponse:
        size = validate.page_size("page_size", request.page_size)
        after = ""
        if request.page_token:
            try:
                import base64

                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except ValueError:
                raise InvalidArgumentError("page_token", "is not a token from a previous response") from None
        locks, more, now = await self._store.list_locks(after, size)
        resp = pb.ListLocksResponse(locks=[convert.lock_to_proto(lock) for lock in locks])
        if more and locks:
            import base64

            resp.next_page_token = base64.urlsafe_b64encode(locks[-1].name.encode()).decode()
        resp.server_time.FromDatetime(now)
        return resp

    @translate_errors
    async def BreakLock(self, request: pb.BreakLockRequest, context: grpc.aio.ServicerContext) -> pb.BreakLockResponse:
        fence, released = await self._store.break_lock(_name("name", request.name))
        return pb.BreakLockResponse(fence=fence, released=released)

    @translate_errors
    async def ValidateFence(
        self, request: pb.ValidateFenceRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateFenceResponse:
        name = _name("name", request.name)
        token = validate.positive_id("token", request.token)
        valid, fence = await self._store.validate(name, token)
        return pb.ValidateFenceResponse(valid=valid, fence=fence)

    @translate_errors
    async def ClaimFiring(
        self, request: pb.ClaimFiringRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClaimFiringResponse:
        job = _name("job", request.job)
        if not request.HasField("scheduled_time"):
            raise InvalidArgumentError("scheduled_time", "is required")
        firing = await self._jobs.claim_firing(
            job,
            request.scheduled_time.ToDatetime(tzinfo=_UTC),
            ttl=_duration("ttl", request.ttl, low=timedelta(milliseconds=100), high=timedelta(hours=24)),
            holder=_holder("holder", request.holder, context),
            node_id=max(0, request.node_id),
            recoverable=request.recoverable,
            misfire_threshold=_duration(
                "misfire_threshold", request.misfire_threshold, low=timedelta(0), high=timedelta(days=7)
            ),
            request_id=validate.request_id("request_id", request.request_id),
        )
        return pb.ClaimFiringResponse(firing=convert.firing_to_proto(firing))

    @translate_errors
    async def CompleteFiring(
        self, request: pb.CompleteFiringRequest, context: grpc.aio.ServicerContext
    ) -> pb.CompleteFiringResponse:
        job = _name("job", request.job)
        if not request.HasField("scheduled_time"):
            raise InvalidArgumentError("scheduled_time", "is required")
        token = validate.positive_id("token", request.token)
        firing = await self._jobs.complete_firing(
            job, request.scheduled_time.ToDatetime(tzinfo=_UTC), token, failed=request.failed
        )
        return pb.CompleteFiringResponse(firing=convert.firing_to_proto(firing))

    @translate_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext) -> pb.ListJobsResponse:
        size = validate.page_size("page_size", request.page_size) if request.page_size else 100
        job = _name("job", request.job) if request.job else ""
        firings, now = await self._jobs.list_firings(job, size)
        resp = pb.ListJobsResponse(firings=[convert.firing_to_proto(f) for f in firings])
        resp.server_time.FromDatetime(now)
        return resp


from datetime import UTC as _UTC  # noqa: E402

_ = to_status
