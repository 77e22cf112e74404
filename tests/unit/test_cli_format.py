"""What the operator commands print, from client values alone: statuses, JSON shapes, table, watch lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from muster.api.events.v1 import event_pb2
from muster.api.registry.v1 import node_pb2
from muster.cli.nodes import event_json, event_line, node_json, nodes_table, render, status_text
from muster.client import Event, Health, Load, Node, NodeMode, NodeState, Progress, Resync

SEEN = datetime(2026, 5, 1, 10, 0, 3, 250000, tzinfo=UTC)


def node(
    node_id: int = 3,
    host: str = "10.0.0.5",
    state: NodeState = NodeState.ONLINE,
    health: Health = Health.OK,
    mode: NodeMode = NodeMode.ACTIVE,
    reason: str = "JOINED",
    ipv4: str = "10.0.0.5",
    last_seen: datetime | None = SEEN,
) -> Node:
    return Node(
        id=node_id,
        address=f"{host}:8787",
        host=host,
        ipv4=ipv4,
        port=8787,
        state=state,
        state_reason=reason,
        mode=mode,
        health=health,
        last_seen_time=last_seen,
        load=Load(0.5, 0.25, 0.125, 4, 2),
        sessions=3,  # the balancer's (placed and started); the agent reported 2
        placed_sessions=1,
    )


def event(revision: int, kind: str, node_id: int, payload: object, with_node: Node | None = None) -> Event:
    package = "muster.api.events.v1" if kind == "OutageCredited" else "muster.api.registry.v1"
    return Event(revision, SEEN, f"{package}.{kind}", node_id, payload, with_node)  # type: ignore[arg-type]


def test_every_status_reads_as_words() -> None:
    assert {s.name: status_text(s.name) for s in NodeState} == {
        "STARTING": "Starting",
        "ONLINE": "Online",
        "OFFLINE": "Offline",
        "DELETING": "Deleting",
        "FAILED_TO_RESOLVE": "Failed to resolve",
        "INVALID_SECURE_COOKIE_KEY": "Invalid secure cookie key",
        "INVALID_KEY_PERMISSIONS": "Invalid key permissions",
        "ERROR_READING_LAUNCHER_KEY": "Error reading launcher key",
        "INVALID_LAUNCHER_KEY": "Invalid launcher key",
        "INVALID_LICENSE": "Invalid license",
    }
    assert status_text("MISSED_CHECK_IN") == "Missed check-in"


def test_node_json_keeps_the_stored_status_and_derives_health() -> None:
    missed = node_json(node(health=Health.MISSED_CHECK_IN))
    assert missed == {
        "id": 3,
        "address": "10.0.0.5:8787",
        "host": "10.0.0.5",
        "ipv4": "10.0.0.5",
        "port": 8787,
        "status": "ONLINE",
        "health": "MISSED_CHECK_IN",
        "mode": "ACTIVE",
        "reason": "JOINED",
        "last_seen": "2026-05-01T10:00:03.250000+00:00",
        "load": {"load1": 0.5, "load5": 0.25, "load15": 0.125, "cpu_count": 4},
        "sessions": 3,
        "placed_sessions": 1,
        "reported_sessions": 2,
        "message": "",
        "details": {},
    }
    gone = node_json(node(state=NodeState.OFFLINE, health=Health.NONE, reason="LEFT", last_seen=None))
    assert (gone["status"], gone["health"], gone["last_seen"]) == ("OFFLINE", "OK", None)


def test_the_table_is_plain_unwrapped_lines_when_not_on_a_terminal() -> None:
    long_host = "app-" + "x" * 200 + ".example"
    nodes = [
        node(1, host=long_host, health=Health.MISSED_CHECK_IN),
        node(12, host="b", ipv4="", state=NodeState.INVALID_LICENSE, health=Health.NONE, last_seen=None),
    ]
    text = render(nodes_table(nodes), terminal=False)
    lines = text.splitlines()
    assert len(lines) == 3 and "\x1b" not in text and all(line == line.rstrip() for line in lines)
    assert lines[0].split() == ["ID", "Host", "IPv4", "Port", "Status", "Mode", "Last", "seen", "Sessions"]
    assert long_host in lines[1] and "Missed check-in" in lines[1]
    assert lines[2].split("  ")[0] == "12" and "Invalid license" in lines[2]
    cells = [c.strip() for c in lines[2].split("  ") if c.strip()]
    assert cells == ["12", "b", "-", "8787", "Invalid license", "Active", "-", "3"]


def test_watch_lines_and_json_for_each_kind() -> None:
    joined = event(12, "NodeJoined", 3, node_pb2.NodeJoined(), node())
    assert event_line(joined) == "rev 12  NodeJoined        node 3  10.0.0.5:8787  Online  Active"
    assert event_json(joined)["node"] == node_json(node())
    assert {k: event_json(joined)[k] for k in ("type", "revision", "kind", "node_id", "status", "mode")} == {
        "type": "event",
        "revision": 12,
        "kind": "NodeJoined",
        "node_id": 3,
        "status": "ONLINE",
        "mode": "ACTIVE",
    }

    drained = event(13, "NodeModeChanged", 3, node_pb2.NodeModeChanged(node_id=3, mode=node_pb2.Node.MODE_DRAINING))
    assert event_line(drained) == "rev 13  NodeModeChanged   node 3  Draining"
    assert event_json(drained)["mode"] == "DRAINING"

    expired = node(state=NodeState.OFFLINE, health=Health.NONE, reason="LEASE_EXPIRED", mode=NodeMode.DRAINING)
    changed = event(
        14, "NodeStateChanged", 3, node_pb2.NodeStateChanged(previous_state=node_pb2.Node.STATE_ONLINE), expired
    )
    assert event_line(changed) == "rev 14  NodeStateChanged  node 3  10.0.0.5:8787  Offline (LEASE_EXPIRED)  Draining"
    assert event_json(changed)["previous_status"] == "ONLINE"

    suspected = event(15, "NodeSuspected", 3, node_pb2.NodeSuspected(), node(health=Health.MISSED_CHECK_IN))
    assert event_line(suspected).endswith("10.0.0.5:8787  Missed check-in  Active")

    deleted = event(16, "NodeDeleted", 3, node_pb2.NodeDeleted(node_id=3, address="10.0.0.5:8787"))
    assert event_line(deleted) == "rev 16  NodeDeleted       node 3  10.0.0.5:8787"

    reset = event(17, "ClusterReset", 0, node_pb2.ClusterReset(cluster=node_pb2.Cluster(epoch=4)))
    assert event_line(reset) == "rev 17  ClusterReset      epoch 4"
    assert event_json(reset)["node_id"] is None and event_json(reset)["epoch"] == 4

    outage = event_pb2.OutageCredited()
    outage.outage.FromTimedelta(timedelta(seconds=12.5))
    outage.credited.FromTimedelta(timedelta(seconds=10))
    credited = event(18, "OutageCredited", 0, outage)
    assert event_line(credited) == "rev 18  OutageCredited    outage 12.5s, credited 10.0s"

    snapshot = Resync(11, [node(), node(4)], 2, 1)
    assert event_line(snapshot) == "rev 11  Resync            2 nodes, epoch 2"
    assert event_json(snapshot) == {
        "type": "resync",
        "revision": 11,
        "epoch": 2,
        "active_key_version": 1,
        "nodes": [node_json(node()), node_json(node(4))],
    }

    mark = Progress(20, 21)
    assert event_line(mark) == "rev 20  Progress          through 20, head 21"
    assert event_json(mark) == {"type": "progress", "revision": 20, "through_revision": 20, "head_revision": 21}
