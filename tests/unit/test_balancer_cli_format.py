"""What the balancer's commands print, from client values alone: loads, the status view, placements, routes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from muster.cli.balancer import (
    load_text,
    parse_labels,
    placement_json,
    placement_lines,
    placement_table,
    render,
    route_line,
    score_text,
    session_line,
    session_row,
    status_json,
    status_lines,
)
from muster.client import Candidate, ClusterStatus, Excluded, NodeSessions, Placement, Session

PLACED_AT = datetime(2026, 5, 1, 10, 0, 3, tzinfo=UTC)


def session(sid: str = "ab.n1", user: str = "alice", state: str = "STARTED", pid: int = 12108) -> Session:
    return Session(sid, 1, "10.0.0.1:8787", "n1", user, "", state, pid, PLACED_AT, None)


def node(
    node_id: int,
    loads: tuple[float, float, float] = (0.0, 0.0, 0.0),
    *,
    unreachable: bool = False,
    draining: bool = False,
    offline: bool = False,
    sessions: tuple[Session, ...] = (),
) -> NodeSessions:
    return NodeSessions(
        node_id,
        f"10.0.0.{node_id}:8787",
        f"n{node_id}",
        "OFFLINE" if offline else "ONLINE",
        unreachable,
        draining,
        offline,
        *loads,
        2,
        sessions,
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.45, "0.45"),
        (0.0, "0"),
        (-0.0, "0"),
        (0.001, "0"),
        (0.5, "0.5"),
        (1.0, "1"),
        (10.0, "10"),
        (0.666, "0.67"),
        (0.03, "0.03"),
        (12.345678, "12.35"),
        (100.004, "100"),
    ],
)
def test_load_text_rounds_to_two_decimals_without_trailing_zeros(value: float, text: str) -> None:
    assert load_text(value) == text


def test_score_text_keeps_three_decimals() -> None:
    assert score_text(2.0) == "2"
    assert score_text(0.123456) == "0.123"
    assert score_text(0.5) == "0.5"


def test_status_lines_match_the_reference_view() -> None:
    status = ClusterStatus(
        (
            node(1, (0.45, 0.66, 0.32), sessions=(session(), session("cd.n1", "bob", "PLACED", 0))),
            node(3, unreachable=True),
            node(4, (0.03, 0.38, 0.24), draining=True),
            node(5, offline=True),
        ),
        "sessions",
        None,
    )
    assert status_lines(status) == [
        "10.0.0.1:8787 Load: 0.45, 0.66, 0.32",
        "  12108 - alice",
        "  placed - bob",
        "10.0.0.3:8787 (unreachable) Load: 0, 0, 0",
        "10.0.0.4:8787 (draining) Load: 0.03, 0.38, 0.24",
        "10.0.0.5:8787 (offline) Load: 0, 0, 0",
    ]


def test_a_node_marked_twice_shows_both_marks() -> None:
    status = ClusterStatus((node(2, unreachable=True, draining=True),), "sessions", None)
    assert status_lines(status) == ["10.0.0.2:8787 (unreachable) (draining) Load: 0, 0, 0"]


def test_a_started_session_without_a_pid_says_started() -> None:
    assert session_line(session(pid=0)) == "  started - alice"


def test_status_json_shape() -> None:
    doc = status_json(ClusterStatus((node(1, (0.5, 0.25, 0.0), sessions=(session(),)),), "user-hash", None))
    assert doc == {
        "strategy": "user-hash",
        "nodes": [
            {
                "node_id": 1,
                "address": "10.0.0.1:8787",
                "route": "n1",
                "state": "ONLINE",
                "unreachable": False,
                "draining": False,
                "offline": False,
                "load": [0.5, 0.25, 0.0],
                "cpu_count": 2,
                "sessions": [{"id": "ab.n1", "pid": 12108, "user": "alice", "kind": "", "state": "STARTED"}],
            }
        ],
    }


def placement() -> Placement:
    return Placement(
        session("ef.n1", "carol", "PLACED", 0),
        "sessions",
        (
            Candidate(1, "10.0.0.1:8787", 0.0, 0, 0.5, 2, True),
            Candidate(2, "10.0.0.2:8787", 3.0, 3, 0.1, 2, False),
        ),
        (Excluded(4, "10.0.0.4:8787", "draining"), Excluded(3, "10.0.0.3:8787", "missed_check_in")),
    )


def test_placement_json_shape() -> None:
    assert placement_json(placement(), dry_run=False) == {
        "session_id": "ef.n1",
        "node": {"id": 1, "address": "10.0.0.1:8787"},
        "strategy": "sessions",
        "candidates": [{"node_id": 1, "score": 0.0}, {"node_id": 2, "score": 3.0}],
        "excluded": [{"node_id": 4, "reason": "draining"}, {"node_id": 3, "reason": "missed_check_in"}],
        "fallback": "",
        "dry_run": False,
    }


def test_placement_summary_and_table() -> None:
    assert placement_lines(placement(), dry_run=False) == ["Session ef.n1 placed on node 1 (10.0.0.1:8787) by sessions"]
    assert placement_lines(placement(), dry_run=True) == [
        "Session ef.n1 would be placed on node 1 (10.0.0.1:8787) by sessions"
    ]
    lines = [line.split() for line in render(placement_table(placement()), terminal=False).splitlines()]
    assert lines == [
        ["Node", "Address", "Score", "Sessions", "Chosen"],
        ["1", "10.0.0.1:8787", "0", "0", "*"],
        ["2", "10.0.0.2:8787", "3", "3"],
        ["4", "10.0.0.4:8787", "-", "-", "excluded:", "draining"],
        ["3", "10.0.0.3:8787", "-", "-", "excluded:", "missed", "check-in"],
    ]


def test_route_line_says_where_and_whether_it_moved() -> None:
    s = session("ab.n1")
    assert route_line("ab.n1", s, False) == "ab.n1 -> node 1 (10.0.0.1:8787)"
    assert route_line("zz.n2", s, True) == "ab.n1 -> node 1 (10.0.0.1:8787) (moved from zz.n2)"


def test_session_row_fills_empty_cells() -> None:
    row = session_row(session("cd.n1", "bob", "PLACED", 0))
    assert row[:6] == ("cd.n1", "1", "bob", "-", "Placed", "-")


def test_parse_labels() -> None:
    assert parse_labels(["zone=a", "gpu=", "k=v=w"]) == {"zone": "a", "gpu": "", "k": "v=w"}
    for bad in (["zone"], ["=a"]):
        with pytest.raises(ValueError, match="not key=value"):
            parse_labels(bad)
