"""The placement decision (``muster.balancer.decide``) as a pure function: capacity, the custom
strategy's fallback, the rank limit, and sequences of decisions that never pass a node's capacity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muster.balancer.decide import Split, decide, is_capped, reserve_in
from muster.balancer.errors import NoEligibleNodeError
from muster.balancer.models import BRIEF_CANDIDATES, STRATEGIES, Counts, NodeInfo, rank
from muster.core.validate import CAPACITY_LABEL


def _node(i: int, cap: int | None = None, **kw: object) -> NodeInfo:
    labels = {CAPACITY_LABEL: str(cap)} if cap is not None else {}
    return NodeInfo(i, f"10.0.0.{i}:8787", "ONLINE", labels=labels, **kw)  # type: ignore[arg-type]


def test_the_emptiest_node_wins_and_the_answer_lists_the_ten_best() -> None:
    nodes = [_node(i) for i in range(1, 13)]
    counts = {i: Counts(i % 4, 0) for i in range(1, 13)}
    d = decide("sessions", "ana", nodes, counts)
    assert d.winner.id == 4 and d.strategy == "sessions" and d.fallback == ""
    assert len(d.scored) == BRIEF_CANDIDATES and d.candidates == 12
    assert [s.node.id for s in d.scored] == [s.node.id for s in rank("sessions", "ana", nodes, counts)][:10]
    assert len(decide("sessions", "ana", nodes, counts, limit=None).scored) == 12


def test_full_nodes_are_excluded_as_full_in_id_order_among_the_others() -> None:
    a, b, c = _node(1, cap=2), _node(2, cap=2), _node(3, cap=5)
    gone = NodeInfo(4, "10.0.0.4:8787", "OFFLINE")
    d = decide("sessions", "u", [a, b, c], {1: Counts(2, 0), 2: Counts(1, 0)}, excluded=[(gone, "offline")])
    assert d.winner is c and d.candidates == 2
    assert [(n.id, r) for n, r in d.excluded] == [(1, "full"), (4, "offline")]
    assert {s.node.id for s in d.scored} == {b.id, c.id}
    assert decide("sessions", "u", [a, b], {1: Counts(2, 0)}).winner is b


def test_a_refusal_names_every_full_node_and_the_labels() -> None:
    nodes = [_node(1, cap=1), _node(2, cap=3)]
    with pytest.raises(NoEligibleNodeError) as err:
        decide("sessions", "u", nodes, {1: Counts(1, 1), 2: Counts(3, 0)}, labels={"zone": "a"})
    assert "node 1" in str(err.value) and "node 2" in str(err.value) and "full" in str(err.value)
    assert "zone=a" in str(err.value) and err.value.metadata["excluded"] == "1:full,2:full"
    with pytest.raises(NoEligibleNodeError):
        decide("sessions", "u", [], {})


def test_a_custom_choice_wins_unless_it_is_full_then_sessions_decides() -> None:
    nodes = [_node(i, cap=3) for i in range(1, 13)]
    counts = {1: Counts(3, 0), 12: Counts(2, 0)}
    chosen = decide("custom", "u", nodes, counts, forced=nodes[11])
    assert chosen.winner.id == 12 and chosen.strategy == "custom"
    assert len(chosen.scored) == 11  # every candidate with room is scored, so the choice is among them
    full = decide("custom", "u", nodes, counts, forced=nodes[0])
    assert full.winner.id == 2 and full.strategy == "sessions"
    assert full.fallback == "the custom strategy chose node 1, which is full"
    plain = decide("custom", "u", nodes, counts, fallback="custom strategy timed out after 1s")
    assert plain.strategy == "sessions" and plain.fallback.startswith("custom strategy timed out")


def test_capped_may_be_given_once_for_a_candidate_list() -> None:
    nodes = [_node(1, cap=1), _node(2)]
    assert is_capped(nodes) and not is_capped(nodes[1:])
    assert Split(nodes, []).capped
    assert decide("sessions", "u", nodes, {1: Counts(1, 1), 2: Counts(5, 0)}, capped=True).winner.id == 2


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeInfo]:
    n = draw(st.integers(min_value=1, max_value=14))
    return [
        _node(
            i,
            cap=draw(st.one_of(st.none(), st.integers(1, 6))),
            load1=draw(st.floats(min_value=0, max_value=8)),
            cpu_count=draw(st.integers(0, 8)),
        )
        for i in range(1, n + 1)
    ]


@settings(max_examples=200, deadline=None)
@given(
    nodes=clusters(),
    strategy=st.sampled_from(STRATEGIES),
    users=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=60),
    start=st.dictionaries(st.integers(1, 14), st.integers(0, 6)),
)
def test_a_run_of_decisions_never_passes_a_capacity_and_the_limit_never_changes_the_winner(
    nodes: list[NodeInfo], strategy: str, users: list[str], start: dict[int, int]
) -> None:
    counts = {k: Counts(v, v // 2) for k, v in start.items()}
    room = sum(max(0, n.capacity - counts.get(n.id, Counts()).sessions) for n in nodes if n.capacity is not None)
    unlimited = any(n.capacity is None for n in nodes)
    placed = 0
    for user in users:
        try:
            d = decide(strategy, user, nodes, counts)
        except NoEligibleNodeError:
            assert not unlimited and placed == room
            continue
        # A move scores one candidate, an answer ten, a diagnostics line all: the same winner.
        assert decide(strategy, user, nodes, counts, limit=1).winner == d.winner
        assert decide(strategy, user, nodes, counts, limit=None).winner == d.winner
        assert d.winner.has_room(counts.get(d.winner.id, Counts()))
        assert {n.id for n, r in d.excluded if r == "full"} == {
            n.id for n in nodes if not n.has_room(counts.get(n.id, Counts()))
        }
        reserve_in(counts, d.winner.id)
        placed += 1
    for n in nodes:
        if n.capacity is not None:
            assert counts.get(n.id, Counts()).sessions <= max(n.capacity, start.get(n.id, 0))
