"""The node view's kept bytes: a response joined from them parses as the message it stands for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.registry.models import Load
from muster.registry.view import NodeView, _Entry, raw_message, repeated, tag

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _node(node_id: int, state: int = node_pb2.Node.STATE_ONLINE) -> node_pb2.Node:
    msg = node_pb2.Node(id=node_id, address=f"n{node_id}.test:8787", host=f"n{node_id}.test", port=8787, state=state)
    msg.labels["app"] = "ide"
    msg.last_seen_time.FromDatetime(T0)
    msg.lease_expire_time.FromDatetime(T0 + timedelta(seconds=30))
    msg.lease_id = 10 + node_id
    return msg


def _parse(part: bytes) -> node_pb2.Node:
    return pb.ListNodesResponse.FromString(repeated(1, [part])).nodes[0]


def _view(nodes: list[node_pb2.Node]) -> NodeView:
    view = NodeView(None, None)  # type: ignore[arg-type]  # page() and parts() need neither
    for n in nodes:
        view._put(n)
    view.revision = 7
    return view


def test_a_list_response_joined_from_kept_parts_is_the_encoded_response() -> None:
    nodes = [_node(i) for i in range(1, 6)]
    view = _view([_node(i) for i in range(1, 6)])
    tail = pb.ListNodesResponse(revision=7, next_page_token="abc")
    joined = repeated(1, view.page((-1, 0), 10).parts) + tail.SerializeToString()
    expected = pb.ListNodesResponse(nodes=nodes, revision=7, next_page_token="abc")
    assert pb.ListNodesResponse.FromString(joined) == expected
    assert raw_message(joined).SerializeToString() == joined
    assert repeated(1, []) == b"" and tag(2) == b"\x12"


def test_pages_go_online_first_then_by_id_and_end_with_no_key() -> None:
    offline = node_pb2.Node.STATE_OFFLINE
    view = _view([_node(5), _node(2, offline), _node(9), _node(1), _node(7, offline)])
    seen, after = [], (-1, 0)
    while True:
        page = view.page(after, 2)
        seen += [_parse(p).id for p in page.parts]
        if page.next_key is None:
            break
        after = page.next_key
    assert seen == [1, 5, 9, 2, 7]
    assert view.page((1, 7), 2).parts == [] and view.page((1, 7), 2).next_key is None


def test_a_renewal_shows_in_the_next_encoding_and_never_moves_back() -> None:
    view = _view([_node(1)])
    entry: _Entry = view._nodes[1]
    before = entry.encoded()
    later = T0 + timedelta(seconds=5)
    entry.renew(later, later + timedelta(seconds=30), Load(1.0, 0.5, 0.25, 4, 3))
    after = _parse(entry.encoded())
    assert entry.encoded() != before
    assert after.last_seen_time.ToDatetime(tzinfo=UTC) == later and after.load.session_count == 3
    # An event carrying the row as it was before that renewal keeps the renewal.
    stale = _node(1)
    stale.mode = node_pb2.Node.MODE_DRAINING
    view._put(stale)
    kept = view.node(1)
    assert kept is not None and kept.mode == node_pb2.Node.MODE_DRAINING
    assert kept.last_seen_time.ToDatetime(tzinfo=UTC) == later and kept.load.session_count == 3
