"""The one lock Session stream a Cluster keeps: acquires, releases and keep-alives as messages.

A unary call costs the server several times what a stream message does, and the lock service
batches what arrives on all streams into one transaction; so every lock operation of a Cluster
rides this stream. While it is down (a replica stopped, the network cut) operations go as unary
calls, and the next operation after a backoff opens it again, on the next replica.

An operation whose stream breaks before its answer is not answered here: the caller repeats it as
a unary call, which is safe because every operation is idempotent (an acquire carries a request id
the server recognizes; releasing a released hold and renewing are harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc

from muster.api.locks.v1 import locks_service_pb2 as pb
from muster.client._channel import Endpoint, backoff
from muster.client._config import ClientConfig
from muster.client.errors import from_rpc_error

log = logging.getLogger(__name__)

_CLOSE = object()


class StreamDown(Exception):
    """The stream cannot carry the operation (down, broken before the answer): use a unary call."""


class LockStream:
    """Sends lock operations on one Session stream and matches the answers by seq.

    Args:
        endpoint: the lock service's replicas.
        config: the client configuration (backoff, deadline).
    """

    def __init__(self, endpoint: Endpoint, config: ClientConfig) -> None:
        self._endpoint = endpoint
        self._config = config
        self._seq = itertools.count(1)
        self._pending: dict[int, asyncio.Future[pb.SessionResponse]] = {}
        self._abandoned: set[int] = set()
        self._outbox: asyncio.Queue[Any] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._failures = 0
        self._down_until = 0.0
        self._closed = False

    def _open(self) -> bool:
        """Opens the stream if need be; False while it is backing off after a failure."""
        if self._reader is not None and not self._reader.done():
            return True
        if self._closed or time.monotonic() < self._down_until:
            return False
        outbox: asyncio.Queue[Any] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.SessionRequest]:
            # Whatever queued while the last message was written goes in the next one.
            while True:
                items = [await outbox.get()]
                while not outbox.empty():
                    items.append(outbox.get_nowait())
                closing = items[-1] is _CLOSE
                ops = [i for i in items if i is not _CLOSE]
                if len(ops) == 1:
                    yield ops[0]
                elif ops:
                    yield pb.SessionRequest(ops=ops)
                if closing:
                    return

        call = self._endpoint.stub().Session(requests())
        self._outbox = outbox
        self._reader = asyncio.create_task(self._read(call, outbox), name="muster-lock-stream")
        return True

    async def _read(self, call: Any, outbox: asyncio.Queue[Any]) -> None:
        hint: timedelta | None = None  # the server's retry delay, when it ended the stream with one
        try:
            async for message in call:
                self._failures = 0
                for resp in message.results or (message,):
                    self._answered(resp, outbox)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as exc:
            hint = from_rpc_error(exc).retry_after
            if not self._closed:
                log.debug("lock stream ended: %s", exc.code().name)
        finally:
            self._broken(outbox, hint)
            with contextlib.suppress(Exception):
                call.cancel()

    def _answered(self, resp: pb.SessionResponse, outbox: asyncio.Queue[Any]) -> None:
        fut = self._pending.pop(resp.seq, None)
        if fut is not None and not fut.done():
            fut.set_result(resp)
        elif resp.seq in self._abandoned:
            self._abandoned.discard(resp.seq)
            if resp.WhichOneof("result") == "acquired":
                # Granted to a caller that stopped waiting: give it back at once.
                outbox.put_nowait(
                    pb.SessionRequest(
                        seq=next(self._seq), release=pb.ReleaseRequest(lease_id=resp.acquired.lease.lease_id)
                    )
                )

    def _broken(self, outbox: asyncio.Queue[Any], hint: timedelta | None = None) -> None:
        if self._outbox is outbox:
            self._outbox = None
            if not self._closed:
                self._endpoint.fail_over()
                self._down_until = time.monotonic() + backoff(self._failures, self._config, hint)
                self._failures += 1
        pending, self._pending = self._pending, {}
        self._abandoned.clear()
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(StreamDown("the lock stream broke before the answer"))

    async def request(self, timeout: float, **op: Any) -> pb.SessionResponse:
        """Sends one operation (``acquire=…``, ``release=…`` or ``keep_alive=…``) and waits for its answer.

        Raises:
            StreamDown: the stream is down or broke first, or gave no answer within ``timeout``
                seconds (then it is closed, so a stalled replica is left); repeat as a unary call.
            asyncio.CancelledError: the caller was cancelled; a waiting acquire is withdrawn on the
                server, and a grant that comes anyway is released.
        """
        if not self._open():
            raise StreamDown("the lock stream is down")
        assert self._outbox is not None
        seq = next(self._seq)
        fut: asyncio.Future[pb.SessionResponse] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        self._outbox.put_nowait(pb.SessionRequest(seq=seq, **op))
        try:
            done, _ = await asyncio.wait((fut,), timeout=timeout)
        except asyncio.CancelledError:
            self._withdraw(seq)
            raise
        if not done:
            self._withdraw(seq)
            if self._reader is not None:
                self._reader.cancel()  # no answer in time: this replica is not to be trusted now
            raise StreamDown(f"no answer on the lock stream within {timeout:g}s")
        return fut.result()

    def _withdraw(self, seq: int) -> None:
        fut = self._pending.pop(seq, None)
        if fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None:
            resp = fut.result()  # answered just now: a grant must still be given back
            if resp.WhichOneof("result") == "acquired" and self._outbox is not None:
                self._outbox.put_nowait(
                    pb.SessionRequest(
                        seq=next(self._seq), release=pb.ReleaseRequest(lease_id=resp.acquired.lease.lease_id)
                    )
                )
            return
        if self._outbox is not None:
            self._abandoned.add(seq)
            self._outbox.put_nowait(pb.SessionRequest(seq=next(self._seq), cancel=pb.CancelRequest(seq=seq)))

    async def close(self) -> None:
        """Ends the stream (its holds stay until released or expired; waiting acquires give up)."""
        self._closed = True
        if self._outbox is not None:
            self._outbox.put_nowait(_CLOSE)
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(self._reader), 1.0)
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
