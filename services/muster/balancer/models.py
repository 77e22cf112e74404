"""The balancer's domain: nodes as candidates, the strategies, sessions, signed session ids. No I/O.

Every strategy scores each candidate and the lowest score wins (ties: fewer sessions, then the
lower node id), so that an answer can show every candidate's score:

- ``sessions``: the node's sessions, placed and started;
- ``system-load``: (1-minute load + sessions placed but not started yet) per CPU — the pending
  placements stand in for the load they are about to add, so a burst does not pile onto the node
  whose last heartbeat looked idlest;
- ``user-hash``: rendezvous hashing — 1 minus the user's weight on the node, a uniform hash of
  (user, node id) — so a user stays on one node while the set is stable, and a node joining or
  leaving moves only its own share of users;
- ``custom``: decided outside (an entry point or an executable); scored like ``sessions`` for
  the explanation.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from muster.api.rules import node_of_route, route_of
from muster.core.validate import CAPACITY_LABEL

STRATEGIES = ("sessions", "system-load", "user-hash", "custom")
ROUTE_PURPOSE = "session-routes"
_RAND_BYTES = 8
_SIG_BYTES = 8
_BASE_HEX = 2 * (_RAND_BYTES + _SIG_BYTES)


class SessionState(enum.IntEnum):
    """Numbers as in ``Session.State``."""

    PLACED = 1
    STARTED = 2


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as the balancer sees it: the registry's view plus the latest load."""

    id: int
    address: str
    state: str  # ONLINE, OFFLINE, …
    draining: bool = False
    missed_check_in: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    cpu_count: int = 0

    @property
    def route(self) -> str:
        """The node's route name: the suffix of its sessions' ids."""
        return route_of(self.id)

    @property
    def capacity(self) -> int | None:
        """The most sessions the node takes (its ``muster.io/max-sessions`` label), or None."""
        value = self.labels.get(CAPACITY_LABEL)
        return int(value) if value is not None and value.isdigit() else None

    def has_room(self, counts: Counts) -> bool:
        """Whether one more session fits under the node's capacity."""
        capacity = self.capacity
        return capacity is None or counts.sessions < capacity


@dataclass(frozen=True, slots=True)
class Counts:
    """Sessions on a node: all of them, and those placed but not started."""

    sessions: int = 0
    placed: int = 0


@dataclass(frozen=True, slots=True)
class Scored:
    """A candidate and its score."""

    node: NodeInfo
    score: float
    counts: Counts


@dataclass(frozen=True, slots=True)
class Decision:
    """A placement decision: the winner, every candidate scored, the excluded nodes, the strategy."""

    winner: NodeInfo
    scored: tuple[Scored, ...]  # best first; only the best few unless every candidate was asked for
    excluded: tuple[tuple[NodeInfo, str], ...]
    strategy: str
    fallback: str = ""
    candidate_count: int = -1  # how many candidates there were (-1: len(scored))

    @property
    def candidates(self) -> int:
        """How many candidates there were."""
        return self.candidate_count if self.candidate_count >= 0 else len(self.scored)


@dataclass(frozen=True, slots=True)
class Session:
    """A row of ``balancer.sessions``."""

    id: str
    node_id: int
    node_address: str
    route: str
    user: str
    kind: str
    state: SessionState
    pid: int
    place_time: datetime
    start_time: datetime | None
    moved_from: str = ""

    @classmethod
    def from_row(cls, row: Any) -> Session:
        """From a ``balancer.sessions`` row."""
        return cls(
            row["id"],
            row["node_id"],
            row["node_address"],
            row["route"],
            row["user_name"],
            row["kind"],
            SessionState(row["state"]),
            row["pid"],
            row["place_time"],
            row["start_time"],
            row["moved_from"],
        )


# -- eligibility -----------------------------------------------------------------------------------


def split(nodes: Iterable[NodeInfo], labels: Mapping[str, str]) -> tuple[list[NodeInfo], list[tuple[NodeInfo, str]]]:
    """Candidates (ONLINE, ACTIVE, within the check-in window, carrying every required label) and
    the excluded nodes with their reason, each by node id."""
    candidates: list[NodeInfo] = []
    excluded: list[tuple[NodeInfo, str]] = []
    for n in sorted(nodes, key=lambda n: n.id):
        if n.state != "ONLINE":
            excluded.append((n, "offline" if n.state == "OFFLINE" else n.state.lower()))
        elif n.draining:
            excluded.append((n, "draining"))
        elif n.missed_check_in:
            excluded.append((n, "missed_check_in"))
        elif any(n.labels.get(k) != v for k, v in labels.items()):
            excluded.append((n, "labels"))
        else:
            candidates.append(n)
    return candidates, excluded


# -- strategies ------------------------------------------------------------------------------------


def hrw_weight(user: str, node_id: int) -> float:
    """The user's rendezvous weight on a node, uniform in [0, 1)."""
    digest = hashlib.blake2b(f"{user}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def score(strategy: str, user: str, node: NodeInfo, counts: Counts) -> float:
    """A candidate's score under a strategy (lower wins)."""
    if strategy == "system-load":
        return (node.load1 + counts.placed) / max(node.cpu_count, 1)
    if strategy == "user-hash":
        return 1.0 - hrw_weight(user, node.id)
    return float(counts.sessions)  # sessions, and custom's explanation


BRIEF_CANDIDATES = 10  # an answer lists this many best candidates unless every one is asked for


def rank(
    strategy: str,
    user: str,
    candidates: Iterable[NodeInfo],
    counts: Mapping[int, Counts],
    limit: int | None = None,
) -> list[Scored]:
    """The candidates scored, best first (score, then fewer sessions, then lower id): all of them,
    or the best ``limit`` (a partial selection: placing among many nodes is on the hot path)."""
    none = Counts()
    keyed = []
    for n in candidates:
        c = counts.get(n.id, none)
        keyed.append((score(strategy, user, n, c), c.sessions, n.id, n, c))
    best = heapq.nsmallest(limit, keyed) if limit is not None and limit < len(keyed) else sorted(keyed)
    return [Scored(n, s, c) for s, _, _, n, c in best]


# -- signed session ids ------------------------------------------------------------------------------


def _signature(key: bytes, rand: str, route: str) -> str:
    return hmac.new(key, f"{rand}.{route}".encode(), hashlib.sha256).hexdigest()[: 2 * _SIG_BYTES]


def new_session_id(key: bytes, route: str) -> str:
    """``<random><signature>.<route>``: the signature (HMAC-SHA256 under a key derived from the
    cluster key) binds the random part to the route."""
    rand = secrets.token_hex(_RAND_BYTES)
    return f"{rand}{_signature(key, rand, route)}.{route}"


def parse_session_id(session_id: str) -> tuple[str, str, str] | None:
    """(random part, signature, route) of a signed id; None when it does not have that shape."""
    base, dot, route = session_id.rpartition(".")
    if not dot or len(base) != _BASE_HEX or node_of_route(route) is None:
        return None
    if any(c not in "0123456789abcdef" for c in base):
        return None
    return base[: 2 * _RAND_BYTES], base[2 * _RAND_BYTES :], route


def verify_session_id(keys: Iterable[bytes], session_id: str) -> bool:
    """Whether the id's signature verifies under one of the accepted keys (constant-time compare)."""
    parts = parse_session_id(session_id)
    if parts is None:
        return False
    rand, sig, route = parts
    return any(hmac.compare_digest(_signature(k, rand, route), sig) for k in keys)
