"""The registry's domain: nodes, their states and modes, the cluster. No I/O."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class State(enum.IntEnum):
    """A node's stored state (numbers as in ``Node.State``)."""

    STARTING = 1
    ONLINE = 2
    OFFLINE = 3
    DELETING = 4
    FAILED_TO_RESOLVE = 5
    INVALID_SECURE_COOKIE_KEY = 6
    INVALID_KEY_PERMISSIONS = 7
    ERROR_READING_LAUNCHER_KEY = 8
    INVALID_LAUNCHER_KEY = 9
    INVALID_LICENSE = 10


class Mode(enum.IntEnum):
    """ACTIVE takes new sessions; DRAINING keeps its sessions but gets no new ones."""

    ACTIVE = 1
    DRAINING = 2


class Health(enum.IntEnum):
    """Derived liveness of an ONLINE node (0: not ONLINE)."""

    NONE = 0
    OK = 1
    MISSED_CHECK_IN = 2


# By stored number: a dict lookup is several times cheaper than calling the enum (ListNodes of 10,000).
_STATES = {int(s): s for s in State}
_MODES = {int(m): m for m in Mode}
_HEALTHS = {int(h): h for h in Health}

# States that count toward max_nodes: refused nodes do not.
COUNTED_STATES = (State.STARTING, State.ONLINE)
# The states of a node refused for its keys.
KEY_REFUSAL_STATES = (
    State.INVALID_SECURE_COOKIE_KEY,
    State.INVALID_KEY_PERMISSIONS,
    State.ERROR_READING_LAUNCHER_KEY,
    State.INVALID_LAUNCHER_KEY,
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a joining node is refused for its keys: its state, a message an operator can act on, and
    the values the message names (node_fingerprint, cluster_fingerprint, path, mode, fix). No key bytes."""

    state: State
    message: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Load:
    """What a heartbeat reports."""

    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    cpu_count: int = 0
    session_count: int = 0


def _json_dict(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        return {} if value == "{}" else json.loads(value)
    return dict(value)


@dataclass(frozen=True, slots=True)
class Node:
    """A node as stored."""

    id: int
    address: str
    host: str
    port: int
    ipv4: str
    labels: dict[str, str]
    state: State
    state_reason: str
    mode: Mode
    health: Health
    lease_id: int
    create_time: datetime
    last_seen_time: datetime
    lease_expire_time: datetime
    load: Load = field(default_factory=Load)
    state_message: str = ""
    state_details: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any) -> Node:
        """From a ``registry.nodes`` row."""
        return cls(
            id=row["id"],
            address=row["address"],
            host=row["host"],
            port=row["port"],
            ipv4=row["ipv4"],
            labels=_json_dict(row["labels"]),
            state=_STATES[row["state"]],
            state_reason=row["state_reason"],
            mode=_MODES[row["mode"]],
            health=_HEALTHS[row["health"]],
            lease_id=row["lease_id"],
            create_time=row["create_time"],
            last_seen_time=row["last_seen_time"],
            lease_expire_time=row["lease_expire_time"],
            load=Load(row["load1"], row["load5"], row["load15"], row["cpu_count"], row["session_count"]),
            state_message=row["state_message"],
            state_details=_json_dict(row["state_details"]),
        )


@dataclass(frozen=True, slots=True)
class Cluster:
    """The cluster definition."""

    uid: str
    epoch: int
    create_time: datetime
    node_count: int = 0
    online_count: int = 0


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """A renewed lease."""

    lease_expire_time: datetime
    server_time: datetime


def format_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
