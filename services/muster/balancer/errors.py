"""The balancer's domain errors."""

from __future__ import annotations

from datetime import timedelta

import grpc

from muster.core.errors import FailedPreconditionError, InvalidArgumentError, MusterError, NotFoundError

DOMAIN = "muster.balancer"


class NoEligibleNodeError(MusterError):
    """No node can take the session; the metadata lists each node and why."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NO_ELIGIBLE_NODE"

    def __init__(self, excluded: list[tuple[int, str, str]], labels: dict[str, str]) -> None:
        if excluded:
            why = "; ".join(f"node {i} ({a}): {r}" for i, a, r in excluded[:20])
            more = f" and {len(excluded) - 20} more" if len(excluded) > 20 else ""
            message = f"no node can take the session: {why}{more}"
        else:
            message = "no node can take the session: the cluster has no nodes; start an agent"
        if labels:
            message += f" (labels required: {', '.join(f'{k}={v}' for k, v in sorted(labels.items()))})"
        super().__init__(
            message,
            domain=DOMAIN,
            excluded=",".join(f"{i}:{r}" for i, _, r in excluded[:100]),
        )


class ViewNotReadyError(MusterError):
    """The balancer has not loaded the cluster's nodes yet."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "STORE_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__("the balancer is still loading the cluster's nodes from the registry; retry shortly")
        self.retry_after = timedelta(milliseconds=100)


class SessionNotFoundError(NotFoundError):
    """No such session."""

    reason = "SESSION_NOT_FOUND"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"there is no session {session_id} (it ended, or never existed); `muster sessions` lists them",
            domain=DOMAIN,
            session_id=session_id,
        )


class ForgedSessionIdError(InvalidArgumentError):
    """The id's route signature does not verify."""

    reason = "FORGED_SESSION_ID"
    domain = DOMAIN

    def __init__(self, session_id: str) -> None:
        super().__init__(
            "session_id",
            f"{session_id!r} is not a session id this cluster issued (its route signature does not verify)",
            session_id=session_id[:200],
        )


class StrategyUnavailableError(FailedPreconditionError):
    """The custom strategy is not configured."""

    reason = "STRATEGY_UNAVAILABLE"

    def __init__(self) -> None:
        super().__init__(
            "the custom strategy needs the server's balancer_custom setting (MUSTER_BALANCER_CUSTOM: a "
            "module:function entry point or an executable)",
            domain=DOMAIN,
            strategy="custom",
        )
