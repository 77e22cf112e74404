"""The balancer against real replicas: spreading under concurrency, explanations and exclusions,
signed routes, the custom strategy's fallback, and failover of a SIGKILLed node's sessions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
from agents import AgentProcess
from harness import ServerProcess, error_reason, wait_for

from muster.api.balancer.v1 import balancer_service_pb2 as pb
from muster.api.balancer.v1 import balancer_service_pb2_grpc
from muster.client import Cluster, NodeMode
from muster.client import errors as E

KEY = {"MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
CALM = {**KEY, "MUSTER_HEARTBEAT_INTERVAL": "5s", "MUSTER_CHECK_IN_WINDOW": "15s", "MUSTER_LEASE_TTL": "60s"}
ALL = ["registry,keys,balancer"]


@contextlib.contextmanager
def control_planes(database_url: str, n: int, env: dict[str, str], metrics_ports: list[int] | None = None):
    procs = [
        ServerProcess(
            database_url,
            ALL,
            env={**env, "MUSTER_METRICS_LISTEN": f"127.0.0.1:{metrics_ports[i]}"} if metrics_ports else env,
        )
        for i in range(n)
    ]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _placement_batches(port: int) -> dict[str, float]:
    """A replica's ``muster_placement_batches_total`` by attempt (first, again, locked)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'muster_placement_batches_total\{.*attempt="(\w+)".*\} (\S+)$', line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[2])
    return out


async def _batches(ports: list[int]) -> list[dict[str, float]]:
    return [await asyncio.to_thread(_placement_batches, p) for p in ports]


async def _ready(c: Cluster, online: int, timeout: float = 15.0) -> None:
    """Waits until the balancer's view shows ``online`` ONLINE nodes."""

    async def seen() -> bool:
        try:
            status = await c.status()
        except E.UnavailableError:
            return False
        return sum(1 for n in status.nodes if n.state == "ONLINE") >= online

    await wait_for(seen, timeout=timeout, what=f"the balancer to see {online} nodes")


async def _join(c: Cluster, count: int, **labels: str) -> list[int]:
    return [
        (await c.join_node(f"app{i}-{os.getpid()}-{time.monotonic_ns()}.test", 8787, labels=labels)).node_id
        for i in range(count)
    ]


async def test_a_thousand_concurrent_placements_over_five_nodes_differ_by_at_most_one(database_url: str) -> None:
    ports = [_free_port(), _free_port()]
    with control_planes(database_url, 2, CALM, ports) as (a, b):
        async with Cluster.connect(a.address) as ca, Cluster.connect(b.address) as cb:
            nodes = await _join(ca, 5)
            await _ready(ca, 5)
            await _ready(cb, 5)
            gate = asyncio.Semaphore(128)

            async def place(i: int) -> str:
                async with gate:
                    return (await (ca if i % 2 else cb).place_session(f"user{i}")).session.id

            ids = await asyncio.wait_for(asyncio.gather(*(place(i) for i in range(1000))), 120)
            assert len(set(ids)) == 1000
            sessions = await ca.list_sessions()
            batches = await _batches(ports)
    # They went in batches (fewer writes than placements), on both replicas, racing each other (a
    # batch decided on counts the other replica's batch changed first was decided again).
    assert all(batches) and sum(sum(b.values()) for b in batches) < 1000, batches
    assert sum(b.get("again", 0) + b.get("locked", 0) for b in batches) > 0, batches
    per_node = Counter(s.node_id for s in sessions)
    assert len(sessions) == 1000 and set(per_node) == set(nodes)
    assert max(per_node.values()) - min(per_node.values()) <= 1, per_node


async def test_a_placement_explains_itself_and_excludes_what_cannot_take_it(database_url: str) -> None:
    env = {**KEY, "MUSTER_HEARTBEAT_INTERVAL": "300ms", "MUSTER_CHECK_IN_WINDOW": "900ms", "MUSTER_LEASE_TTL": "60s"}
    with control_planes(database_url, 1, env) as (server,):
        async with Cluster.connect(server.address) as c:
            active = await c.join_node("active.test", 8787, labels={"zone": "a"})
            busy = await c.join_node("busy.test", 8787, labels={"zone": "a"})
            draining = await c.join_node("draining.test", 8787, labels={"zone": "a"})
            other_zone = await c.join_node("zone-b.test", 8787, labels={"zone": "b"})
            silent = await c.join_node("silent.test", 8787, labels={"zone": "a"})
            gone = await c.join_node("gone.test", 8787, labels={"zone": "a"})
            await c.leave_node(gone)
            await c.set_node_mode(draining.node_id, NodeMode.DRAINING)
            stop = asyncio.Event()

            async def beat() -> None:
                while not stop.is_set():
                    for lease in (active, busy, draining, other_zone):
                        await c.heartbeat(lease)
                    await asyncio.sleep(0.2)

            beating = asyncio.create_task(beat())
            try:
                await _ready(c, 4)

                async def silent_missed() -> bool:
                    status = await c.status()
                    return any(n.node_id == silent.node_id and n.unreachable for n in status.nodes)

                await wait_for(silent_missed, timeout=10, what="the silent node to miss its check-in")
                await c.place_session("someone", labels={"zone": "a"})  # busy gets one first? no: fewest wins
                placed = await c.place_session("ana", kind="ide", labels={"zone": "a"})
                assert placed.strategy == "sessions"
                assert {x.node_id for x in placed.candidates} == {active.node_id, busy.node_id}
                assert sum(x.chosen for x in placed.candidates) == 1
                winner = next(x for x in placed.candidates if x.chosen)
                assert winner.node_id == placed.node_id and winner.score == min(x.score for x in placed.candidates)
                reasons = {x.node_id: x.reason for x in placed.excluded}
                assert reasons == {
                    draining.node_id: "draining",
                    other_zone.node_id: "labels",
                    silent.node_id: "missed_check_in",
                    gone.node_id: "offline",
                }
                # A dry run answers the same way and reserves nothing.
                before = len(await c.list_sessions())
                dry = await c.place_session("bo", labels={"zone": "a"}, dry_run=True)
                assert dry.session.node_id in {active.node_id, busy.node_id} and dry.excluded
                assert len(await c.list_sessions()) == before
                # Nobody can take it: FAILED_PRECONDITION with every node's reason, at once (not retried).
                started = time.monotonic()
                with pytest.raises(E.NoEligibleNodeError) as none:
                    await c.place_session("cy", labels={"zone": "c"})
                assert time.monotonic() - started < 2
                assert none.value.code == grpc.StatusCode.FAILED_PRECONDITION and not none.value.transient
                assert "labels" in str(none.value) and f"{draining.node_id}:draining" in none.value.metadata["excluded"]
                # A retried placement (same request id) is one session.
                again = [await c.place_session("di", request_id="r-1") for _ in range(3)]
                assert len({p.session.id for p in again}) == 1
            finally:
                stop.set()
                await beating


async def test_routes_are_signed_followed_and_forged_ones_refused(database_url: str) -> None:
    with control_planes(database_url, 1, CALM) as (server,):
        async with Cluster.connect(server.address) as c:
            await _join(c, 2)
            await _ready(c, 2)
            placed = await c.place_session("ana")
            session, moved = await c.route_session(placed.session.id)
            assert (session.node_id, moved) == (placed.node_id, False)
            base, _, route = placed.session.id.rpartition(".")
            other = "n2" if route == "n1" else "n1"
            for forged in (f"{base}.{other}", "0" * 32 + f".{route}", base[:-1] + "x." + route):
                with pytest.raises(E.ForgedSessionIdError):
                    await c.route_session(forged)
            # Started on its node, then ended: gone.
            started = await c.report_session_started(placed.node_id, placed.session.id, pid=4242, user="ana")
            assert (started.state, started.pid) == ("STARTED", 4242)
            await c.report_session_ended(placed.node_id, placed.session.id)
            with pytest.raises(E.SessionNotFoundError):
                await c.route_session(placed.session.id)
            # A session its node started without placement is recorded under the application's id.
            own = await c.report_session_started(placed.node_id, "local-7", pid=7, user="bo", kind="jupyter")
            assert (await c.route_session("local-7"))[0].id == own.id == "local-7"


async def test_bad_input_is_invalid_argument_naming_the_field(database_url: str) -> None:
    with control_planes(database_url, 1, CALM) as (server,):
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = balancer_service_pb2_grpc.BalancerServiceStub(ch)
            cases = [
                (stub.PlaceSession, pb.PlaceSessionRequest(user=""), "user"),
                (stub.PlaceSession, pb.PlaceSessionRequest(user="a", kind="k" * 65), "kind"),
                (stub.PlaceSession, pb.PlaceSessionRequest(user="a\n"), "user"),
                (stub.PlaceSession, pb.PlaceSessionRequest(user="a", labels={"": "x"}), "labels"),
                (stub.ReportSession, pb.ReportSessionRequest(node_id=1, session_id="s"), "kind"),
                (stub.ReportSession, pb.ReportSessionRequest(node_id=0, session_id="s", kind=1), "node_id"),
                (stub.ReportSession, pb.ReportSessionRequest(node_id=1, session_id="a b", kind=1), "session_id"),
                (stub.ReportSession, pb.ReportSessionRequest(node_id=1, session_id="s", kind=1, pid=-1), "pid"),
                (stub.RouteSession, pb.RouteSessionRequest(session_id=""), "session_id"),
                (stub.ListSessions, pb.ListSessionsRequest(page_token="garbage"), "page_token"),
                (stub.ListSessions, pb.ListSessionsRequest(page_size=10_001), "page_size"),
                (stub.SetStrategy, pb.SetStrategyRequest(strategy="random"), "strategy"),
            ]
            for method, request, field in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await method(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.value)
                reason, metadata = error_reason(err.value)
                assert metadata.get("field", "").startswith(field), (field, reason, metadata)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SetStrategy(pb.SetStrategyRequest(strategy="custom"), timeout=10)
            assert error_reason(err.value)[0] == "STRATEGY_UNAVAILABLE"


async def test_user_hash_keeps_a_user_on_one_node_and_decisions_are_logged(database_url: str, tmp_path: Path) -> None:
    diagnostics = tmp_path / "decisions.jsonl"
    with control_planes(database_url, 1, {**CALM, "MUSTER_BALANCER_DIAGNOSTICS": str(diagnostics)}) as (server,):
        async with Cluster.connect(server.address) as c:
            await _join(c, 4)
            await _ready(c, 4)
            assert await c.set_strategy("user-hash") == "sessions"
            homes = {u: {(await c.place_session(u)).node_id for _ in range(4)} for u in ("ana", "bo", "cy", "di")}
            assert all(len(h) == 1 for h in homes.values()), homes
            status = await c.status()
            assert status.strategy == "user-hash"
    lines = [json.loads(line) for line in diagnostics.read_text().splitlines()]
    assert len(lines) == 16 and all(d["strategy"] == "user-hash" for d in lines)
    first = lines[0]
    assert first["user"] == "ana" and len(first["candidates"]) == 4
    best = min(first["candidates"], key=lambda x: x["score"])
    assert first["winner"] == best["node_id"] and first["session_id"].endswith(f".n{best['node_id']}")


CUSTOM_HANGS = "import time; time.sleep(30)"
CUSTOM_PICKS_LAST = "import json, sys; d = json.load(sys.stdin); print(max(c['node_id'] for c in d['candidates']))"


@pytest.mark.parametrize(("script", "falls_back"), [(CUSTOM_HANGS, True), (CUSTOM_PICKS_LAST, False)])
async def test_the_custom_strategy_decides_or_falls_back_within_its_timeout(
    database_url: str, tmp_path: Path, script: str, falls_back: bool
) -> None:
    path = tmp_path / "strategy.py"
    path.write_text(script)
    env = {**CALM, "MUSTER_BALANCER_CUSTOM": f"{sys.executable} {path}", "MUSTER_BALANCER_CUSTOM_TIMEOUT": "500ms"}
    with control_planes(database_url, 1, env) as (server,):
        async with Cluster.connect(server.address) as c:
            nodes = await _join(c, 3)
            await _ready(c, 3)
            await c.set_strategy("custom")
            started = time.monotonic()
            placed = await c.place_session("ana")
            took = time.monotonic() - started
    if falls_back:
        assert placed.strategy == "sessions" and "timed out" in placed.fallback, placed.fallback
        assert took < 2.0, took
    else:
        assert (placed.strategy, placed.fallback, placed.node_id) == ("custom", "", max(nodes)), placed.fallback


async def test_a_sigkilled_nodes_sessions_move_once_each_and_the_rest_stay(database_url: str) -> None:
    env = {**KEY, "MUSTER_HEARTBEAT_INTERVAL": "200ms", "MUSTER_CHECK_IN_WINDOW": "600ms", "MUSTER_LEASE_TTL": "1500ms"}
    with control_planes(database_url, 2, env) as (a, b):
        agents = [AgentProcess([a.address, b.address]) for _ in range(3)]
        try:
            for agent in agents:
                agent.start()
            async with Cluster.connect(a.address) as c:
                await _ready(c, 3)
                placed = [await c.place_session(f"user{i}") for i in range(30)]
                for p in placed[::2]:
                    await c.report_session_started(p.node_id, p.session.id, pid=1000, user=p.session.user)
                victim = agents[0]
                doomed = {p.session.id for p in placed if p.node_id == victim.node_id}
                kept = {p.session.id: p.node_id for p in placed if p.node_id != victim.node_id}
                assert doomed and kept
                head = (await c.get_cluster()).head_revision
                killed_at = time.monotonic()
                victim.signal(9)
                moves: list = []

                async def collect() -> None:
                    async with c.watch(head, kinds=["muster.api.balancer.v1.SessionMoved"]) as stream:
                        async for item in stream:
                            if getattr(item, "kind", "") == "SessionMoved":
                                moves.append((time.monotonic(), item.payload))

                watcher = asyncio.create_task(collect())
                try:
                    await wait_for(lambda: len(moves) >= len(doomed), timeout=15, what="every session to move")
                    await asyncio.sleep(1.0)  # a duplicate move would show up now
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                assert max(t for t, _ in moves) - killed_at < 1.5 + 2.0  # lease_ttl + 2 s
                assert sorted(m.previous_id for _, m in moves) == sorted(doomed)  # each exactly once
                assert all(m.previous_node_id == victim.node_id for _, m in moves)
                assert all(m.session.node_id != victim.node_id for _, m in moves)
                sessions = {s.id: s for s in await c.list_sessions()}
                assert {sid: sessions[sid].node_id for sid in kept} == kept  # the others stayed put
                assert len(sessions) == len(placed)
                for _, m in moves:
                    session, moved = await c.route_session(m.previous_id)
                    assert moved and session.id == m.session.id and session.node_id == m.session.node_id
                # A late report for a moved id (a paused replica, a slow agent) does not bring it back.
                _, first = moves[0]
                stale = await c.report_session_started(first.previous_node_id, first.previous_id, pid=1, user="x")
                assert stale.id == first.session.id and stale.node_id == first.session.node_id
                assert len(await c.list_sessions()) == len(placed)
                # The new nodes' agents heard of the sessions moved onto them.
                heard = sum(len(x.lines_matching(r"moved here from node")) for x in agents[1:])
                assert heard == len(doomed)
        finally:
            for agent in agents:
                agent.stop()


async def test_sessions_an_application_reports_to_its_agent_reach_the_balancer(database_url: str) -> None:
    with control_planes(database_url, 1, CALM) as (server,):
        agent = AgentProcess([server.address])
        try:
            agent.start()
            async with Cluster.connect(server.address) as c:
                await _ready(c, 1)
                placed = await c.place_session("ana", kind="ide")
                assert placed.node_id == agent.node_id
                await agent.request({"op": "session_started", "session": placed.session.id, "pid": 4242, "user": "ana"})
                await agent.request({"op": "session_started", "session": "own-1", "pid": 77, "user": "bo"})

                async def reported() -> bool:
                    got = {s.id: s for s in await c.list_sessions(node_id=agent.node_id)}
                    return got.get(placed.session.id, placed.session).state == "STARTED" and "own-1" in got

                await wait_for(reported, timeout=10, what="the agent's reports")
                sessions = {s.id: s for s in await c.list_sessions()}
                assert (sessions[placed.session.id].pid, sessions["own-1"].pid, sessions["own-1"].user) == (
                    4242,
                    77,
                    "bo",
                )
                status = await c.status()
                mine = next(n for n in status.nodes if n.node_id == agent.node_id)
                assert {(s.pid, s.user) for s in mine.sessions} == {(4242, "ana"), (77, "bo")}
                await agent.request({"op": "session_ended", "session": "own-1"})

                async def ended() -> bool:
                    return "own-1" not in {s.id for s in await c.list_sessions()}

                await wait_for(ended, timeout=10, what="the end to be reported")
        finally:
            agent.stop()


async def test_a_server_with_every_service_stops_promptly_right_after_starting(database_url: str) -> None:
    """Regression: the balancer's node view could swallow its cancellation (asyncio.wait_for racing a
    read) and keep the process alive for ever after SIGTERM."""
    for _ in range(3):
        server = ServerProcess(database_url, ["registry,keys,balancer,locks"], env=KEY).start()
        try:
            async with Cluster.connect(server.address) as c:
                await c.join_node("prompt.test", 8787)
            started = time.monotonic()
            code = server.terminate(timeout=20)
            assert code == 0 and time.monotonic() - started < 8, (code, time.monotonic() - started)
        finally:
            server.stop()


async def test_an_answer_lists_the_ten_best_candidates_unless_all_are_asked_for(database_url: str) -> None:
    with control_planes(database_url, 1, CALM) as (server,):
        async with Cluster.connect(server.address) as c:
            await _join(c, 12)
            await _ready(c, 12)
            for _ in range(5):
                await c.place_session("warm")  # five nodes now have a session: scores differ
            brief = await c.place_session("ana")
            full = await c.place_session("bo", all_candidates=True)
    assert brief.candidate_count == 12 and len(brief.candidates) == 10
    assert any(x.chosen for x in brief.candidates)
    assert [x.score for x in brief.candidates] == sorted(x.score for x in brief.candidates)
    assert full.candidate_count == 12 and len(full.candidates) == 12


async def test_a_dry_run_answers_what_the_placement_then_does(database_url: str) -> None:
    """A dry run decides with the same function as the reservation, on the same counts: the same
    node, the same ten best candidates with their scores, the same count and the same exclusions —
    nodes that became full included — under each strategy."""
    cap = {"muster.io/max-sessions": "2"}
    with control_planes(database_url, 1, CALM) as (server,):
        async with Cluster.connect(server.address) as c:
            for i in range(3):
                await c.join_node(f"dry-cap{i}-{time.monotonic_ns()}.test", 8787, labels=cap)
            await _join(c, 10)
            await _ready(c, 13)
            seen_full = False
            for strategy in ("sessions", "user-hash", "system-load"):
                await c.set_strategy(strategy)
                await asyncio.sleep(1.2)  # past the strategy cache on any replica
                for i in range(12):
                    user = f"{strategy}-{i}"
                    dry = await c.place_session(user, dry_run=True)
                    real = await c.place_session(user)
                    assert (dry.strategy, dry.node_id, dry.candidate_count) == (
                        real.strategy,
                        real.node_id,
                        real.candidate_count,
                    )
                    assert dry.candidates == real.candidates and len(real.candidates) == 10
                    assert dry.excluded == real.excluded
                    seen_full = seen_full or any(e.reason == "full" for e in real.excluded)
            assert seen_full  # the capped nodes filled up on the way


async def test_a_replica_resumed_from_a_pause_places_from_a_view_read_again(database_url: str) -> None:
    """A replica stopped while a node went OFFLINE must not place onto it from the view it had
    before the pause: the change reaches its view only after it ran again (found by the chaos checker)."""
    with control_planes(database_url, 2, CALM) as (paused, other):
        async with Cluster.connect(other.address) as c, Cluster.connect(paused.address) as b:
            for _ in range(3):
                idle = await c.join_node(f"idle-{time.monotonic_ns()}.test", 8787)
                busy = await c.join_node(f"busy-{time.monotonic_ns()}.test", 8787)
                await _ready(b, 2)
                await c.set_node_mode(idle.node_id, NodeMode.DRAINING)
                await wait_for(
                    lambda i=idle.node_id: _mode_seen(b, i, draining=True), what="the balancer to see the drain"
                )
                for i in range(3):
                    assert (await b.place_session(f"u{i}")).node_id == busy.node_id
                await c.set_node_mode(idle.node_id, NodeMode.ACTIVE)
                await wait_for(
                    lambda i=idle.node_id: _mode_seen(b, i, draining=False), what="the balancer to see it active"
                )
                # The idle node (no sessions) would win; it goes OFFLINE while the replica is stopped.
                paused.signal(signal.SIGSTOP)
                try:
                    await c.leave_node(idle)
                    placing = asyncio.create_task(b.place_session("after-pause"))
                    await asyncio.sleep(1.5)
                finally:
                    paused.signal(signal.SIGCONT)
                placed = await asyncio.wait_for(placing, 15)
                assert placed.node_id == busy.node_id, "placed onto a node that went OFFLINE during the pause"
                await c.leave_node(busy)
                await wait_for(lambda: _none_online(b), what="the balancer to see both gone")


async def _mode_seen(b: Cluster, node_id: int, *, draining: bool) -> bool:
    status = await b.status()
    return any(n.node_id == node_id and n.draining == draining for n in status.nodes)


async def _none_online(b: Cluster) -> bool:
    return not any(n.state == "ONLINE" for n in (await b.status()).nodes)


async def test_a_node_never_takes_more_sessions_than_its_capacity(database_url: str) -> None:
    """``muster.io/max-sessions``: sixty placements at once through two replicas onto three nodes of
    ten each — exactly thirty land, ten per node, the rest are refused naming the full nodes; a dead
    node's sessions move only into room that frees up."""
    cap = {"muster.io/max-sessions": "10"}
    ports = [_free_port(), _free_port()]
    with control_planes(database_url, 2, CALM, ports) as (a, b):
        async with Cluster.connect(a.address) as ca, Cluster.connect(b.address) as cb:
            nodes = [await ca.join_node(f"cap{i}-{time.monotonic_ns()}.test", 8787, labels=cap) for i in range(3)]
            await _ready(ca, 3)
            await _ready(cb, 3)

            async def place(i: int) -> int | Exception:
                try:
                    return (await (ca if i % 2 else cb).place_session(f"user{i}")).node_id
                except E.NoEligibleNodeError as exc:
                    return exc

            results = await asyncio.wait_for(asyncio.gather(*(place(i) for i in range(60))), 60)
            placed = [r for r in results if isinstance(r, int)]
            refused = [r for r in results if isinstance(r, Exception)]
            assert len(placed) == 30 and len(refused) == 30
            assert Counter(placed) == {n.node_id: 10 for n in nodes}
            assert all(f"node {n.node_id}" in str(refused[0]) for n in nodes) and "full" in str(refused[0])
            batches = await _batches(ports)
            # The 60 concurrent requests went through batches of several (placed and refused alike).
            assert sum(sum(b.values()) for b in batches) < len(results), batches
            with pytest.raises(E.NoEligibleNodeError):
                await ca.place_session("dry", dry_run=True)

            # The first node dies: the others are full, so its sessions stay until room frees up.
            dead, kept, other = nodes
            await ca.leave_node(dead)
            await asyncio.sleep(2.5)  # a sweep has run
            by_node = Counter(s.node_id for s in await ca.list_sessions())
            assert by_node == {dead.node_id: 10, kept.node_id: 10, other.node_id: 10}
            for s in (await ca.list_sessions(node_id=kept.node_id))[:4]:
                await ca.report_session_ended(kept.node_id, s.id)

            async def moved_into_the_room() -> bool:
                return Counter(s.node_id for s in await ca.list_sessions()) == {
                    dead.node_id: 6,
                    kept.node_id: 10,
                    other.node_id: 10,
                }

            await wait_for(moved_into_the_room, timeout=10, what="four sessions to move into the freed room")
            assert max(Counter(s.node_id for s in await cb.list_sessions()).values()) == 10


async def test_a_capacity_label_must_be_a_whole_number(database_url: str) -> None:
    with control_planes(database_url, 1, CALM) as (server,):
        async with Cluster.connect(server.address) as c:
            for bad in ("0", "ten", "-3", "1.5", "10000000"):
                with pytest.raises(E.InvalidArgumentError) as err:
                    await c.join_node(f"bad-{bad}.test", 8787, labels={"muster.io/max-sessions": bad})
                assert "muster.io/max-sessions" in str(err.value) and "labels" in str(err.value)
            assert (await c.list_nodes()).nodes == []


async def test_a_move_decided_before_the_node_came_back_leaves_its_new_sessions(database_url: str) -> None:
    """A replica that heard of a node's death late (it was stopped) must not move the sessions the
    node took after it came back (found by the chaos checker: a session moved off a live node)."""
    with control_planes(database_url, 2, CALM) as (a, b):
        async with Cluster.connect(a.address) as ca, Cluster.connect(b.address) as cb:
            host = f"back-{time.monotonic_ns()}.test"
            node = await ca.join_node(host, 8787)
            other = await ca.join_node(f"other-{time.monotonic_ns()}.test", 8787)
            await _ready(ca, 2)
            await _ready(cb, 2)
            await ca.set_node_mode(node.node_id, NodeMode.DRAINING)
            await wait_for(lambda: _mode_seen(ca, node.node_id, draining=True), what="the drain seen")
            for i in range(5):  # the other node gets these: it is busier from now on
                assert (await ca.place_session(f"early{i}")).node_id == other.node_id
            await ca.set_node_mode(node.node_id, NodeMode.ACTIVE)
            await wait_for(lambda: _mode_seen(ca, node.node_id, draining=False), what="the undrain seen")
            await wait_for(lambda: _mode_seen(cb, node.node_id, draining=False), what="the undrain seen by b")
            b.signal(signal.SIGSTOP)
            try:
                await ca.leave_node(node)  # OFFLINE while b is stopped; a moves nothing (it has none)
                back = await ca.join_node(host, 8787)
                assert back.node_id == node.node_id

                async def online_again() -> bool:
                    return any(n.node_id == node.node_id and n.state == "ONLINE" for n in (await ca.status()).nodes)

                await wait_for(online_again, what="a to see the node ONLINE again")
                taken = [await ca.place_session(f"late{i}") for i in range(3)]
                assert {p.node_id for p in taken} == {node.node_id}
            finally:
                b.signal(signal.SIGCONT)
            await asyncio.sleep(4.5)  # b follows the OFFLINE event, its mover and two sweeps run
            where = {s.id: s.node_id for s in await ca.list_sessions()}
            assert all(where.get(p.session.id) == node.node_id for p in taken), where
