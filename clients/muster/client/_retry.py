"""The client's one retry policy: which failures are worth another attempt, and how long to wait.

Whether a failure is transient is the error's own answer (``MusterError.transient``, from the one
table in :mod:`muster.client.errors`). How long to wait is :func:`backoff`: jittered exponential,
capped, and never shorter than the server's ``google.rpc.RetryInfo`` delay. Every retry of the client
uses both: unary calls and single heartbeats (:func:`call_again`, up to ``max_attempts``), the lock
Session stream, watches and lock renewal (for as long as they run), and the node agent and the job
scheduler (:func:`wait_out`, for as long as they run).
"""

from __future__ import annotations

import random
from datetime import timedelta

import grpc

from muster.client.errors import InternalError, MusterError

# A server's hint is honoured up to this long: a bogus delay must not park a client for hours.
MAX_HINT = timedelta(minutes=1)
# 2**32 times any initial delay is beyond any cap; the exponent stops there so it never overflows.
_MAX_EXPONENT = 32


def backoff(
    attempt: int,
    *,
    initial: timedelta,
    maximum: timedelta,
    hint: timedelta | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 0).

    Without a hint: "equal jitter" exponential backoff, uniform in [cap/2, cap] where
    ``cap = min(maximum, initial * 2**attempt)``, so clients that failed together spread out.
    With the server's retry delay (``RetryInfo``): at least that delay (up to :data:`MAX_HINT`),
    plus up to a fifth more, so a herd cut at once does not return at once; the hint replaces the
    exponential cap, since the server knows when it can take the call.

    Args:
        attempt: how many attempts failed before this wait, minus one (0 after the first failure).
        initial: the first cap.
        maximum: the largest cap without a hint.
        hint: the server's retry delay, if it sent one.

    Returns:
        The delay in seconds.
    """
    if hint is not None and hint > timedelta(0):
        delay = min(hint, MAX_HINT).total_seconds()
        return delay * random.uniform(1.0, 1.2)
    exponent = min(max(attempt, 0), _MAX_EXPONENT)
    cap = min(maximum.total_seconds(), initial.total_seconds() * 2**exponent)
    return random.uniform(cap / 2, cap)


def call_again(err: MusterError) -> bool:
    """Whether one call (a unary call, one heartbeat on the KeepAlive stream) is attempted again.

    A transient failure is, except the call's own deadline: that is the caller's budget for the
    call, spent (loops that outlive their calls, such as the agent and watches, do try again).
    """
    return err.transient and err.code is not grpc.StatusCode.DEADLINE_EXCEEDED


def wait_out(err: MusterError) -> bool:
    """Whether a loop that runs as long as its process (the node agent, the job scheduler) waits and
    tries again: on a transient failure, and on a server fault (INTERNAL) too, since a node must not
    leave the cluster, nor a firing be dropped, because one replica failed one call. A verdict (a
    refusal, a conflict, a missing thing) ends the loop's attempt.
    """
    return err.transient or isinstance(err, InternalError)
