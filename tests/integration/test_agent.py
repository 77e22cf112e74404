"""The node agent against real replicas: it rides through failures, leaves promptly, reports sessions.

Agents run as processes (``muster agent``, see tests/agents.py), registry replicas too; timing is
judged by the database's event timestamps, with bounds taken from the short test intervals
(heartbeat 200 ms, check-in 600 ms, lease 1.5 s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import pytest
from agents import JOINED, LEFT, REJOINED, AgentProcess, stop_all
from harness import ROOT, Recorder, ServerProcess, comparable, servers, wait_for

from muster.api.registry.v1 import node_pb2
from muster.client import Agent, AgentConfig, Cluster, Event, Node, NodeState, ResolvedAddress
from muster.client import errors as E

pytestmark = pytest.mark.timeout(180)
TTL = 1.5


def _summary(node: Node) -> dict:
    """A node as the agent's status shows it."""
    return {
        "id": node.id,
        "address": node.address,
        "state": node.state.name,
        "mode": node.mode.name,
        "health": node.health.name,
        "lease_id": node.lease_id,
    }


async def _views_match(cluster: Cluster, agents: list[AgentProcess]) -> bool:
    expected = sorted((_summary(n) for n in (await cluster.list_nodes()).nodes), key=lambda n: n["id"])
    for agent in agents:
        status = await agent.status()
        if status["nodes"] != expected or status["view"] != [n["id"] for n in expected]:
            return False
    return True


async def _event(events, match, timeout: float = 10.0) -> Event:
    """The first event of a watch that satisfies ``match``."""
    async with asyncio.timeout(timeout):
        async for item in events:
            if isinstance(item, Event) and match(item):
                return item
    raise AssertionError("the watch ended")


# -- (a) a replica dies ------------------------------------------------------------------------


async def test_agents_heartbeat_through_a_killed_replica_and_their_views_converge(database_url: str) -> None:
    with servers(database_url, 2) as (a, b):
        agents = [AgentProcess([a.address, b.address]) for _ in range(3)]
        stop = asyncio.Event()
        recorder_task = None
        try:
            for agent in agents:
                agent.start()
            assert len({agent.node_id for agent in agents}) == 3
            vias = [(await agent.status())["via"] for agent in agents]
            # The replica most agents heartbeat through dies; the watcher starts on it too.
            victim, survivor = (a, b) if vias.count(a.address) >= vias.count(b.address) else (b, a)
            watcher = Recorder([victim.address, survivor.address])
            recorder_task = asyncio.create_task(watcher.run(stop))
            async with Cluster.connect(survivor.address) as cluster:
                await wait_for(lambda: watcher.resyncs, what="the watcher's snapshot")
                await wait_for(lambda: _views_match(cluster, agents), timeout=10, what="views before the kill")
                before = {n.id: n for n in (await cluster.list_nodes()).nodes}
                killed_at = time.time()
                victim.kill()
                await asyncio.sleep(2 * TTL + 0.5)  # two leases' worth of heartbeats through the survivor
                listed = await cluster.list_nodes()
                after = {n.id: n for n in listed.nodes}
                for agent in agents:
                    node = after[agent.node_id]
                    assert node.state is NodeState.ONLINE, node
                    assert node.lease_id == before[agent.node_id].lease_id, "the agent joined again"
                    assert node.last_seen_time.timestamp() > killed_at + 2 * TTL, "heartbeats stopped"
                    assert agent.running(), agent.output()
                    assert not agent.lines_matching(REJOINED), agent.output()
                    assert (await agent.status())["via"] == survivor.address
                # Every local view converges to what ListNodes says, and so does the watcher.
                await wait_for(lambda: _views_match(cluster, agents), timeout=10, what="views to converge")
                listed = await cluster.list_nodes()
                await wait_for(lambda: watcher.through >= listed.revision, what="the watcher to catch up")
            stop.set()
            await recorder_task
            recorder_task = None
        finally:
            stop.set()
            if recorder_task is not None:
                recorder_task.cancel()
            stop_all(agents)

    # The watcher reconnected to the survivor and saw every revision once, without a gap.
    assert watcher.connections >= 2, watcher.errors
    assert len(watcher.resyncs) == 1
    first = watcher.resyncs[0].revision
    assert watcher.revisions == list(range(first + 1, first + 1 + len(watcher.revisions)))
    kinds = {ev.kind.rsplit(".", 1)[1] for ev in watcher.events}
    assert not kinds & {"NodeJoined", "NodeStateChanged", "NodeDeleted"}, kinds
    assert {k: comparable(v) for k, v in watcher.state.items()} == {
        n.id: comparable(_to_proto(n)) for n in listed.nodes
    }


def _to_proto(node: Node) -> node_pb2.Node:
    return node_pb2.Node(
        id=node.id,
        address=node.address,
        state=node.state.value,
        state_reason=node.state_reason,
        mode=node.mode.value,
        health=node.health.value,
        lease_id=node.lease_id,
        labels=node.labels,
    )


# -- (b) the database restarts; the control plane restarts --------------------------------------


async def test_agents_recover_from_a_database_restart_without_duplicate_nodes(own_pg) -> None:
    with servers(own_pg.url, 2) as (a, b):
        agents = [AgentProcess([a.address, b.address]) for _ in range(3)]
        try:
            for agent in agents:
                agent.start()
            ids = {agent.address: agent.node_id for agent in agents}
            await asyncio.sleep(0.5)
            own_pg.stop("fast")
            await asyncio.sleep(2.0)
            own_pg.start()
            async with Cluster.connect([a.address, b.address]) as cluster:

                async def recovered() -> bool:
                    nodes = {n.id: n for n in (await cluster.list_nodes()).nodes}
                    states = [(await agent.status())["state"] for agent in agents]
                    return all(nodes[i].state is NodeState.ONLINE for i in ids.values()) and set(states) == {
                        "connected"
                    }

                await wait_for(recovered, timeout=30, what="the agents to recover")
                await asyncio.sleep(2 * TTL)  # and stay recovered
                await wait_for(lambda: _views_match(cluster, agents), timeout=10, what="views to converge")
            for agent in agents:
                assert agent.running(), agent.output()
                assert (await agent.status())["node_id"] == agent.node_id
        finally:
            stop_all(agents)
        con = await asyncpg.connect(own_pg.url)
        try:
            rows = await con.fetch("SELECT address, id, state FROM registry.nodes ORDER BY id")
        finally:
            await con.close()
    assert {r["address"]: r["id"] for r in rows} == ids, "one row per address, ids unchanged"
    assert len(rows) == len(ids)


async def test_agents_ride_through_a_restart_of_the_whole_control_plane(database_url: str) -> None:
    with socket.socket() as sock:  # a fixed port, so that the restarted replica is where the agents look
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MUSTER_LISTEN": f"127.0.0.1:{port}"}
    server = ServerProcess(database_url, env=env).start()
    agents = [AgentProcess([server.address]) for _ in range(2)]
    try:
        for agent in agents:
            agent.start()
        server.kill()
        await asyncio.sleep(2 * TTL)  # longer than a lease, with no replica running
        server.stop()
        server = ServerProcess(database_url, env=env).start()
        async with Cluster.connect(server.address) as cluster:

            async def back() -> bool:
                nodes = {n.id: n for n in (await cluster.list_nodes()).nodes}
                states = {(await agent.status())["state"] for agent in agents}
                return states == {"connected"} and all(nodes[a.node_id].state is NodeState.ONLINE for a in agents)

            await wait_for(back, timeout=30, what="the agents to heartbeat again")
            listed = (await cluster.list_nodes()).nodes
        assert sorted((n.address, n.id) for n in listed) == sorted((a.address, a.node_id) for a in agents)
        for agent in agents:
            assert agent.running(), agent.output()
            assert agent.lines_matching("does not answer", stderr=True), agent.output()
    finally:
        stop_all(agents)
        server.stop()


# -- (c) a clean stop --------------------------------------------------------------------------


async def test_sigterm_leaves_offline_within_one_second(registry_server: ServerProcess) -> None:
    agent = AgentProcess([registry_server.address])
    try:
        agent.start()
        async with Cluster.connect(registry_server.address) as cluster:
            head = (await cluster.get_cluster()).head_revision
            async with cluster.watch(head, node_ids=[agent.node_id]) as events:
                await asyncio.sleep(0.3)  # mid-interval: the leave must not wait for the next heartbeat
                signalled = agent.signal(signal.SIGTERM)
                left = await _event(events, lambda e: e.node is not None and e.node.state is NodeState.OFFLINE)
            took = left.time.timestamp() - signalled
            print(f"\nSIGTERM to OFFLINE: {took * 1000:.0f} ms")
            assert took < 1.0, f"OFFLINE {took:.3f}s after SIGTERM"
            assert left.node.state_reason == "LEFT"
            assert await agent.exited(10) == 0, agent.output()
            assert (await cluster.get_node(agent.node_id)).state is NodeState.OFFLINE
        assert agent.lines_matching(LEFT) == [f"muster agent: node {agent.node_id} left (OFFLINE)"]
        assert not agent.socket_path.exists(), "the socket is removed"
        assert json.loads(agent.node_file.read_text())["id"] == agent.node_id, "node.json stays for `muster offline`"
    finally:
        agent.stop()


async def test_delete_node_on_exit_removes_the_node_within_one_second(registry_server: ServerProcess) -> None:
    agent = AgentProcess([registry_server.address], env={"MUSTER_DELETE_NODE_ON_EXIT": "1"})
    try:
        agent.start()
        async with Cluster.connect(registry_server.address) as cluster:
            head = (await cluster.get_cluster()).head_revision
            async with cluster.watch(head, node_ids=[agent.node_id]) as events:
                await asyncio.sleep(0.3)
                signalled = agent.signal(signal.SIGTERM)
                deleted = await _event(events, lambda e: e.kind == "NodeDeleted")
            took = deleted.time.timestamp() - signalled
            print(f"\nSIGTERM to deleted: {took * 1000:.0f} ms")
            assert took < 1.0, f"deleted {took:.3f}s after SIGTERM"
            assert await agent.exited(10) == 0, agent.output()
            with pytest.raises(E.NodeNotFoundError):
                await cluster.get_node(agent.node_id)
        assert agent.lines_matching(LEFT) == [f"muster agent: node {agent.node_id} left (deleted)"]
        assert not agent.node_file.exists() and not agent.socket_path.exists()
    finally:
        agent.stop()


# -- (d) an expired node comes back ------------------------------------------------------------


async def test_an_agent_frozen_past_its_lease_joins_again_with_the_same_id(registry_server: ServerProcess) -> None:
    agent = AgentProcess([registry_server.address])
    try:
        agent.start()
        first_lease = (await agent.status())["lease_id"]
        async with Cluster.connect(registry_server.address) as cluster:
            agent.signal(signal.SIGSTOP)

            async def expired() -> bool:
                node = await cluster.get_node(agent.node_id)
                return node.state is NodeState.OFFLINE and node.state_reason == "LEASE_EXPIRED"

            await wait_for(expired, timeout=10, what="the frozen agent's lease to expire")
            head = (await cluster.get_cluster()).head_revision
            async with cluster.watch(head, node_ids=[agent.node_id]) as events:
                resumed = agent.signal(signal.SIGCONT)
                joined = await _event(events, lambda e: e.kind == "NodeJoined")
            took = joined.time.timestamp() - resumed
            print(f"\nSIGCONT to joined again: {took * 1000:.0f} ms")
            assert took < 2.0
            m = await agent.line(REJOINED, 10)
            assert m[1] == "lease expired" and int(m[2]) == agent.node_id
            node = await cluster.get_node(agent.node_id)
            assert node.state is NodeState.ONLINE and node.lease_id != first_lease
            assert [n.address for n in (await cluster.list_nodes()).nodes] == [agent.address]
        status = await agent.status()
        assert (status["node_id"], status["lease_id"], status["rejoins"]) == (agent.node_id, node.lease_id, 1)
    finally:
        agent.stop()


async def test_an_agent_whose_node_was_deleted_joins_again_as_a_new_node(registry_server: ServerProcess) -> None:
    # Deletion is two steps (DELETING, then removed); a heartbeat between them must not make the
    # agent join back into the old row, undoing the operator's deletion. Several rounds, to hit it.
    agent = AgentProcess([registry_server.address])
    try:
        agent.start()
        node_id = agent.node_id
        async with Cluster.connect(registry_server.address) as cluster:
            for round_ in range(1, 6):
                await cluster.delete_node(node_id, force=True)
                await wait_for(lambda n=round_: len(agent.lines_matching(REJOINED)) == n, what="joining again")
                m = REJOINED.search(agent.lines_matching(REJOINED)[-1])
                assert m[1] == f"node {node_id} was removed from the cluster", agent.output()
                assert int(m[2]) != node_id
                node_id = int(m[2])
                assert (await cluster.get_node(node_id)).state is NodeState.ONLINE
                await wait_for(lambda n=node_id: json.loads(agent.node_file.read_text())["id"] == n, what="node.json")
            assert [n.id for n in (await cluster.list_nodes()).nodes] == [node_id]
    finally:
        agent.stop()


async def test_a_second_agent_on_the_same_address_makes_the_first_stop_instead_of_flapping(
    registry_server: ServerProcess,
) -> None:
    first = AgentProcess([registry_server.address], host_name="twin.example")
    second = AgentProcess([registry_server.address], host_name="twin.example")
    try:
        first.start()
        second.start()
        assert second.node_id == first.node_id
        assert await first.exited(30) == 1
        m = first.wait_line(r"another agent joined as node (\d+)", 5, stderr=True)
        assert int(m[1]) == first.node_id
        assert len(first.err) == 1, first.output()  # one line on stderr
        await asyncio.sleep(2 * TTL)  # nobody takes the node back
        status = await second.status()
        async with Cluster.connect(registry_server.address) as cluster:
            node = await cluster.get_node(second.node_id)
        assert node.state is NodeState.ONLINE and node.lease_id == status["lease_id"] and status["rejoins"] == 0
    finally:
        stop_all([first, second])


async def test_a_stale_heartbeat_batched_with_the_current_one_does_not_decide_its_answer(
    registry_server: ServerProcess,
) -> None:
    # The registry batches heartbeats (group commit); the stale twin's beat and the current one's
    # often share a batch. Each must get its own answer, or the current agent would stop too.
    async with Cluster.connect(registry_server.address) as cluster:
        old = await cluster.join_node("batched.example", 1)
        new = await cluster.join_node("batched.example", 1)
        for _ in range(30):
            stale, current = await asyncio.gather(
                cluster.heartbeat(old), cluster.heartbeat(new), return_exceptions=True
            )
            assert isinstance(stale, E.StaleLeaseError), stale
            assert not isinstance(current, BaseException), current


# -- (e) sessions --------------------------------------------------------------------------------


async def test_sessions_reported_on_the_socket_reach_the_registry(registry_server: ServerProcess) -> None:
    agent = AgentProcess([registry_server.address])
    try:
        agent.start()
        async with Cluster.connect(registry_server.address) as cluster:

            async def registry_count(n: int) -> bool:
                return (await cluster.get_node_status(agent.node_id)).session_count == n

            replies = await agent.requests(
                [
                    {"op": "session_started", "session": "s1", "pid": 101, "user": "ana"},
                    {"op": "session_started", "session": "s2"},
                    {"op": "session_started", "session": "s1", "pid": 101, "user": "ana"},  # reported twice
                    {"op": "session_ended", "session": "never-started"},
                ]
            )
            assert [r["sessions"] for r in replies] == [1, 2, 2, 2] and all(r["ok"] for r in replies)
            await wait_for(lambda: registry_count(2), timeout=5, what="two sessions in the registry")
            assert (await agent.request({"op": "session_ended", "session": "s1"}))["sessions"] == 1
            await wait_for(lambda: registry_count(1), timeout=5, what="one session in the registry")
            assert (await agent.request({"op": "set_session_count", "count": 7}))["sessions"] == 7
            await wait_for(lambda: registry_count(7), timeout=5, what="seven sessions in the registry")
            loads = {x.node_id: x.load for x in await cluster.list_node_loads()}
            assert loads[agent.node_id].cpu_count == os.cpu_count()
            assert loads[agent.node_id].session_count == 7

        bad = [
            b"not json\n",
            b"[1, 2]\n",
            {"op": "launch"},
            {"no": "op"},
            {"op": "session_started"},
            {"op": "session_started", "session": ""},
            {"op": "session_started", "session": "s9", "pid": "x"},
            {"op": "session_started", "session": "s9", "pid": -1},
            {"op": "session_started", "session": "s9", "user": 5},
            {"op": "session_ended", "session": 3},
            {"op": "set_session_count", "count": -1},
            {"op": "set_session_count", "count": True},
            b'{"op": "status"\n',
        ]
        replies = await agent.requests(bad)
        assert all(r["ok"] is False and r["error"] for r in replies), replies
        # A line longer than the limit is refused and its connection closed; the agent goes on.
        reply = await agent.request(b'{"op": "status", "x": "' + b"y" * 100_000 + b'"}\n')
        assert reply["ok"] is False and "at most" in reply["error"]
        status = await agent.status()
        assert status["sessions"] == 7 and status["node_id"] == agent.node_id and status["state"] == "connected"
        assert agent.running()
    finally:
        agent.stop()


# -- (f) the state directory -------------------------------------------------------------------


async def test_node_json_and_the_socket_are_private_and_name_the_node(registry_server: ServerProcess) -> None:
    base = Path(tempfile.mkdtemp(prefix="ma-"))
    state = base / "new" / "state"  # created by the agent
    agent = AgentProcess([registry_server.address], state_dir=state)
    again = AgentProcess([registry_server.address], host_name=agent.host_name, state_dir=state)
    try:
        agent.start()
        data = json.loads(agent.node_file.read_text())
        assert data == {"id": agent.node_id, "address": agent.address, "host": agent.host_name, "port": 8787}
        assert stat.S_IMODE(agent.node_file.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(agent.socket_path.stat().st_mode)
        assert stat.S_IMODE(agent.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert not [p.name for p in state.iterdir() if p.name not in {"node.json", "agent.sock"}]

        # A second agent on the same state directory refuses to start, and leaves the first alone.
        clash = AgentProcess([registry_server.address], state_dir=state)
        try:
            clash.start(wait_joined=False)
            assert clash.wait(30) == 1
            assert clash.lines_matching("another agent serves", stderr=True), clash.output()
        finally:
            clash.stop()
        assert (await agent.status())["node_id"] == agent.node_id

        # Restarted on the same address: the same id, the same file.
        agent.stop()
        again.start()
        assert again.node_id == agent.node_id
        assert json.loads(again.node_file.read_text())["id"] == agent.node_id
    finally:
        stop_all([agent, again])
        import shutil

        shutil.rmtree(base, ignore_errors=True)


# -- refusals and the command line -------------------------------------------------------------


async def test_a_full_cluster_refuses_the_agent_with_what_to_do(database_url: str) -> None:
    server = ServerProcess(database_url, env={"MUSTER_MAX_NODES": "1"}).start()
    agent = AgentProcess([server.address])
    try:
        async with Cluster.connect(server.address) as cluster:
            await cluster.join_node("first.example", 1)
        agent.start(wait_joined=False)
        assert agent.wait(30) == 1
        assert len(agent.err) == 1, agent.output()  # one line on stderr
        assert "node limit (1) is reached" in agent.err[0][1] and "MUSTER_MAX_NODES" in agent.err[0][1]
    finally:
        agent.stop()
        server.stop()


def test_help_names_every_option_and_its_variable() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "muster.cli.main", "agent", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    for option, variable in [
        ("--host-name", "MUSTER_HOST_NAME"),
        ("--listen-address", "MUSTER_LISTEN_ADDRESS"),
        ("--port", "MUSTER_PORT"),
        ("--label", "MUSTER_LABELS"),
        ("--state-dir", "MUSTER_STATE_DIR"),
        ("--delete-node-on-exit", "MUSTER_DELETE_NODE_ON_EXIT"),
        ("--address", "MUSTER_ADDRESS"),
    ]:
        assert option in out.stdout and variable in out.stdout, (option, out.stdout)


def test_a_bad_label_is_refused_before_anything_starts() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    out = subprocess.run(
        [sys.executable, "-m", "muster.cli.main", "agent", "--label", "novalue", "--address", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("muster agent: bad label 'novalue': write key=value")


async def test_options_come_from_muster_variables(registry_server: ServerProcess) -> None:
    agent = AgentProcess(
        [registry_server.address],
        host_name=None,
        port=None,
        env={"MUSTER_HOST_NAME": "from-env.example", "MUSTER_PORT": "9001", "MUSTER_LABELS": "zone=a, rack=3"},
    )
    try:
        agent.start()
        assert agent.address == "from-env.example:9001" and agent.strategy == "host name"
        async with Cluster.connect(registry_server.address) as cluster:
            node = await cluster.get_node(agent.node_id)
        assert node.labels == {"zone": "a", "rack": "3"}
    finally:
        agent.stop()


# -- embedding ----------------------------------------------------------------------------------


async def test_an_application_embeds_the_agent(registry_server: ServerProcess) -> None:
    state = Path(tempfile.mkdtemp(prefix="ma-"))
    config = AgentConfig(
        addresses=registry_server.address, port=7001, labels={"app": "ide"}, state_dir=state, serve_socket=False
    )

    def resolver(**kwargs: object) -> ResolvedAddress:
        assert kwargs == {"port": 7001, "host_name": None, "listen_address": None}
        return ResolvedAddress("embedded.example", 7001, "", "interfaces")

    changes = []
    try:
        async with Cluster.connect(registry_server.address) as cluster:
            async with Agent(cluster, config, resolver=resolver) as agent:
                assert agent.node_id is not None and agent.state == "connected"
                agent.on_change(changes.append)
                agent.session_started("a", pid=1, user="u")
                agent.session_started("b")
                agent.session_ended("a")
                await wait_for(
                    lambda: agent.view is not None and agent.node_id in agent.view.nodes, what="the agent's view"
                )
                await wait_for(lambda: _session_count(cluster, agent.node_id, 1), timeout=5, what="the session count")
                with pytest.raises(ValueError):
                    agent.set_session_count(-1)
                node_id = agent.node_id
            assert agent.state == "stopped"
            node = await cluster.get_node(node_id)
            assert node.state is NodeState.OFFLINE and node.labels == {"app": "ide"}
            assert node.address == "embedded.example:7001"
        assert not (state / "agent.sock").exists()
        assert json.loads((state / "node.json").read_text())["id"] == node_id

        # Without a Cluster of its own, the agent connects to config.addresses; run(stop) until stop is set.
        own = Agent(None, AgentConfig(addresses=registry_server.address, host_name="own.example", state_dir=state))
        stop = asyncio.Event()
        runner = asyncio.create_task(own.run(stop))
        lease = await asyncio.wait_for(own.wait_joined(), 10)
        assert (await _status_over_socket(state / "agent.sock"))["node_id"] == lease.node_id
        stop.set()
        await asyncio.wait_for(runner, 10)
        async with Cluster.connect(registry_server.address) as cluster:
            assert (await cluster.get_node(lease.node_id)).state is NodeState.OFFLINE
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)


async def _status_over_socket(path: Path) -> dict:
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(b'{"op": "status"}\n')
        return json.loads(await reader.readline())
    finally:
        writer.close()


async def _session_count(cluster: Cluster, node_id: int, n: int) -> bool:
    return (await cluster.get_node_status(node_id)).session_count == n


def test_the_joined_line_is_what_the_helper_reads() -> None:
    line = "muster agent: node 3 joined as 10.0.0.5:8787 (found by interfaces) via 127.0.0.1:7400"
    m = JOINED.search(line)
    assert m is not None and (m[1], m[2], m[3], m[4]) == ("3", "10.0.0.5:8787", "interfaces", "127.0.0.1:7400")
