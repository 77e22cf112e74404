"""The placement strategies and signed session ids, as pure functions (property tests over random clusters)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from muster.balancer.models import (
    STRATEGIES,
    Counts,
    NodeInfo,
    new_session_id,
    parse_session_id,
    rank,
    split,
    verify_session_id,
)

STATES = ["ONLINE", "ONLINE", "ONLINE", "OFFLINE", "STARTING", "INVALID_LICENSE"]


@st.composite
def clusters(draw: st.DrawFn) -> list[NodeInfo]:
    n = draw(st.integers(min_value=0, max_value=12))
    nodes = []
    for i in range(1, n + 1):
        nodes.append(
            NodeInfo(
                id=i,
                address=f"10.0.0.{i}:8787",
                state=draw(st.sampled_from(STATES)),
                draining=draw(st.booleans()),
                missed_check_in=draw(st.booleans()),
                labels=draw(st.dictionaries(st.sampled_from(["zone", "gpu"]), st.sampled_from(["a", "b"]), max_size=2)),
                load1=draw(st.floats(min_value=0, max_value=64)),
                cpu_count=draw(st.integers(min_value=0, max_value=64)),
            )
        )
    return nodes


@settings(max_examples=300, deadline=None)
@given(
    nodes=clusters(),
    labels=st.dictionaries(st.sampled_from(["zone", "gpu"]), st.sampled_from(["a", "b"]), max_size=2),
    strategy=st.sampled_from(STRATEGIES),
    user=st.text(min_size=1, max_size=20),
    counts=st.dictionaries(st.integers(1, 12), st.integers(0, 50)),
)
def test_a_placement_never_lands_on_a_draining_offline_missed_or_mismatched_node(
    nodes: list[NodeInfo], labels: dict[str, str], strategy: str, user: str, counts: dict[int, int]
) -> None:
    candidates, excluded = split(nodes, labels)
    assert {n.id for n in candidates} | {n.id for n, _ in excluded} == {n.id for n in nodes}
    for n in candidates:
        assert n.state == "ONLINE" and not n.draining and not n.missed_check_in
        assert all(n.labels.get(k) == v for k, v in labels.items())
    reasons = {n.id: r for n, r in excluded}
    for n in nodes:
        if n.state != "ONLINE":
            assert reasons[n.id] != "labels"
        elif n.draining:
            assert reasons[n.id] == "draining"
        elif n.missed_check_in:
            assert reasons[n.id] == "missed_check_in"
    ranked = rank(strategy, user, candidates, {k: Counts(v, 0) for k, v in counts.items()})
    if candidates:
        assert ranked[0].node in candidates
    else:
        assert ranked == []


def _cluster(n: int) -> list[NodeInfo]:
    return [NodeInfo(i, f"10.0.0.{i}:8787", "ONLINE") for i in range(1, n + 1)]


def test_sessions_fills_the_emptiest_node_and_spreads_exactly() -> None:
    nodes = _cluster(5)
    counts: dict[int, Counts] = {}
    for _ in range(1000):
        winner = rank("sessions", "u", nodes, counts)[0].node
        c = counts.get(winner.id, Counts())
        counts[winner.id] = Counts(c.sessions + 1, c.placed + 1)
    assert sorted(c.sessions for c in counts.values()) == [200] * 5


def test_system_load_prefers_the_lowest_load_per_cpu_and_counts_pending_placements() -> None:
    busy = NodeInfo(1, "a:1", "ONLINE", load1=3.0, cpu_count=4)  # 0.75 per CPU
    idle = NodeInfo(2, "b:1", "ONLINE", load1=0.5, cpu_count=1)  # 0.5 per CPU
    assert rank("system-load", "u", [busy, idle], {})[0].node is idle
    # Two sessions placed on the idle one and not started yet: (0.5 + 2) / 1 > (3 + 0) / 4.
    assert rank("system-load", "u", [busy, idle], {2: Counts(2, 2)})[0].node is busy


@given(st.text(min_size=1, max_size=30))
def test_user_hash_sends_a_user_to_the_same_node_while_the_set_is_stable(user: str) -> None:
    nodes = _cluster(7)
    first = rank("user-hash", user, nodes, {})[0].node.id
    busy = {n.id: Counts(n.id * 3, n.id) for n in nodes}  # load does not move a user
    assert rank("user-hash", user, list(reversed(nodes)), busy)[0].node.id == first


def test_user_hash_adding_one_node_to_ten_moves_at_most_15_percent_of_users() -> None:
    ten, eleven = _cluster(10), _cluster(11)
    users = [f"user{i}" for i in range(10_000)]
    before = {u: rank("user-hash", u, ten, {})[0].node.id for u in users}
    after = {u: rank("user-hash", u, eleven, {})[0].node.id for u in users}
    moved = [u for u in users if before[u] != after[u]]
    assert len(moved) <= 1500, len(moved)
    assert all(after[u] == 11 for u in moved)  # only onto the new node: nobody else is reshuffled
    per_node = {i: sum(1 for v in after.values() if v == i) for i in range(1, 12)}
    assert min(per_node.values()) > 600  # and the share is roughly even (10,000 / 11 ≈ 909)


def test_session_ids_are_signed_and_a_tampered_one_does_not_verify() -> None:
    key, other = os.urandom(32), os.urandom(32)
    sid = new_session_id(key, "n3")
    assert sid.endswith(".n3") and parse_session_id(sid) is not None
    assert verify_session_id([key], sid)
    assert verify_session_id([other, key], sid)  # any accepted key version
    assert not verify_session_id([other], sid)
    base, _, _ = sid.rpartition(".")
    assert not verify_session_id([key], base + ".n4")  # steered onto another node
    flipped = ("0" if base[0] != "0" else "1") + base[1:]
    assert not verify_session_id([key], flipped + ".n3")
    for junk in ("", "abc", "x" * 32 + ".n3", base + ".node3", base + ".n", "." + "n3"):
        assert not verify_session_id([key], junk)
