"""The client's one retry policy: the table of transient failures and the backoff. No I/O."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from muster.client import _retry, errors
from muster.client.errors import is_transient
from muster.core.errors import REASONS

C = grpc.StatusCode
MS = timedelta(milliseconds=1)


class _FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, *details: object) -> None:
        self._code = code
        packed = []
        for d in details:
            a = any_pb2.Any()
            a.Pack(d)
            packed.append(a)
        status = status_pb2.Status(code=code.value[0], message="m", details=packed)
        self._trailing = (("grpc-status-details-bin", status.SerializeToString()),) if details else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "m"

    def trailing_metadata(self):
        return self._trailing


def _error(code: grpc.StatusCode, reason: str = "", retry_after: timedelta | None = None) -> errors.MusterError:
    details: list[object] = []
    if reason:
        details.append(error_details_pb2.ErrorInfo(reason=reason, domain="muster.test"))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(retry_after)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return errors.from_rpc_error(_FakeError(code, *details))


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason", "transient"),
    [
        # A reason decides first.
        (C.UNAVAILABLE, "STORE_UNAVAILABLE", True),
        (C.UNAVAILABLE, "SHUTTING_DOWN", True),
        (C.RESOURCE_EXHAUSTED, "SLOW_CONSUMER", True),
        (C.ABORTED, "NODE_DELETING", True),
        (C.FAILED_PRECONDITION, "NO_ELIGIBLE_NODE", False),
        (C.UNAVAILABLE, "NO_ELIGIBLE_NODE", False),  # what servers before the fix sent
        (C.INTERNAL, "INTERNAL", False),  # a handler's bug is not an outage
        (C.ABORTED, "LOCK_HELD", False),
        (C.FAILED_PRECONDITION, "LEASE_EXPIRED", False),
        (C.FAILED_PRECONDITION, "STALE_LEASE", False),
        (C.NOT_FOUND, "NODE_NOT_FOUND", False),
        (C.INVALID_ARGUMENT, "INVALID_FIELD", False),
        (C.UNAUTHENTICATED, "BAD_TOKEN", False),
        (C.PERMISSION_DENIED, "ADMIN_REQUIRED", False),
        # Otherwise the code.
        (C.UNAVAILABLE, "", True),
        (C.CANCELLED, "", True),
        (C.RESOURCE_EXHAUSTED, "", True),
        (C.DEADLINE_EXCEEDED, "", True),
        (C.INTERNAL, "", True),  # the transport's: RST_STREAM from a replica that died
        (C.UNKNOWN, "", True),  # the transport's: "Stream removed"
        (C.FAILED_PRECONDITION, "", False),
        (C.ABORTED, "", False),
        (C.INVALID_ARGUMENT, "", False),
        (C.NOT_FOUND, "", False),
        (C.UNIMPLEMENTED, "", False),
        (C.UNAUTHENTICATED, "", False),
        (C.PERMISSION_DENIED, "", False),
        (C.DATA_LOSS, "", False),
        (C.OK, "", False),
    ],
)
def test_the_table_says_which_failures_are_transient(code: grpc.StatusCode, reason: str, transient: bool) -> None:
    assert is_transient(code, reason) is transient
    # The error carries the answer, whichever class the reason picked.
    assert _error(code, reason).transient is transient


def test_every_reason_of_the_contract_is_judged_by_the_table_or_its_code() -> None:
    # A reason the table names must exist; every other reason is judged by the code it comes with.
    assert set(errors.TRANSIENT_REASONS) <= set(REASONS)


def test_an_error_a_reason_names_as_transient_is_transient_whatever_its_code() -> None:
    for reason, transient in errors.TRANSIENT_REASONS.items():
        for code in C:
            assert is_transient(code, reason) is transient, (reason, code)


def test_no_eligible_node_is_a_verdict_not_an_unavailable_server() -> None:
    err = _error(C.FAILED_PRECONDITION, "NO_ELIGIBLE_NODE")
    assert isinstance(err, errors.NoEligibleNodeError)
    assert isinstance(err, errors.FailedPreconditionError)
    assert not isinstance(err, errors.UnavailableError)
    assert not err.transient and not _retry.call_again(err) and not _retry.wait_out(err)


def test_a_call_does_not_repeat_its_own_deadline_but_a_loop_waits_it_out() -> None:
    late = _error(C.DEADLINE_EXCEEDED)
    assert late.transient and not _retry.call_again(late) and _retry.wait_out(late)
    down = _error(C.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert _retry.call_again(down) and _retry.wait_out(down)


def test_long_running_loops_also_wait_out_a_server_fault_but_not_a_verdict() -> None:
    bug = _error(C.INTERNAL, "INTERNAL")
    assert not bug.transient and not _retry.call_again(bug) and _retry.wait_out(bug)
    for verdict in (_error(C.FAILED_PRECONDITION, "LEASE_EXPIRED"), _error(C.ABORTED, "LOCK_HELD")):
        assert not _retry.wait_out(verdict)


def test_a_status_sent_as_data_on_a_stream_carries_the_same_answer() -> None:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN"))
    assert errors.from_status(C.UNAVAILABLE.value[0], "m", [info]).transient
    info.Pack(error_details_pb2.ErrorInfo(reason="LOCK_NOT_HELD"))
    assert not errors.from_status(C.FAILED_PRECONDITION.value[0], "m", [info]).transient


# -- the backoff -------------------------------------------------------------------------------


def test_backoff_grows_exponentially_within_equal_jitter_bounds() -> None:
    for attempt in range(12):
        cap = min(5.0, 0.1 * 2**attempt)
        for _ in range(200):
            d = _retry.backoff(attempt, initial=100 * MS, maximum=timedelta(seconds=5))
            assert cap / 2 <= d <= cap, (attempt, d)


def test_backoff_is_jittered_so_clients_that_failed_together_spread_out() -> None:
    delays = {_retry.backoff(3, initial=100 * MS, maximum=timedelta(seconds=5)) for _ in range(50)}
    assert len(delays) > 40


def test_backoff_is_capped_and_never_overflows_in_a_long_outage() -> None:
    for attempt in (20, 1023, 1024, 5000, 10**6):
        d = _retry.backoff(attempt, initial=100 * MS, maximum=timedelta(seconds=2))
        assert 1.0 <= d <= 2.0


def test_a_negative_attempt_counts_as_the_first() -> None:
    assert 0.05 <= _retry.backoff(-3, initial=100 * MS, maximum=timedelta(seconds=5)) <= 0.1


def test_backoff_honours_the_servers_retry_delay_beyond_its_own_cap() -> None:
    for attempt in (0, 5, 50):
        for _ in range(100):
            d = _retry.backoff(attempt, initial=100 * MS, maximum=timedelta(seconds=1), hint=timedelta(seconds=3))
            assert 3.0 <= d <= 3.6  # at least the hint, plus up to a fifth so a herd spreads


def test_a_short_retry_delay_is_honoured_even_on_a_late_attempt() -> None:
    # The server knows when it can take the call: its hint replaces the exponential cap.
    d = _retry.backoff(10, initial=100 * MS, maximum=timedelta(seconds=5), hint=100 * MS)
    assert 0.1 <= d <= 0.12


def test_a_bogus_retry_delay_is_capped() -> None:
    d = _retry.backoff(0, initial=100 * MS, maximum=timedelta(seconds=5), hint=timedelta(days=1))
    sec = _retry.MAX_HINT.total_seconds()
    assert sec <= d <= sec * 1.2


def test_a_zero_retry_delay_falls_back_to_the_exponential_backoff() -> None:
    d = _retry.backoff(0, initial=100 * MS, maximum=timedelta(seconds=5), hint=timedelta(0))
    assert 0.05 <= d <= 0.1


def test_the_retry_delay_the_server_sent_reaches_the_backoff() -> None:
    err = _error(C.RESOURCE_EXHAUSTED, "SLOW_CONSUMER", retry_after=timedelta(milliseconds=1500))
    assert err.retry_after == timedelta(milliseconds=1500)
    d = _retry.backoff(0, initial=100 * MS, maximum=timedelta(seconds=5), hint=err.retry_after)
    assert 1.5 <= d <= 1.8


def test_the_configured_backoff_is_the_same_backoff() -> None:
    from muster.client._channel import backoff
    from muster.client._config import ClientConfig

    config = ClientConfig(backoff_initial=200 * MS, backoff_max=timedelta(seconds=1), token=None)
    for attempt in range(6):
        cap = min(1.0, 0.2 * 2**attempt)
        assert cap / 2 <= backoff(attempt, config) <= cap
    assert 2.0 <= backoff(0, config, timedelta(seconds=2)) <= 2.4


def test_a_watch_resumes_after_a_few_server_faults_in_a_row_then_raises() -> None:
    import asyncio

    from muster.client._config import ClientConfig
    from muster.client._watch import Watch

    class _Call:
        def __init__(self, code: grpc.StatusCode, reason: str) -> None:
            self._exc = _aio_error(code, reason)

        async def read(self):
            raise self._exc

        def cancel(self) -> None:
            pass

    opened: list[str] = []

    class _Stub:
        def __init__(self, reason: str, code: grpc.StatusCode) -> None:
            self.reason, self.code = reason, code

        def WatchEvents(self, request):  # noqa: N802 - the gRPC method's name
            opened.append(self.reason)
            return _Call(self.code, self.reason)

    class _Endpoint:
        def __init__(self, stub: _Stub) -> None:
            self._stub = stub

        def stub(self) -> _Stub:
            return self._stub

        def fail_over(self) -> None:
            pass

    class _Cluster:
        config = ClientConfig(max_attempts=3, backoff_initial=MS, backoff_max=MS, token=None)

        def __init__(self, stub: _Stub) -> None:
            self._endpoint = _Endpoint(stub)

        def _registry_endpoint(self) -> _Endpoint:
            return self._endpoint

    async def run(code: grpc.StatusCode, reason: str) -> BaseException:
        opened.clear()
        watch = Watch(_Cluster(_Stub(reason, code)))  # type: ignore[arg-type]
        try:
            await watch.__anext__()
        except errors.MusterError as exc:
            return exc
        raise AssertionError("the watch did not raise")

    bug = asyncio.run(run(C.INTERNAL, "INTERNAL"))
    assert isinstance(bug, errors.InternalError) and len(opened) == 3  # max_attempts streams, then raised
    verdict = asyncio.run(run(C.FAILED_PRECONDITION, "FUTURE_REVISION"))
    assert isinstance(verdict, errors.FutureRevisionError) and len(opened) == 1  # raised at once


def _aio_error(code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="muster.test"))
    status = status_pb2.Status(code=code.value[0], message="m", details=[info])
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="m")
