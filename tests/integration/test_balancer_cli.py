"""The balancer's operator commands (status, place, sessions, route, balancer set-strategy), run as the
real `muster` command against a real server process (registry, keys and balancer, with tokens).

Nodes are set up through the client: some heartbeat from a task of the test (so that one that does
not misses its check-in and shows as unreachable), one is drained, one has left. Every command runs
as a subprocess and is read the way a script or a person would read it. Every wait is bounded and
every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import shlex
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from harness import ServerProcess, wait_for

from muster.client import Cluster, ClusterStatus, Lease, Load, NodeMode
from muster.client import errors as E

_SCRIPT = Path(sys.executable).with_name("muster")
MUSTER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "muster.cli.main"]
NODE_TOKEN = "node-secret-token-balancer-4c2e"
ADMIN_TOKEN = "admin-secret-token-balancer-8a1f"
AS_NODE = {"MUSTER_TOKEN": NODE_TOKEN}
AS_ADMIN = {"MUSTER_ADMIN_TOKEN": ADMIN_TOKEN}
# A short check-in window (a node that does not heartbeat is unreachable after 3 s) and a long lease
# (it stays ONLINE, so it is not fenced and its sessions are not moved while the test runs).
TIMING = {"MUSTER_HEARTBEAT_INTERVAL": "1s", "MUSTER_CHECK_IN_WINDOW": "3s", "MUSTER_LEASE_TTL": "120s"}
HEARTBEAT_EVERY = 0.5
FORGED = "0" * 32 + ".n1"


def server_env() -> dict[str, str]:
    return {
        "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "MUSTER_NODE_TOKEN": NODE_TOKEN,
        "MUSTER_ADMIN_TOKEN": ADMIN_TOKEN,
        **TIMING,
    }


# -- running the command (as tests/integration/test_cli.py does) ---------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str

    def ok(self) -> str:
        """Stdout of a command that succeeded quietly."""
        assert self.code == 0, (self.code, self.out, self.err)
        assert self.err == "", self.err
        return self.out

    def one_error_line(self) -> str:
        """The failure's reason: exit 1, nothing on stdout, one `muster: ...` line on stderr."""
        assert self.code == 1, (self.code, self.out, self.err)
        assert self.out == "", self.out
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("muster: "), self.err
        return lines[0]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env.update(GRPC_VERBOSITY="ERROR")
    env.update(extra or {})
    return env


async def muster(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> Result:
    """Runs `muster ARGS` to the end (stdin not a terminal) within ``timeout`` seconds."""
    proc = await asyncio.create_subprocess_exec(
        *MUSTER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(env),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"muster {shlex.join(args)} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


# -- the cluster -------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def heartbeating(cluster: Cluster, leases: dict[int, tuple[Lease, Load]]) -> AsyncIterator[None]:
    """Heartbeats every node in ``leases`` (with its load) until the block ends; remove one to stop it."""

    async def beat() -> None:
        while True:
            for lease, load in list(leases.values()):
                with contextlib.suppress(E.MusterError):
                    await cluster.heartbeat(lease, load)
            await asyncio.sleep(HEARTBEAT_EVERY)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def status_when(cluster: Cluster, ready: Callable[[ClusterStatus], bool], what: str) -> ClusterStatus:
    """The status view once ``ready(status)`` holds (the balancer loads its node view after start)."""

    async def probe() -> ClusterStatus | None:
        try:
            status = await cluster.status()
        except E.UnavailableError:
            return None
        return status if ready(status) else None

    return await wait_for(probe, timeout=20, interval=0.2, what=what)


def flags(status: ClusterStatus) -> dict[str, tuple[bool, bool, bool]]:
    return {n.address: (n.unreachable, n.draining, n.offline) for n in status.nodes}


L1 = Load(0.45, 0.66, 0.32, 4)
L2 = Load(1.5, 0.666, 0.0, 2)
L4 = Load(0.03, 0.38, 0.24, 2)


async def test_status_place_sessions_and_route_commands(database_url: str) -> None:
    server = ServerProcess(database_url, ["registry,keys,balancer"], env=server_env()).start()

    async def cli(*args: str) -> Result:
        return await muster(*args, "--address", server.address, env=AS_NODE)

    try:
        async with Cluster.connect(server.address, token=ADMIN_TOKEN) as cluster:
            n1 = await cluster.join_node("10.0.0.1", 8787, labels={"zone": "a"}, load=L1)
            n2 = await cluster.join_node("10.0.0.2", 8787, labels={"zone": "b"}, load=L2)
            n3 = await cluster.join_node("10.0.0.3", 8787)  # never heartbeats: unreachable after 3 s
            n4 = await cluster.join_node("10.0.0.4", 8787, load=L4)
            n5 = await cluster.join_node("10.0.0.5", 8787)
            id1, id2, id3, id4, id5 = (x.node_id for x in (n1, n2, n3, n4, n5))
            await cluster.set_node_mode(id4, NodeMode.DRAINING)
            await cluster.leave_node(n5)
            beating = {id1: (n1, L1), id2: (n2, L2), id4: (n4, L4)}
            async with heartbeating(cluster, beating):
                want = {
                    "10.0.0.1:8787": (False, False, False),
                    "10.0.0.2:8787": (False, False, False),
                    "10.0.0.3:8787": (True, False, False),
                    "10.0.0.4:8787": (False, True, False),
                    "10.0.0.5:8787": (False, False, True),
                }
                await status_when(cluster, lambda s: flags(s) == want, "node 3 unreachable, 4 draining, 5 offline")

                alice = await cluster.place_session("alice", labels={"zone": "a"})
                bob = await cluster.place_session("bob", labels={"zone": "a"})
                assert alice.node_id == bob.node_id == id1
                await cluster.report_session_started(id1, alice.session.id, pid=12108, user="alice")

                # -- status: the exact lines, ONLINE nodes first
                out = (await cli("status")).ok()
                assert out.splitlines() == [
                    "10.0.0.1:8787 Load: 0.45, 0.66, 0.32",
                    "  12108 - alice",
                    "  placed - bob",
                    "10.0.0.2:8787 Load: 1.5, 0.67, 0",
                    "10.0.0.3:8787 (unreachable) Load: 0, 0, 0",
                    "10.0.0.4:8787 (draining) Load: 0.03, 0.38, 0.24",
                    "10.0.0.5:8787 (offline) Load: 0, 0, 0",
                ], out

                doc = json.loads((await cli("status", "--json")).ok())
                assert doc["strategy"] == "sessions"
                assert [n["node_id"] for n in doc["nodes"]] == [id1, id2, id3, id4, id5]
                node_keys = {"node_id", "address", "route", "state", "unreachable", "draining", "offline"}
                node_keys |= {"load", "cpu_count", "sessions"}
                for n in doc["nodes"]:
                    assert set(n) == node_keys, n
                first = doc["nodes"][0]
                assert first["address"] == "10.0.0.1:8787" and first["route"] == f"n{id1}"
                assert first["state"] == "ONLINE" and first["cpu_count"] == 4
                assert first["load"] == [0.45, 0.66, 0.32]
                assert first["sessions"] == [
                    {"id": alice.session.id, "pid": 12108, "user": "alice", "kind": "", "state": "STARTED"},
                    {"id": bob.session.id, "pid": 0, "user": "bob", "kind": "", "state": "PLACED"},
                ]
                assert [(n["unreachable"], n["draining"], n["offline"]) for n in doc["nodes"]] == list(want.values())
                assert doc["nodes"][4]["state"] == "OFFLINE"

                # -- place: JSON, then the human summary, a dry run, and no eligible node
                placed = json.loads((await cli("place", "--user", "carol", "--json")).ok())
                assert set(placed) == {
                    "session_id",
                    "node",
                    "strategy",
                    "candidates",
                    "excluded",
                    "fallback",
                    "dry_run",
                }
                assert placed["node"] == {"id": id2, "address": "10.0.0.2:8787"}
                assert placed["strategy"] == "sessions" and placed["dry_run"] is False and placed["fallback"] == ""
                assert placed["session_id"].endswith(f".n{id2}")
                assert placed["candidates"] == [{"node_id": id2, "score": 0.0}, {"node_id": id1, "score": 2.0}]
                assert placed["excluded"] == [
                    {"node_id": id3, "reason": "missed_check_in"},
                    {"node_id": id4, "reason": "draining"},
                    {"node_id": id5, "reason": "offline"},
                ]
                carol = placed["session_id"]

                out = (await cli("place", "--user", "erin", "--kind", "rstudio", "--label", "zone=a")).ok()
                lines = out.splitlines()
                head = lines[0].split()
                assert head[0] == "Session" and head[2:] == f"placed on node {id1} (10.0.0.1:8787) by sessions".split()
                erin = head[1]
                assert lines[1].split() == ["Node", "Address", "Score", "Sessions", "Chosen"]
                rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
                assert rows[str(id1)] == ["10.0.0.1:8787", "2", "2", "*"]
                assert rows[str(id2)] == ["10.0.0.2:8787", "-", "-", "excluded:", "labels"]
                assert rows[str(id3)] == ["10.0.0.3:8787", "-", "-", "excluded:", "missed", "check-in"]
                assert rows[str(id4)] == ["10.0.0.4:8787", "-", "-", "excluded:", "draining"]
                assert rows[str(id5)] == ["10.0.0.5:8787", "-", "-", "excluded:", "offline"]

                out = (await cli("place", "--user", "dave", "--dry-run")).ok()
                head = out.splitlines()[0].split()
                assert head[2:] == f"would be placed on node {id2} (10.0.0.2:8787) by sessions".split(), out
                dry = json.loads((await cli("place", "--user", "dave", "--dry-run", "--json")).ok())
                assert dry["dry_run"] is True and dry["node"]["id"] == id2
                assert len(await cluster.list_sessions()) == 4  # alice, bob, erin, carol: the dry runs reserved nothing

                err = (await cli("place", "--user", "zed", "--label", "zone=c")).one_error_line()
                assert err.startswith("muster: no node can take the session:"), err
                assert "labels required: zone=c" in err, err
                assert (await cli("place", "--user", "zed", "--label", "nolabel")).code == 2

                # -- sessions: JSON list, one node's, the table
                listed = json.loads((await cli("sessions", "--json")).ok())
                assert [(s["id"], s["node_id"], s["user"], s["state"], s["pid"]) for s in listed] == [
                    (alice.session.id, id1, "alice", "STARTED", 12108),
                    (bob.session.id, id1, "bob", "PLACED", 0),
                    (erin, id1, "erin", "PLACED", 0),
                    (carol, id2, "carol", "PLACED", 0),
                ]
                assert listed[2]["kind"] == "rstudio" and listed[0]["node_address"] == "10.0.0.1:8787"
                assert listed[0]["place_time"] and listed[0]["start_time"] and listed[1]["start_time"] is None
                only2 = json.loads((await cli("sessions", "--node", str(id2), "--json")).ok())
                assert [s["id"] for s in only2] == [carol]
                table = (await cli("sessions")).ok().splitlines()
                assert table[0].split() == ["ID", "Node", "User", "Kind", "State", "PID", "Placed"]
                cells = [line.split() for line in table[1:]]
                assert [c[:6] for c in cells] == [
                    [alice.session.id, str(id1), "alice", "-", "Started", "12108"],
                    [bob.session.id, str(id1), "bob", "-", "Placed", "-"],
                    [erin, str(id1), "erin", "rstudio", "Placed", "-"],
                    [carol, str(id2), "carol", "-", "Placed", "-"],
                ]
                empty = await cli("sessions", "--node", str(id4))
                assert empty.ok() == "No sessions.\n"

                # -- route: a session's node; a forged id; a moved session
                out = (await cli("route", alice.session.id)).ok()
                assert out == f"{alice.session.id} -> node {id1} (10.0.0.1:8787)\n"
                routed = json.loads((await cli("route", carol, "--json")).ok())
                assert routed["node"] == {"id": id2, "address": "10.0.0.2:8787"} and routed["moved"] is False
                err = (await cli("route", FORGED)).one_error_line()
                assert "is not a session id this cluster issued" in err, err

                del beating[id2]
                await cluster.leave_node(n2)  # OFFLINE: carol's session moves to node 1, the only candidate

                async def moved() -> bool:
                    return (await cluster.route_session(carol))[1]

                await wait_for(moved, timeout=15, interval=0.2, what="carol's session moved off node 2")
                out = (await cli("route", carol)).ok()
                new_id, arrow, *rest = out.split()
                assert new_id != carol and new_id.endswith(f".n{id1}") and arrow == "->", out
                assert " ".join(rest) == f"node {id1} (10.0.0.1:8787) (moved from {carol})", out
                routed = json.loads((await cli("route", carol, "--json")).ok())
                assert routed["moved"] is True and routed["session"]["id"] == new_id
                assert routed["session"]["moved_from"] == carol
    finally:
        server.stop()


async def test_set_strategy_needs_the_admin_token(database_url: str) -> None:
    server = ServerProcess(database_url, ["registry,keys,balancer"], env=server_env()).start()
    addr = ["--address", server.address]
    try:
        async with Cluster.connect(server.address, token=ADMIN_TOKEN) as cluster:
            n1 = await cluster.join_node("10.0.0.1", 8787, load=L1)
            async with heartbeating(cluster, {n1.node_id: (n1, L1)}):  # else it misses its check-in after 3 s
                await status_when(cluster, lambda s: len(s.nodes) == 1, "the balancer to see the node")

                out = (await muster("balancer", "set-strategy", "system-load", *addr, env=AS_ADMIN)).ok()
                assert out == "Placement strategy: system-load (was sessions)\n"
                out = (await muster("balancer", "set-strategy", "user-hash", "--json", *addr, env=AS_ADMIN)).ok()
                assert json.loads(out) == {"strategy": "user-hash", "previous": "system-load"}

                refused = await muster("balancer", "set-strategy", "sessions", *addr, env=AS_NODE)
                assert "admin" in refused.one_error_line().lower(), refused.err
                custom = await muster("balancer", "set-strategy", "custom", *addr, env=AS_ADMIN)
                assert "balancer_custom" in custom.one_error_line(), custom.err
                bad = await muster("balancer", "set-strategy", "fastest", *addr, env=AS_ADMIN)
                assert bad.code == 2 and bad.out == "", bad

                doc = json.loads((await muster("status", "--json", *addr, env=AS_NODE)).ok())
                assert doc["strategy"] == "user-hash"
                placed = json.loads((await muster("place", "--user", "alice", "--json", *addr, env=AS_NODE)).ok())
                assert placed["strategy"] == "user-hash"
                assert (await muster("balancer", "set-strategy", "sessions", *addr, env=AS_ADMIN)).ok() == (
                    "Placement strategy: sessions (was user-hash)\n"
                )
    finally:
        server.stop()


async def test_commands_say_when_the_control_plane_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    for args in (["status"], ["sessions"], ["place", "--user", "alice"], ["route", FORGED]):
        err = (await muster(*args, "--address", address, timeout=60)).one_error_line()
        assert "unreachable" in err and "--address" in err, err


async def test_every_balancer_command_has_help() -> None:
    for args in (["status"], ["place"], ["sessions"], ["route"], ["balancer"], ["balancer", "set-strategy"]):
        out = (await muster(*args, "--help")).ok()
        assert out.startswith("Usage: muster "), out
        assert len(out.splitlines()) > 4, out


# -- a node's sessions: one count in every command and refusal ----------------------------------------


async def test_a_nodes_sessions_are_the_balancers_in_every_command(database_url: str) -> None:
    """Issue 19, as an operator meets it: placements on three nodes; `list-nodes` counts what
    `muster sessions` lists (placed and started alike, an adopted session once); a drained node keeps
    its count; `delete-node` refuses an ONLINE node with sessions and `--force` moves them to the other
    nodes exactly once (their old ids routed to the new nodes), or ends them where none can take them."""
    server = ServerProcess(database_url, ["registry,keys,balancer"], env=server_env()).start()

    async def cli(*args: str, admin: bool = False) -> Result:
        return await muster(*args, "--address", server.address, env=AS_ADMIN if admin else AS_NODE)

    async def listed_counts() -> dict[int, int]:
        doc = json.loads((await cli("list-nodes", "--json")).ok())
        return {n["id"]: n["sessions"] for n in doc["nodes"]}

    async def sessions_by_node() -> tuple[list[dict[str, object]], dict[int, int]]:
        listed = json.loads((await cli("sessions", "--json")).ok())
        counts: dict[int, int] = {}
        for s in listed:
            counts[int(s["node_id"])] = counts.get(int(s["node_id"]), 0) + 1  # type: ignore[call-overload]
        return listed, counts

    try:
        async with Cluster.connect(server.address, token=ADMIN_TOKEN) as cluster:
            leases = [await cluster.join_node(f"10.0.1.{i}", 8787, load=L1) for i in (1, 2, 3)]
            id1, id2, id3 = (x.node_id for x in leases)
            beating = {x.node_id: (x, L1) for x in leases}
            async with heartbeating(cluster, beating):
                await status_when(
                    cluster, lambda s: sum(not n.offline and not n.unreachable for n in s.nodes) == 3, "three nodes"
                )
                for i in range(9):
                    (await cli("place", "--user", f"user{i}")).ok()
                listed, by_node = await sessions_by_node()
                assert by_node == {id1: 3, id2: 3, id3: 3}, by_node
                assert await listed_counts() == by_node  # placed, not started: counted all the same

                # Started ones stay counted once; an adopted session (started without placement,
                # reported by its node) counts once too, although the agent reports it as well.
                on1 = [s for s in listed if s["node_id"] == id1]
                await cluster.report_session_started(id1, str(on1[0]["id"]), pid=4242, user=str(on1[0]["user"]))
                await cluster.report_session_started(id1, "adopted-session.n1", pid=4343, user="root")
                beating[id1] = (leases[0], Load(0.45, 0.66, 0.32, 4, 2))  # the agent reports its 2 started ones
                listed, by_node = await sessions_by_node()
                assert by_node == {id1: 4, id2: 3, id3: 3}, by_node
                assert await listed_counts() == by_node
                table = (await cli("list-nodes")).ok().splitlines()
                assert table[0].split()[-1] == "Sessions"
                assert {int(line.split()[0]): int(line.split()[-1]) for line in table[1:]} == by_node, table

                # node-status shows both counts when the agent's own differs, and says who misses reports.
                async def agent_reports_two() -> str | None:
                    out = (await cli("node-status", str(id1))).ok()
                    return out if "agent reports 2" in out else None

                out = await wait_for(agent_reports_two, timeout=10, interval=0.3, what="node 1's heartbeat count")
                line = next(x for x in out.splitlines() if x.strip().startswith("Sessions"))
                assert line.split()[1] == "4" and "2 placed, not started yet" in line, line
                assert "the agent is missing reports" in line, line
                doc = json.loads((await cli("node-status", str(id1), "--json")).ok())
                assert (doc["sessions"], doc["placed_sessions"], doc["reported_sessions"]) == (4, 2, 2), doc

                # The status view: pid - user for started sessions, a line for each placed one.
                status_out = (await cli("status")).ok().splitlines()
                at = status_out.index(next(x for x in status_out if x.startswith("10.0.1.1:8787")))
                node1_lines = status_out[at + 1 : at + 5]
                assert sorted(x.split(" - ")[0].strip() for x in node1_lines) == ["4242", "4343", "placed", "placed"]

                # A drained node keeps its sessions, and its count.
                (await cli("offline", str(id3), admin=True)).ok()
                assert (await listed_counts())[id3] == 3

                # delete-node refuses an ONLINE node with sessions, naming how many and `muster offline`.
                err = (await cli("delete-node", str(id1), admin=True)).one_error_line()
                assert "4 sessions" in err and f"muster offline {id1}" in err, err
                assert (await listed_counts())[id1] == 4

                # --force moves them to the other nodes as a failover does, exactly once.
                (await cli("online", str(id3), admin=True)).ok()
                before = {str(s["id"]) for s in listed if s["node_id"] == id1}
                out = (await cli("delete-node", str(id1), "--force", admin=True)).ok()
                assert out.splitlines()[0] == f"Node {id1} deleted.", out
                assert "4 sessions moved to other nodes" in out, out
                del beating[id1]
                listed, by_node = await sessions_by_node()
                assert sum(by_node.values()) == 10 and set(by_node) == {id2, id3}, by_node
                moved = [s for s in listed if s["moved_from"] in before]
                assert sorted(str(s["moved_from"]) for s in moved) == sorted(before)  # each once, none lost
                for old in before - {"adopted-session.n1"}:  # (an adopted id is not signed: not routable)
                    out = (await cli("route", old)).ok()
                    new_id = out.split()[0]
                    assert new_id != old and f"(moved from {old})" in out, out
                    assert [s["id"] for s in moved if s["moved_from"] == old] == [new_id]
                assert await listed_counts() == by_node
                await asyncio.sleep(2.5)  # a failover sweep (every 2 s) moves nothing twice
                assert (await sessions_by_node())[1] == by_node

                # Where no other node can take them (node 3 drained), they end, and the output says so.
                (await cli("offline", str(id3), admin=True)).ok()
                n2 = by_node[id2]
                out = (await cli("delete-node", str(id2), "--force", "--json", admin=True)).ok()
                doc = json.loads(out)
                assert (doc["sessions"], doc["moved_sessions"], doc["ended_sessions"]) == (n2, 0, n2), doc
                del beating[id2]
                assert (await sessions_by_node())[1] == {id3: by_node[id3]}
                assert await listed_counts() == {id3: by_node[id3]}
                err = (await cli("delete-node", str(id3), admin=True)).one_error_line()  # drained, still ONLINE
                assert f"{by_node[id3]} sessions" in err, err
                out = (await cli("delete-node", str(id3), "--force", admin=True)).ok()
                assert f"{by_node[id3]} sessions ended: no other node could take them" in out, out
                assert (await sessions_by_node())[1] == {}
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_registry_apart_from_the_balancer_counts_and_moves_through_its_api(database_url: str) -> None:
    """`muster serve` one service per process: the registry learns the sessions from the balancer's
    CountSessions and events, and a forced delete moves them through its EvacuateNode, over gRPC."""
    reg_port, bal_port = _free_port(), _free_port()
    reg, bal = f"127.0.0.1:{reg_port}", f"127.0.0.1:{bal_port}"
    env = server_env()
    registry = ServerProcess(
        database_url, ["registry,keys"], env={**env, "MUSTER_LISTEN": reg, "MUSTER_BALANCER_ADDRESS": bal}
    ).start()
    balancer = None
    try:
        balancer = ServerProcess(
            database_url,
            ["balancer"],
            env={**env, "MUSTER_LISTEN": bal, "MUSTER_REGISTRY_ADDRESS": reg, "MUSTER_KEYS_ADDRESS": reg},
        ).start()
        async with Cluster.connect(reg, token=ADMIN_TOKEN) as cluster, Cluster.connect(bal, token=ADMIN_TOKEN) as b:
            leases = [await cluster.join_node(f"10.0.2.{i}", 8787, load=L1) for i in (1, 2)]
            id1, id2 = (x.node_id for x in leases)
            async with heartbeating(cluster, {x.node_id: (x, L1) for x in leases}):
                await status_when(b, lambda s: sum(not n.offline for n in s.nodes) == 2, "the balancer's two nodes")
                for i in range(4):
                    (await muster("place", "--user", f"u{i}", "--address", bal, env=AS_NODE)).ok()

                async def counted() -> dict[int, int] | None:
                    out = await muster("list-nodes", "--json", "--address", reg, env=AS_NODE)
                    counts = {n["id"]: n["sessions"] for n in json.loads(out.ok())["nodes"]}
                    return counts if counts == {id1: 2, id2: 2} else None

                # (the registry started before the balancer: it asks again for the counts within seconds)
                await wait_for(counted, timeout=20, interval=0.3, what="the registry counting the balancer's sessions")
                err = (await muster("delete-node", str(id1), "--address", reg, env=AS_ADMIN)).one_error_line()
                assert "2 sessions" in err, err
                out = (await muster("delete-node", str(id1), "--force", "--address", reg, env=AS_ADMIN)).ok()
                assert "2 sessions moved to other nodes" in out, out
                sessions = await b.list_sessions()
                assert [s.node_id for s in sessions] == [id2] * 4
                assert sum(1 for s in sessions if s.moved_from) == 2
    finally:
        if balancer is not None:
            balancer.stop()
        registry.stop()


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


async def test_reset_cluster_says_how_many_sessions_will_end_and_ends_them(database_url: str) -> None:
    server = ServerProcess(database_url, ["registry,keys,balancer"], env=server_env()).start()
    try:
        async with Cluster.connect(server.address, token=ADMIN_TOKEN) as cluster:
            lease = await cluster.join_node("10.0.3.1", 8787, load=L1)
            async with heartbeating(cluster, {lease.node_id: (lease, L1)}):
                await status_when(cluster, lambda s: any(not n.offline for n in s.nodes), "the balancer's node")
                placed = await cluster.place_session("alice")
                await cluster.place_session("bob")
                await cluster.report_session_started(lease.node_id, placed.session.id, pid=7, user="alice")
                master, slave = os.openpty()
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *MUSTER,
                        "reset-cluster",
                        "--address",
                        server.address,
                        stdin=slave,
                        stdout=slave,
                        stderr=slave,
                        env=_env(AS_ADMIN),
                    )
                    os.close(slave)
                    slave = -1
                    prompt = await asyncio.to_thread(_read_until, master, b"[y/N]", 20.0)
                    assert b"This removes 1 node and the cluster definition, keys included; 2 sessions will end" in (
                        prompt.replace(b"\r\n", b" ").replace(b"\n", b" ")
                    ), prompt
                    os.write(master, b"y\n")
                    rest = await asyncio.to_thread(_read_until, master, b"\x00never\x00", 5.0)
                    async with asyncio.timeout(20):
                        assert await proc.wait() == 0, rest
                finally:
                    os.close(master)
                    if slave >= 0:
                        os.close(slave)

            async def ended() -> bool:
                return await cluster.list_sessions() == []

            await wait_for(ended, timeout=15, interval=0.2, what="every session ended by the reset")
    finally:
        server.stop()
