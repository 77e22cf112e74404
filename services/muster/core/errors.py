"""Domain errors and the one table that turns them into gRPC statuses.

A domain error carries its status code, its reason (an ``ErrorReason`` value's name without the
``ERROR_REASON_`` prefix) and the values its message mentions. :func:`abort_with` sends it as a
``google.rpc.Status`` with an ``ErrorInfo`` (plus ``BadRequest`` for a bad field and ``RetryInfo``
for a retry hint); the client maps it back by reason.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from muster.api.errors.v1 import error_reason_pb2

log = logging.getLogger(__name__)


def _reason_names() -> frozenset[str]:
    prefix = "ERROR_REASON_"
    return frozenset(n.removeprefix(prefix) for n in error_reason_pb2.ErrorReason.keys() if n != prefix + "UNSPECIFIED")


REASONS = _reason_names()


class MusterError(Exception):
    """A failure the caller can act on.

    Args:
        message: a short English sentence saying what to do.
        **metadata: every value the message mentions, as strings in ``ErrorInfo.metadata``.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"
    domain: str = "muster.core"
    retry_after: timedelta | None = None

    def __init__(self, message: str, *, domain: str | None = None, **metadata: Any) -> None:
        super().__init__(message)
        if self.reason not in REASONS:
            raise AssertionError(f"unknown ErrorReason {self.reason}")
        if domain:
            self.domain = domain
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def details(self) -> list[any_pb2.Any]:
        """The status details: an ErrorInfo, and whatever the subclass adds."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=self.metadata))
        out = [info]
        if self.retry_after is not None:
            retry = any_pb2.Any()
            retry.Pack(
                error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(
                        seconds=int(self.retry_after.total_seconds()),
                        nanos=self.retry_after.microseconds * 1000,
                    )
                )
            )
            out.append(retry)
        return out


class InvalidArgumentError(MusterError):
    """A request field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_FIELD"

    def __init__(self, field: str, message: str, **metadata: Any) -> None:
        super().__init__(f"{field}: {message}", field=field, **metadata)
        self.field = field
        self.description = message

    def details(self) -> list[any_pb2.Any]:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.description)
                ]
            )
        )
        return [*super().details(), bad]


class NotFoundError(MusterError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPreconditionError(MusterError):
    """The thing is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(MusterError):
    """A lost race; retrying the whole operation may succeed."""

    code = grpc.StatusCode.ABORTED


class StoreUnavailableError(MusterError):
    """The database cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"

    def __init__(self, message: str = "the database is unreachable; retry shortly or on another replica") -> None:
        super().__init__(message)
        self.retry_after = timedelta(seconds=1)


class ShuttingDownError(MusterError):
    """This replica is stopping; resume on another one."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"

    def __init__(self) -> None:
        super().__init__("this replica is shutting down; resume on another replica")
        self.retry_after = timedelta(milliseconds=100)


class KeysUnavailableError(MusterError):
    """The keys service cannot be asked right now (by the registry checking a join, or the balancer
    fetching its route-signing key); the call can be retried."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"


class SlowConsumerError(MusterError):
    """A watch stream fell too far behind the head."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "SLOW_CONSUMER"

    def __init__(self, through_revision: int, lag: int, retry_after: timedelta) -> None:
        super().__init__(
            "the stream fell too far behind; resume from through_revision after the retry delay",
            through_revision=through_revision,
            lag=lag,
        )
        self.retry_after = retry_after


def _is_store_failure(exc: BaseException) -> bool:
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - the server always has asyncpg
        return isinstance(exc, OSError | ConnectionError)
    return isinstance(
        exc,
        OSError
        | ConnectionError
        | asyncio.TimeoutError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        | asyncpg.exceptions.InterfaceError
        # A connection whose server died mid-statement can report "cannot switch to state …;
        # another operation is in progress" (seen when PostgreSQL restarts): the pool drops it.
        | asyncpg.exceptions.InternalClientError
        | asyncpg.exceptions.CannotConnectNowError
        | asyncpg.exceptions.ConnectionFailureError
        | asyncpg.exceptions.AdminShutdownError
        | asyncpg.exceptions.CrashShutdownError
        | asyncpg.exceptions.TooManyConnectionsError
        | asyncpg.exceptions.IdleInTransactionSessionTimeoutError
        # A failover: no host of the URL is the primary yet, or this one was demoted.
        | asyncpg.exceptions.TargetServerAttributeNotMatched
        | asyncpg.exceptions.ReadOnlySQLTransactionError,
    )


def to_status(err: MusterError) -> grpc.Status:
    """The ``grpc.Status`` (with rich details) a domain error is sent as."""
    return rpc_status.to_status(status_pb2.Status(code=err.code.value[0], message=str(err), details=err.details()))


async def abort_with(context: grpc.aio.ServicerContext, err: MusterError) -> NoReturn:
    """Ends the call with ``err`` as its status."""
    status = to_status(err)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # pragma: no cover


def translate(exc: BaseException) -> MusterError:
    """Maps any exception to the domain error the caller sees (store failures become UNAVAILABLE)."""
    if isinstance(exc, MusterError):
        return exc
    if _is_store_failure(exc):
        return StoreUnavailableError()
    err = MusterError("internal error; the server log has the details")
    return err


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def translate_errors(handler: F) -> F:
    """Wraps a servicer method so that domain errors reach the caller as rich statuses.

    Cancellation and aborts pass through untouched; an unexpected exception is logged and becomes
    INTERNAL with a generic message (never the exception's text, which may carry a secret).
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            err = translate(exc)
            if err.reason == "INTERNAL":
                log.exception("unexpected error in %s", handler.__name__, extra={"event": "rpc_internal_error"})
            elif err.reason == "STORE_UNAVAILABLE":
                log.warning("database unavailable in %s: %s", handler.__name__, type(exc).__name__)
            await abort_with(context, err)

    return wrapper  # type: ignore[return-value]


GRPC_CODE_NUMBERS = {c.name: c.value[0] for c in grpc.StatusCode}
assert GRPC_CODE_NUMBERS["INVALID_ARGUMENT"] == code_pb2.INVALID_ARGUMENT
