"""The registry's node view counts a node's sessions from the balancer's events: placed and started
alike, an adopted session once, a move from one node to the other, an end by the state it had."""

from __future__ import annotations

from google.protobuf.message import Message

from muster.api.balancer.v1 import balancer_pb2
from muster.api.events.v1 import event_pb2
from muster.core.events import StoredEvent
from muster.registry.view import NodeView

PLACED, STARTED = balancer_pb2.Session.STATE_PLACED, balancer_pb2.Session.STATE_STARTED


def ev(revision: int, payload: Message) -> StoredEvent:
    msg = event_pb2.Event(revision=revision, kind=payload.DESCRIPTOR.full_name)
    msg.payload.Pack(payload)
    return StoredEvent(revision, 0, payload.DESCRIPTOR.full_name, msg)


def session(sid: str, node_id: int, state: int) -> balancer_pb2.Session:
    return balancer_pb2.Session(id=sid, node_id=node_id, state=state)  # type: ignore[arg-type]


def test_every_session_event_moves_the_counts_once() -> None:
    counts: dict[int, list[int]] = {}
    events = [
        balancer_pb2.SessionPlaced(session=session("a", 1, PLACED)),
        balancer_pb2.SessionPlaced(session=session("b", 1, PLACED)),
        balancer_pb2.SessionPlaced(session=session("c", 2, PLACED)),
        # a placed one started where it was placed: still one session, no longer placed
        balancer_pb2.SessionStarted(session=session("a", 1, STARTED), previous_node_id=1, previous_state=PLACED),
        # an adopted one (the balancer never placed it): one more, once
        balancer_pb2.SessionStarted(session=session("x", 1, STARTED)),
        # placed on node 2, reported started on node 3
        balancer_pb2.SessionStarted(session=session("c", 3, STARTED), previous_node_id=2, previous_state=PLACED),
    ]
    for i, payload in enumerate(events, 1):
        NodeView._count(counts, ev(i, payload))
    assert counts == {1: [3, 1], 3: [1, 0]}  # node 2 has none left: no entry

    # node 1 fails over: its sessions move to node 3, each once, keeping their state
    NodeView._count(
        counts, ev(7, balancer_pb2.SessionMoved(session=session("a2", 3, STARTED), previous_id="a", previous_node_id=1))
    )
    NodeView._count(
        counts, ev(8, balancer_pb2.SessionMoved(session=session("b2", 3, PLACED), previous_id="b", previous_node_id=1))
    )
    assert counts == {1: [1, 0], 3: [3, 1]}
    NodeView._count(
        counts, ev(9, balancer_pb2.SessionEnded(session_id="b2", node_id=3, reason="EXPIRED", state=PLACED))
    )
    NodeView._count(counts, ev(10, balancer_pb2.SessionEnded(session_id="x", node_id=1, state=STARTED)))
    assert counts == {3: [2, 0]}
