"""Bad input to every RPC gets INVALID_ARGUMENT naming the field, and changes nothing."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from harness import ServerProcess, error_reason, registry

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb

BIG = "x" * (1024 * 1024)

CASES = [
    ("JoinNode", pb.JoinNodeRequest(host="", port=8787), "host"),
    ("JoinNode", pb.JoinNodeRequest(host="bad host!", port=8787), "host"),
    ("JoinNode", pb.JoinNodeRequest(host="a" * 300, port=8787), "host"),
    ("JoinNode", pb.JoinNodeRequest(host="-lead.example", port=8787), "host"),
    ("JoinNode", pb.JoinNodeRequest(host="999.1.1.1", port=8787), "host"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=0), "port"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=70000), "port"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=-1), "port"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, ipv4="300.1.1.1"), "ipv4"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, labels={"k": BIG}), "labels"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, labels={"bad key": "v"}), "labels"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, request_id="r" * 200), "request_id"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, load=node_pb2.Load(load1=-1)), "load.load1"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, load=node_pb2.Load(load5=float("nan"))), "load.load5"),
    ("JoinNode", pb.JoinNodeRequest(host="h", port=1, load=node_pb2.Load(cpu_count=-4)), "load.cpu_count"),
    ("Heartbeat", pb.HeartbeatRequest(node_id=-1, lease_id=1), "node_id"),
    ("Heartbeat", pb.HeartbeatRequest(node_id=1, lease_id=0), "lease_id"),
    ("Heartbeat", pb.HeartbeatRequest(node_id=1, lease_id=1, load=node_pb2.Load(load15=1e300)), "load.load15"),
    (
        "Heartbeat",
        pb.HeartbeatRequest(node_id=1, lease_id=1, load=node_pb2.Load(session_count=-2)),
        "load.session_count",
    ),
    ("LeaveNode", pb.LeaveNodeRequest(node_id=0, lease_id=1), "node_id"),
    ("LeaveNode", pb.LeaveNodeRequest(node_id=1, lease_id=-5), "lease_id"),
    ("GetNode", pb.GetNodeRequest(node_id=-7), "node_id"),
    ("ListNodes", pb.ListNodesRequest(page_size=10_001), "page_size"),
    ("ListNodes", pb.ListNodesRequest(page_size=-1), "page_size"),
    ("ListNodes", pb.ListNodesRequest(page_token="not-a-token"), "page_token"),
    ("DeleteNode", pb.DeleteNodeRequest(node_id=-1), "node_id"),
    ("SetNodeMode", pb.SetNodeModeRequest(node_id=1, mode=0), "mode"),
    ("SetNodeMode", pb.SetNodeModeRequest(node_id=1, mode=99), "mode"),
    ("SetNodeMode", pb.SetNodeModeRequest(node_id=0, mode=1), "node_id"),
    ("GetNodeStatus", pb.GetNodeStatusRequest(node_id=0), "node_id"),
    ("ListNodeLoads", pb.ListNodeLoadsRequest(page_size=20_000), "page_size"),
    ("ListNodeLoads", pb.ListNodeLoadsRequest(page_token="e30="), "page_token"),
]

STREAM_CASES = [
    (pb.WatchEventsRequest(start_revision=-1), "start_revision"),
    (pb.WatchEventsRequest(kinds=["not a kind"]), "kinds"),
    (pb.WatchEventsRequest(node_ids=[-3]), "node_ids"),
    (pb.WatchEventsRequest(progress_interval=duration_pb2.Duration(seconds=3600)), "progress_interval"),
    (pb.WatchEventsRequest(progress_interval=duration_pb2.Duration(nanos=1000)), "progress_interval"),
]


@pytest.fixture
async def joined(registry_server: ServerProcess):
    async with registry(registry_server.address) as stub:
        r = await stub.JoinNode(pb.JoinNodeRequest(host="valid.example", port=8787))
        yield stub, r.node


async def _state(stub) -> tuple:
    cluster = await stub.GetCluster(pb.GetClusterRequest())
    nodes = await stub.ListNodes(pb.ListNodesRequest())
    return cluster.head_revision, [(n.id, n.state, n.mode, n.lease_id, dict(n.labels)) for n in nodes.nodes]


@pytest.mark.parametrize(
    ("method", "request_", "field"), CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)]
)
async def test_bad_input_is_invalid_argument_naming_the_field(joined, method, request_, field) -> None:
    stub, node = joined
    before = await _state(stub)
    # Point id-carrying requests at the real node, so that only the bad field is wrong.
    if hasattr(request_, "node_id") and request_.node_id == 1:
        request_.node_id = node.id
    if hasattr(request_, "lease_id") and request_.lease_id == 1:
        request_.lease_id = node.lease_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await getattr(stub, method)(request_)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    reason, metadata = error_reason(info.value)
    assert reason == "INVALID_FIELD" and metadata["field"] == field
    assert field in info.value.details()
    assert await _state(stub) == before


@pytest.mark.parametrize(("request_", "field"), STREAM_CASES, ids=[c[1] + str(i) for i, c in enumerate(STREAM_CASES)])
async def test_bad_watch_requests_are_invalid_argument(joined, request_, field) -> None:
    stub, _ = joined
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchEvents(request_):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value)[1]["field"] == field


async def test_keepalive_with_a_bad_heartbeat_names_the_nested_field(joined) -> None:
    stub, node = joined

    async def beats():
        yield pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=node.id, lease_id=0))

    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.KeepAlive(beats()):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value)[1]["field"] == "heartbeat.lease_id"


async def test_watch_from_a_future_revision_is_refused(joined) -> None:
    stub, _ = joined
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.WatchEvents(pb.WatchEventsRequest(start_revision=10_000)):
            pass
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reason, metadata = error_reason(info.value)
    # The head is the numbered head: the join's event may not be numbered yet.
    assert reason == "FUTURE_REVISION" and metadata["start_revision"] == "10000"
    assert metadata["head_revision"] in {"0", "1"}
