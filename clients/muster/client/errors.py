"""The client's exceptions: one per ErrorInfo reason, grouped by status code.

``from_rpc_error`` reads the ``google.rpc.Status`` in a failed call's trailing metadata and raises
the matching class, so callers match on types, never on messages::

    try:
        await cluster.heartbeat(lease)
    except LeaseExpiredError:
        lease = await cluster.join_node(...)
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "MusterError",
    "InvalidArgumentError",
    "NotFoundError",
    "NodeNotFoundError",
    "FailedPreconditionError",
    "StaleLeaseError",
    "LeaseExpiredError",
    "NodeLimitReachedError",
    "NodeHasSessionsError",
    "NodeStateError",
    "FutureRevisionError",
    "AbortedError",
    "NodeDeletingError",
    "LockHeldError",
    "LockNotHeldError",
    "StaleTokenError",
    "FiringClaimedError",
    "FiringDoneError",
    "MisfiredError",
    "UnavailableError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "PermissionDeniedError",
    "UnauthenticatedError",
    "MissingTokenError",
    "BadTokenError",
    "AdminRequiredError",
    "InvalidSecureCookieKeyError",
    "InvalidLauncherKeyError",
    "LauncherKeyUnreadableError",
    "InvalidKeyPermissionsError",
    "KeysNotDefinedError",
    "KeyVersionNotFoundError",
    "KeyRotationPendingError",
    "MasterKeyMismatchError",
    "NoEligibleNodeError",
    "SessionNotFoundError",
    "ForgedSessionIdError",
    "StrategyUnavailableError",
    "InternalError",
    "LockLostError",
    "LocalKeyFileError",
    "AddressNotFoundError",
    "from_rpc_error",
    "is_transient",
]


class MusterError(Exception):
    """A failed call.

    Attributes:
        code: the gRPC status code.
        reason: the ErrorInfo reason (``NODE_NOT_FOUND``), or "" when the server sent none.
        metadata: the ErrorInfo metadata (the values the message mentions).
        retry_after: the server's retry hint (its ``google.rpc.RetryInfo``), if any.
        transient: whether the failure is transient, by :func:`is_transient` (the one table).
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after: timedelta | None = None,
        field_violations: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = metadata or {}
        self.retry_after = retry_after
        self.field_violations = field_violations or {}

    def __str__(self) -> str:
        return self.message

    @property
    def transient(self) -> bool:
        """True when trying again later (perhaps on another replica) may succeed; see :func:`is_transient`."""
        return is_transient(self.code, self.reason)


class InvalidArgumentError(MusterError):
    """A request field is wrong; ``field`` names it."""

    @property
    def field(self) -> str:
        """The field the server named."""
        return self.metadata.get("field", "")


class NotFoundError(MusterError):
    """The named thing does not exist."""


class NodeNotFoundError(NotFoundError):
    """No node has the id."""


class FailedPreconditionError(MusterError):
    """The thing is not in a state that allows the operation."""


class StaleLeaseError(FailedPreconditionError):
    """The lease was replaced by a newer join of the same node."""


class LeaseExpiredError(FailedPreconditionError):
    """The node is no longer ONLINE (its lease expired, or it left): join again."""


class NodeLimitReachedError(FailedPreconditionError):
    """The cluster's node limit is reached."""


class NodeHasSessionsError(FailedPreconditionError):
    """Deleting an ONLINE node with sessions needs force."""


class NodeStateError(FailedPreconditionError):
    """The node's state does not allow the operation."""


class FutureRevisionError(FailedPreconditionError):
    """A watch asked for a revision beyond the cluster's head."""


class AbortedError(MusterError):
    """A lost race; the whole operation may be retried."""


class NodeDeletingError(AbortedError):
    """The node is being deleted; join again in a moment (it will get a new id)."""


class LockHeldError(AbortedError):
    """The lock is held by another (``metadata["holder"]``, ``metadata["token"]``)."""


class LockNotHeldError(FailedPreconditionError):
    """The hold is gone: it expired, was broken, or was released."""


class StaleTokenError(AbortedError):
    """A newer fencing token was granted: the holder's writes must stop."""


class LockLostError(MusterError):
    """The lease was lost while its body ran (the body was cancelled), or it is used after it was lost."""


class LocalKeyFileError(MusterError):
    """A node's key files cannot be used (``reason``: INVALID_KEY_PERMISSIONS, ERROR_READING_LAUNCHER_KEY, …)."""


class AddressNotFoundError(RuntimeError):
    """No strategy found an address for the node (the reference status FAILED_TO_RESOLVE)."""


class FiringClaimedError(AbortedError):
    """Another node claimed the firing (``metadata["holder"]``)."""


class FiringDoneError(FailedPreconditionError):
    """The firing already ran (or was skipped)."""


class MisfiredError(FailedPreconditionError):
    """The firing is later than its misfire threshold: skipped."""


class UnavailableError(MusterError):
    """The service (or its database) cannot be reached right now; retry, perhaps elsewhere."""


class ResourceExhaustedError(MusterError):
    """The server shed the call or cut a stream that fell behind; see ``retry_after``."""


class DeadlineExceededError(MusterError):
    """The call's deadline passed."""


class PermissionDeniedError(MusterError):
    """The credentials do not allow the operation."""


class UnauthenticatedError(MusterError):
    """No or bad credentials."""


class MissingTokenError(UnauthenticatedError):
    """The server requires a token and the call carried none (set ``MUSTER_TOKEN``)."""


class BadTokenError(UnauthenticatedError):
    """The token is not one the server accepts."""


class AdminRequiredError(PermissionDeniedError):
    """The operation needs the admin token (``metadata["method"]`` names the call)."""


class InvalidSecureCookieKeyError(FailedPreconditionError):
    """The node's secure cookie key differs from the cluster's (``node_fingerprint``, ``cluster_fingerprint``)."""


class InvalidLauncherKeyError(FailedPreconditionError):
    """The node's launcher key differs from the cluster's (``node_fingerprint``, ``cluster_fingerprint``)."""


class LauncherKeyUnreadableError(InvalidArgumentError):
    """A launcher key is not a readable PEM private key (``field`` names it)."""


class InvalidKeyPermissionsError(FailedPreconditionError):
    """A key file is readable by group or others (``path``, ``mode``)."""


class KeysNotDefinedError(FailedPreconditionError):
    """The cluster's keys are not defined yet."""


class KeyVersionNotFoundError(NotFoundError):
    """No such key version, or it is retired (``version``)."""


class KeyRotationPendingError(FailedPreconditionError):
    """A rotation is under way: its PENDING version must be promoted first (``version``)."""


class NoEligibleNodeError(FailedPreconditionError):
    """No node can take the session (``metadata["excluded"]``: ``node:reason`` pairs)."""


class SessionNotFoundError(NotFoundError):
    """No such session: it ended, or never existed."""


class ForgedSessionIdError(InvalidArgumentError):
    """The session id's route signature does not verify: forged or tampered."""


class StrategyUnavailableError(FailedPreconditionError):
    """The custom strategy is not configured on the server."""


class MasterKeyMismatchError(FailedPreconditionError):
    """The stored keys were sealed under another master key than the server's."""


class OperationWithdrawnError(MusterError):
    """A lock operation this client withdrew (a cancelled acquire) before it completed."""


class InternalError(MusterError):
    """A server bug."""


# The client half of the one table: ErrorInfo reasons to classes (a test pins it against the
# ErrorReason enum of the contract) and, failing that, status codes to classes.
BY_REASON: dict[str, type[MusterError]] = {
    "INVALID_FIELD": InvalidArgumentError,
    "NODE_NOT_FOUND": NodeNotFoundError,
    "STALE_LEASE": StaleLeaseError,
    "LEASE_EXPIRED": LeaseExpiredError,
    "NODE_LIMIT_REACHED": NodeLimitReachedError,
    "NODE_HAS_SESSIONS": NodeHasSessionsError,
    "NODE_STATE": NodeStateError,
    "STORE_UNAVAILABLE": UnavailableError,
    "SLOW_CONSUMER": ResourceExhaustedError,
    "SHUTTING_DOWN": UnavailableError,
    "INTERNAL": InternalError,
    "FUTURE_REVISION": FutureRevisionError,
    "NODE_DELETING": NodeDeletingError,
    "LOCK_HELD": LockHeldError,
    "LOCK_NOT_HELD": LockNotHeldError,
    "STALE_TOKEN": StaleTokenError,
    "FIRING_CLAIMED": FiringClaimedError,
    "FIRING_DONE": FiringDoneError,
    "MISFIRED": MisfiredError,
    "MISSING_TOKEN": MissingTokenError,
    "BAD_TOKEN": BadTokenError,
    "ADMIN_REQUIRED": AdminRequiredError,
    "INVALID_SECURE_COOKIE_KEY": InvalidSecureCookieKeyError,
    "INVALID_LAUNCHER_KEY": InvalidLauncherKeyError,
    "ERROR_READING_LAUNCHER_KEY": LauncherKeyUnreadableError,
    "INVALID_KEY_PERMISSIONS": InvalidKeyPermissionsError,
    "KEYS_NOT_DEFINED": KeysNotDefinedError,
    "KEY_VERSION_NOT_FOUND": KeyVersionNotFoundError,
    "KEY_ROTATION_PENDING": KeyRotationPendingError,
    "MASTER_KEY_MISMATCH": MasterKeyMismatchError,
    "NO_ELIGIBLE_NODE": NoEligibleNodeError,
    "SESSION_NOT_FOUND": SessionNotFoundError,
    "FORGED_SESSION_ID": ForgedSessionIdError,
    "STRATEGY_UNAVAILABLE": StrategyUnavailableError,
    "OPERATION_WITHDRAWN": OperationWithdrawnError,
}
BY_CODE: dict[grpc.StatusCode, type[MusterError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.CANCELLED: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INTERNAL: InternalError,
}


# The one table of transient failures, used by every retry of the client (calls, the KeepAlive and
# lock streams, watches, lock renewal, the agent). A reason the server sent decides first; otherwise
# the code does. Transient: the server, its database or the path to it could not answer now;
# anything else is a verdict that another attempt, on any replica, would only repeat.
TRANSIENT_REASONS: dict[str, bool] = {
    "STORE_UNAVAILABLE": True,  # the database is unreachable
    "SHUTTING_DOWN": True,  # this replica is stopping: resume on another
    "SLOW_CONSUMER": True,  # a stream cut for falling behind: resume after the retry delay
    "NODE_DELETING": True,  # an operator's deletion is finishing: join again in a moment
    "NO_ELIGIBLE_NODE": False,  # a placement's verdict (older servers sent it as UNAVAILABLE)
    "INTERNAL": False,  # a server handler's bug, not an outage
}
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,  # cancelled by the server (a replica stopping); our own is CancelledError
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # shed or cut; RetryInfo says when to come back
        grpc.StatusCode.DEADLINE_EXCEEDED,  # no answer in time (a call does not repeat its own; see _retry)
    }
)
# Without a muster reason these come from the transport, not from a handler (a stream reset by a
# replica that died: "Stream removed", RST_STREAM), so they are transient too.
TRANSPORT_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


def is_transient(code: grpc.StatusCode, reason: str = "") -> bool:
    """Whether a failure with this status code and ErrorInfo reason is transient (the one table).

    Args:
        code: the gRPC status code.
        reason: the ErrorInfo reason, "" when the server sent none.

    Returns:
        True when trying again later, perhaps on another replica, may succeed.
    """
    if reason in TRANSIENT_REASONS:
        return TRANSIENT_REASONS[reason]
    return code in TRANSIENT_CODES or (not reason and code in TRANSPORT_CODES)


def _parse(details: Any) -> tuple[str, dict[str, str], timedelta | None, dict[str, str]]:
    reason, metadata, retry_after, fields = "", {}, None, {}
    for detail in details:
        info, retry, bad = (
            error_details_pb2.ErrorInfo(),
            error_details_pb2.RetryInfo(),
            error_details_pb2.BadRequest(),
        )
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Unpack(retry):
            retry_after = retry.retry_delay.ToTimedelta()
        elif detail.Unpack(bad):
            fields = {v.field: v.description for v in bad.field_violations}
    return reason, metadata, retry_after, fields


def _details(err: Any) -> tuple[str, dict[str, str], timedelta | None, dict[str, str]]:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return _parse(status_pb2.Status.FromString(value).details)
    return "", {}, None, {}


def _build(
    code: grpc.StatusCode, message: str, details: tuple[str, dict[str, str], timedelta | None, dict[str, str]]
) -> MusterError:
    reason, metadata, retry_after, fields = details
    cls = BY_REASON.get(reason) or BY_CODE.get(code, MusterError)
    return cls(message, code=code, reason=reason, metadata=metadata, retry_after=retry_after, field_violations=fields)


def from_rpc_error(err: grpc.RpcError) -> MusterError:
    """The MusterError for a failed call (keep the original as ``__cause__`` when raising it)."""
    code = err.code()  # type: ignore[attr-defined]
    return _build(code, err.details() or code.name, _details(err))  # type: ignore[attr-defined]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def from_status(code: int, message: str, details: Any) -> MusterError:
    """The MusterError for a status sent as data (an operation's error on a stream that goes on).

    Args:
        code: the numeric gRPC status code.
        message: the status message.
        details: the ``google.protobuf.Any`` details (ErrorInfo, RetryInfo, BadRequest).
    """
    status = _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return _build(status, message or status.name, _parse(details))
