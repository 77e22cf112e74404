"""The lock service's domain errors."""

from __future__ import annotations

from muster.core.errors import AbortedError, FailedPreconditionError

DOMAIN = "muster.locks"


class LockHeldError(AbortedError):
    """The lock is held by another."""

    reason = "LOCK_HELD"

    def __init__(self, name: str, holder: str, token: int) -> None:
        super().__init__(
            f"lock {name} is held by {holder} (token {token}); wait for it or try later",
            domain=DOMAIN,
            lock=name,
            holder=holder,
            token=token,
        )


class LockNotHeldError(FailedPreconditionError):
    """The hold is gone."""

    reason = "LOCK_NOT_HELD"

    def __init__(self, lease_id: int) -> None:
        super().__init__(
            f"lease {lease_id} is not held (expired, broken or released); acquire the lock again",
            domain=DOMAIN,
            lease=lease_id,
        )


class FiringClaimedError(AbortedError):
    """Another claimer holds the firing."""

    reason = "FIRING_CLAIMED"

    def __init__(self, job: str, holder: str, token: int) -> None:
        super().__init__(
            f"job {job} at this time is claimed by {holder} (token {token})",
            domain=DOMAIN,
            job=job,
            holder=holder,
            token=token,
        )


class FiringDoneError(FailedPreconditionError):
    """The firing already ran, failed, expired without recovery, or was skipped."""

    reason = "FIRING_DONE"

    def __init__(self, job: str, state: str, holder: str) -> None:
        super().__init__(
            f"job {job} at this time is already {state} (by {holder})",
            domain=DOMAIN,
            job=job,
            state=state,
            holder=holder,
        )


class MisfiredError(FailedPreconditionError):
    """Too late for the firing: skipped."""

    reason = "MISFIRED"

    def __init__(self, job: str, late_seconds: float) -> None:
        super().__init__(
            f"job {job} fired {late_seconds:.1f}s late, beyond its misfire threshold: skipped",
            domain=DOMAIN,
            job=job,
            late_seconds=f"{late_seconds:.3f}",
        )


class StaleTokenError(AbortedError):
    """A completion or write with a token that is no longer the firing's or lock's newest."""

    reason = "STALE_TOKEN"

    def __init__(self, what: str, token: int, current: int) -> None:
        super().__init__(
            f"token {token} of {what} is stale (current {current})",
            domain=DOMAIN,
            lock=what,
            token=token,
            fence=current,
        )
