"""The client's public surface and its half of the error table are pinned."""

from __future__ import annotations

import grpc
import pytest

import muster.client as client
from muster.client import errors
from muster.core.errors import REASONS


def test_public_names_are_pinned() -> None:
    assert sorted(client.__all__) == sorted(
        [
            "AddressNotFoundError",
            "Agent",
            "AgentConfig",
            "Firing",
            "HeldLock",
            "KeyFingerprints",
            "LeaseState",
            "LocalKeyFileError",
            "LockLease",
            "LockLostError",
            "LockMode",
            "Scheduler",
            "Candidate",
            "ClientConfig",
            "ClusterStatus",
            "Excluded",
            "NodeSessions",
            "Placement",
            "Session",
            "Cluster",
            "ClusterInfo",
            "ClusterView",
            "ConnectionState",
            "Event",
            "Health",
            "Heartbeat",
            "KeepAlive",
            "Lease",
            "Load",
            "MusterError",
            "Node",
            "NodeChange",
            "NodeList",
            "NodeLoad",
            "NodeMode",
            "NodeState",
            "NodeStatus",
            "Progress",
            "ResolvedAddress",
            "Resync",
            "SyncCluster",
            "SyncClusterView",
            "SyncWatch",
            "Watch",
            "apply_to_nodes",
            "errors",
            "resolve_node_address",
        ]
    )
    for name in client.__all__:
        assert hasattr(client, name), name


def test_every_exception_of_the_client_is_in_errors() -> None:
    """The exceptions a caller catches are all importable from muster.client.errors."""
    import inspect

    for name in client.__all__:
        obj = getattr(client, name)
        if inspect.isclass(obj) and issubclass(obj, Exception):
            assert obj.__module__ == "muster.client.errors", name
            assert name in errors.__all__, name


def test_every_reason_of_the_contract_has_a_client_exception() -> None:
    assert set(errors.BY_REASON) == set(REASONS)


class _FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, trailing=()) -> None:
        self._code, self._trailing = code, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"

    def trailing_metadata(self):
        return self._trailing


@pytest.mark.parametrize(("reason", "cls"), sorted(errors.BY_REASON.items()))
def test_server_statuses_map_to_the_exception_of_their_reason(reason: str, cls: type) -> None:
    from muster.core import errors as server_errors

    err = server_errors.MusterError.__new__(server_errors.MusterError)
    server_errors.MusterError.__init__(err, "m")
    err.reason = reason
    status = server_errors.to_status(err)
    got = errors.from_rpc_error(_FakeError(grpc.StatusCode.FAILED_PRECONDITION, status.trailing_metadata))
    assert type(got) is cls and got.reason == reason


def test_without_details_the_status_code_decides() -> None:
    assert type(errors.from_rpc_error(_FakeError(grpc.StatusCode.UNAVAILABLE))) is errors.UnavailableError
    assert type(errors.from_rpc_error(_FakeError(grpc.StatusCode.DATA_LOSS))) is errors.MusterError
