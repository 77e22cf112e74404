"""The contract: generated code is fresh, and the error table is pinned."""

from __future__ import annotations

import subprocess
import sys

import grpc
from harness import ROOT

from muster.api.errors.v1 import error_reason_pb2
from muster.core import errors
from muster.registry import errors as registry_errors


def test_generated_code_matches_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _all_error_classes() -> list[type[errors.MusterError]]:
    seen, todo = [], [errors.MusterError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


def test_error_reasons_are_pinned() -> None:
    # The client maps errors by these names; renaming one breaks every deployed client.
    assert sorted(errors.REASONS) == sorted(
        [
            "INVALID_FIELD",
            "NODE_NOT_FOUND",
            "STALE_LEASE",
            "LEASE_EXPIRED",
            "NODE_LIMIT_REACHED",
            "NODE_HAS_SESSIONS",
            "NODE_STATE",
            "STORE_UNAVAILABLE",
            "SLOW_CONSUMER",
            "SHUTTING_DOWN",
            "INTERNAL",
            "FUTURE_REVISION",
            "LOCK_HELD",
            "NODE_DELETING",
            "NO_ELIGIBLE_NODE",
            "SESSION_NOT_FOUND",
            "FORGED_SESSION_ID",
            "STRATEGY_UNAVAILABLE",
            "OPERATION_WITHDRAWN",
            "LOCK_NOT_HELD",
            "STALE_TOKEN",
            "FIRING_CLAIMED",
            "FIRING_DONE",
            "MISFIRED",
            "MISSING_TOKEN",
            "BAD_TOKEN",
            "ADMIN_REQUIRED",
            "INVALID_SECURE_COOKIE_KEY",
            "INVALID_LAUNCHER_KEY",
            "ERROR_READING_LAUNCHER_KEY",
            "INVALID_KEY_PERMISSIONS",
            "KEYS_NOT_DEFINED",
            "KEY_VERSION_NOT_FOUND",
            "KEY_ROTATION_PENDING",
            "MASTER_KEY_MISMATCH",
        ]
    )
    assert error_reason_pb2.ErrorReason.Value("ERROR_REASON_NODE_NOT_FOUND") == 2


def test_every_domain_error_has_a_known_reason_and_fitting_code() -> None:
    _ = registry_errors  # imported so that its classes are registered as subclasses
    table = {cls.__name__: (cls.code, cls.reason) for cls in _all_error_classes()}
    for name, (_code, reason) in table.items():
        assert reason in errors.REASONS, name
    assert table["NodeNotFoundError"] == (grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND")
    assert table["InvalidArgumentError"] == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert table["StaleLeaseError"] == (grpc.StatusCode.FAILED_PRECONDITION, "STALE_LEASE")
    assert table["StoreUnavailableError"] == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
    assert table["SlowConsumerError"] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "SLOW_CONSUMER")


def test_status_carries_error_info_and_field_violation() -> None:
    from google.rpc import error_details_pb2

    st = errors.to_status(errors.InvalidArgumentError("port", "must be between 1 and 65535"))
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT
    from google.rpc import status_pb2

    ((key, value),) = [(k, v) for k, v in st.trailing_metadata if k == "grpc-status-details-bin"]
    details = status_pb2.Status.FromString(value).details
    info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert details[0].Unpack(info) and details[1].Unpack(bad)
    assert info.reason == "INVALID_FIELD" and info.metadata["field"] == "port"
    assert bad.field_violations[0].field == "port"


def test_unexpected_exceptions_never_leak_their_text() -> None:
    err = errors.translate(ValueError("secret-key-material"))
    assert err.code == grpc.StatusCode.INTERNAL
    assert "secret" not in str(err)


def test_a_connection_broken_by_a_database_restart_is_unavailable_not_internal() -> None:
    import asyncpg

    # What asyncpg raised on a pooled connection when PostgreSQL restarted mid-statement (chaos run).
    broken = asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    for exc in (broken, asyncpg.ConnectionDoesNotExistError("closed"), ConnectionRefusedError()):
        err = errors.translate(exc)
        assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE"), exc
