"""The placement decision, once: a pure function of the candidates and their counts (no I/O).

Every path that puts a session on a node calls :func:`decide` — a reserving placement (in its
batch, on the counts its commit checks under the placement lock), a dry run (on counts read
without a lock) and a move off a dead node (on the counts of the move's transaction) — so they
cannot drift apart: the same candidates, the same capacity rule, the same ranking and limit, the
same custom-strategy fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from muster.balancer.errors import NoEligibleNodeError
from muster.balancer.models import BRIEF_CANDIDATES, Counts, Decision, NodeInfo, rank

_NONE = Counts()


def is_capped(candidates: Sequence[NodeInfo]) -> bool:
    """Whether any candidate has a capacity limit (then :func:`decide` must check room)."""
    return any(n.capacity is not None for n in candidates)


class Split:
    """The candidates for one label requirement and the excluded nodes with their reasons (shared:
    callers must not modify the lists). ``memo`` keeps what callers derive from it, for as long as
    the split is current."""

    __slots__ = ("candidates", "capped", "excluded", "memo")

    def __init__(self, candidates: list[NodeInfo], excluded: list[tuple[NodeInfo, str]]) -> None:
        self.candidates = candidates
        self.excluded = excluded
        self.capped = is_capped(candidates)
        self.memo: dict[str, Any] = {}


def decide(
    strategy: str,
    user: str,
    candidates: Sequence[NodeInfo],
    counts: Mapping[int, Counts],
    *,
    excluded: Sequence[tuple[NodeInfo, str]] = (),
    forced: NodeInfo | None = None,
    fallback: str = "",
    limit: int | None = BRIEF_CANDIDATES,
    capped: bool | None = None,
    labels: Mapping[str, str] | None = None,
) -> Decision:
    """Chooses the node for one session.

    Args:
        strategy: the cluster's strategy; ``custom`` ranks like ``sessions`` (its choice, if any,
            comes in as ``forced``).
        user: the session's user (``user-hash``).
        candidates: the eligible nodes (see :func:`muster.balancer.models.split`), by id.
        counts: sessions per node id (absent: none).
        excluded: the nodes already excluded and why; nodes found full are added as ``full``.
        forced: the custom strategy's choice; dropped (with a fallback reason) when it is full.
        fallback: why the custom strategy fell back, if it did.
        limit: score only the best ``limit`` candidates (default ten, what an answer lists); None
            scores every one. A forced winner scores every one, so that it appears among them.
        capped: whether any candidate has a capacity limit (default: computed; callers deciding
            many sessions over one candidate list pass it once).
        labels: the required labels, for a refusal's message.

    Returns:
        The decision: the winner, the scored candidates (best first), the excluded nodes by id, the
        strategy that decided and the number of candidates with room.

    Raises:
        NoEligibleNodeError: no candidate, or every candidate is full.
    """
    pool: Sequence[NodeInfo] = candidates
    out_excluded = list(excluded)
    if capped if capped is not None else is_capped(candidates):
        pool = [n for n in candidates if n.has_room(counts.get(n.id, _NONE))]
        if len(pool) < len(candidates):
            full = [(n, "full") for n in candidates if not n.has_room(counts.get(n.id, _NONE))]
            out_excluded = sorted([*out_excluded, *full], key=lambda e: e[0].id)
        if forced is not None and not forced.has_room(counts.get(forced.id, _NONE)):
            forced, fallback = None, f"the custom strategy chose node {forced.id}, which is full"
    if not pool:
        raise NoEligibleNodeError([(n.id, n.address, r) for n, r in out_excluded], dict(labels or {}))
    ranked = rank(
        "sessions" if strategy == "custom" else strategy,
        user,
        pool,
        counts,
        None if forced is not None else limit,
    )
    winner = forced if forced is not None else ranked[0].node
    name = strategy if forced is not None or strategy != "custom" else "sessions"
    return Decision(winner, tuple(ranked), tuple(out_excluded), name, fallback, len(pool))


def reserve_in(counts: dict[int, Counts], node_id: int, *, placed: bool = True) -> None:
    """Counts one more session on a node in ``counts`` (a batch's later decisions see it)."""
    c = counts.get(node_id, _NONE)
    counts[node_id] = Counts(c.sessions + 1, c.placed + int(placed))
