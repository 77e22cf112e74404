"""Heartbeats of several leases on one KeepAlive stream, several per message.

A :class:`~muster.client.Cluster` that keeps more than one lease alive (several agents sharing one
connection, a process that runs many nodes) sends their heartbeats on one stream: the beats that
are asked for while a message is being prepared go out together in one ``KeepAliveRequest`` with
``heartbeats``, renewed by the server in one commit and answered by one response whose ``errors``
name the failed ones by index. A failed heartbeat fails only its own caller; the stream goes on.

Messages are pipelined (several in flight on the stream, answered in order). When the stream
breaks, every heartbeat in flight gets the transport's error and its caller retries (renewing a
lease twice is harmless).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from muster.api.errors.v1 import error_reason_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client._channel import Endpoint
from muster.client.errors import MusterError, from_rpc_error, from_status

_MAX_PER_MESSAGE = 1_000  # the server's limit per KeepAliveRequest
_REASON_PREFIX = "ERROR_REASON_"

Waiter = asyncio.Future[pb.HeartbeatResponse]


def _error(e: pb.HeartbeatError) -> MusterError:
    """The client error for one failed heartbeat of a message (as if it had been its call's status)."""
    info = error_details_pb2.ErrorInfo(metadata=dict(e.metadata))
    if e.reason in error_reason_pb2.ErrorReason.values():
        name = error_reason_pb2.ErrorReason.Name(e.reason)
        info.reason = name.removeprefix(_REASON_PREFIX) if e.reason else ""
    detail = any_pb2.Any()
    detail.Pack(info)
    return from_status(e.code, e.message, [detail])


class SharedKeepAlive:
    """One KeepAlive stream carrying the heartbeats of every lease of a connection.

    Args:
        endpoint: the registry's endpoint (the stream is opened on its current replica).
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._pending: list[tuple[pb.HeartbeatRequest, Waiter]] = []
        self._scheduled = False
        self._queue: asyncio.Queue[pb.KeepAliveRequest | None] | None = None
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._in_flight: collections.deque[list[Waiter]] = collections.deque()
        self.messages = 0  # messages sent (for tests and metrics)
        self.largest = 0  # most heartbeats in one message

    def submit(self, req: pb.HeartbeatRequest) -> Waiter:
        """Queues one heartbeat for the next message; the future resolves with its answer or error.

        Raises (through the future):
            MusterError: this heartbeat's own error (StaleLeaseError, LeaseExpiredError, ...), or
                the stream's (UNAVAILABLE, ...) when it broke with the heartbeat in flight.
        """
        fut: Waiter = asyncio.get_running_loop().create_future()
        self._pending.append((req, fut))
        if not self._scheduled:
            # Sent at the end of this turn of the loop: beats asked for together go out together.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)
        return fut

    def _open(self) -> None:
        self._queue = asyncio.Queue()
        queue = self._queue

        async def requests() -> Any:
            while (item := await queue.get()) is not None:
                yield item

        self._call = self._endpoint.stub().KeepAlive(requests())
        self._reader = asyncio.ensure_future(self._read(self._call, self._in_flight))

    def _send(self) -> None:
        self._scheduled = False
        pending = [(r, f) for r, f in self._pending if not f.done()]
        self._pending = []
        if not pending:
            return
        if self._call is None:
            self._open()
        assert self._queue is not None
        for at in range(0, len(pending), _MAX_PER_MESSAGE):
            chunk = pending[at : at + _MAX_PER_MESSAGE]
            self._in_flight.append([f for _, f in chunk])
            self._queue.put_nowait(pb.KeepAliveRequest(heartbeats=[r for r, _ in chunk]))
            self.messages += 1
            self.largest = max(self.largest, len(chunk))

    async def _read(self, call: Any, in_flight: collections.deque[list[Waiter]]) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    code = await call.code()
                    raise MusterError("the keep-alive stream ended", code=code if code else grpc.StatusCode.UNAVAILABLE)
                if not in_flight:
                    continue
                waiters = in_flight.popleft()
                failed = {e.index: e for e in resp.errors}
                for i, fut in enumerate(waiters):
                    if fut.done():
                        continue
                    if i in failed:
                        fut.set_exception(_error(failed[i]))
                    elif resp.HasField("heartbeat"):
                        fut.set_result(resp.heartbeat)
                    else:
                        fut.set_exception(MusterError("no answer for this heartbeat", code=grpc.StatusCode.INTERNAL))
        except asyncio.CancelledError:
            self._fail(call, in_flight, MusterError("the keep-alive stream was closed", code=grpc.StatusCode.CANCELLED))
            raise
        except grpc.aio.AioRpcError as exc:
            self._fail(call, in_flight, from_rpc_error(exc))
        except MusterError as exc:
            self._fail(call, in_flight, exc)

    def _fail(self, call: Any, in_flight: collections.deque[list[Waiter]], err: MusterError) -> None:
        """The stream broke: every heartbeat in flight on it gets ``err``; the next opens a new one."""
        while in_flight:
            for fut in in_flight.popleft():
                if not fut.done():
                    fut.set_exception(err)
        if self._call is call:
            self._call, self._queue, self._reader = None, None, None
            self._in_flight = collections.deque()
            if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                self._endpoint.fail_over()  # once per broken stream, not once per heartbeat on it
        call.cancel()

    def reset(self) -> None:
        """Drops the stream (a caller timed out on it); heartbeats in flight fail and are retried."""
        if self._call is not None:
            self._fail(
                self._call,
                self._in_flight,
                MusterError("no answer on the keep-alive stream in time", code=grpc.StatusCode.DEADLINE_EXCEEDED),
            )
        if self._reader is not None:
            self._reader.cancel()

    async def close(self) -> None:
        """Ends the stream."""
        reader, call, in_flight = self._reader, self._call, self._in_flight
        if self._queue is not None:
            self._queue.put_nowait(None)
        self._call, self._queue, self._reader = None, None, None
        self._in_flight = collections.deque()
        if call is not None:
            self._fail(call, in_flight, MusterError("the keep-alive stream was closed", code=grpc.StatusCode.CANCELLED))
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
