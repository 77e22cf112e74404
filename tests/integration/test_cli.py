"""The operator commands, run as the real `muster` command against a real registry process.

Nodes are set up through the client; every command runs as a subprocess (stdin not a terminal unless
a test gives it one) and is read as a script would read it: the table by its header's columns, the
JSON as JSON. Every wait is bounded and every process started here is stopped here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import shlex
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import ServerProcess, wait_for

from muster.client import Cluster, Health, Lease, Load, NodeMode, NodeState
from muster.client import errors as E

_SCRIPT = Path(sys.executable).with_name("muster")
MUSTER = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "muster.cli.main"]
COMMANDS = ["list-nodes", "delete-node", "node-status", "reset-cluster", "offline", "online", "watch"]
COLUMNS = ["ID", "Host", "IPv4", "Port", "Status", "Mode", "Last seen", "Sessions"]
NODE_KEYS = {
    "id",
    "address",
    "host",
    "ipv4",
    "port",
    "status",
    "health",
    "mode",
    "reason",
    "last_seen",
    "load",
    "sessions",
    "placed_sessions",
    "reported_sessions",
    "message",
    "details",
}
READABLE = {
    "ONLINE": "Online",
    "OFFLINE": "Offline",
    "INVALID_LICENSE": "Invalid license",
    "MISSED_CHECK_IN": "Missed check-in",
    "DELETING": "Deleting",
}
# A node with nothing to do: nobody's state dir, so that an id-less command never finds a real node.json.
NO_STATE_DIR = str(Path(tempfile.gettempdir()) / f"muster-test-no-state-{os.getpid()}")


# -- running the command -----------------------------------------------------------------------------


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_error_line(self) -> str:
        """The failure's reason: a non-zero exit, nothing on stdout, one `muster: ...` line on stderr."""
        assert self.code != 0, (self.out, self.err)
        assert self.out == "", self.out
        lines = self.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("muster: "), self.err
        return lines[0]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env.update(GRPC_VERBOSITY="ERROR", MUSTER_STATE_DIR=NO_STATE_DIR)
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


@contextlib.asynccontextmanager
async def running(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    """A long-running `muster ARGS` (stdout and stderr piped), killed at the end if still running."""
    proc = await asyncio.create_subprocess_exec(
        *MUSTER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(env),
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def interrupt(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> tuple[int, str]:
    """Ctrl+C: SIGINT, then the exit code and stderr."""
    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(timeout):
        assert proc.stderr is not None
        err = await proc.stderr.read()
        code = await proc.wait()
    return code, err.decode()


async def read_lines(proc: asyncio.subprocess.Process, done: Any, timeout: float = 20.0, *, as_json: bool) -> list[Any]:
    """Reads lines (JSON objects or text) until ``done(line)`` holds, within ``timeout`` seconds."""
    assert proc.stdout is not None
    seen: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                raw = await proc.stdout.readline()
                assert raw, f"the watch ended early after {seen}"
                line = json.loads(raw) if as_json else raw.decode().rstrip("\n")
                seen.append(line)
                if done(line):
                    return seen
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s; saw {seen}") from None


# -- reading the output ------------------------------------------------------------------------------


def parse_table(text: str) -> list[dict[str, str]]:
    """The node table: each column starts where its header starts; every row is one line."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [header.index(name) for name in COLUMNS]
    assert starts == sorted(starts) and starts[0] == 0, header
    assert re.split(r"\s{2,}", header.strip()) == COLUMNS, header
    rows = []
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  ", f"columns must be two spaces apart: {line!r}"
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        assert all(cells), f"every cell has text: {line!r}"
        rows.append(dict(zip(COLUMNS, cells, strict=True)))
    return rows


def local(iso: str | None) -> str:
    """An ISO-8601 time from --json as the table shows it (local time, to the second)."""
    if iso is None:
        return "-"
    when = datetime.fromisoformat(iso)
    assert when.tzinfo is not None, iso
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def table_row_of(node: dict[str, Any]) -> dict[str, str]:
    """What the table must show for a node of the --json output."""
    shown = "MISSED_CHECK_IN" if node["health"] == "MISSED_CHECK_IN" else node["status"]
    return {
        "ID": str(node["id"]),
        "Host": node["host"] or "-",
        "IPv4": node["ipv4"] or "-",
        "Port": str(node["port"]),
        "Status": READABLE[shown],
        "Mode": node["mode"].capitalize(),
        "Last seen": local(node["last_seen"]),
        "Sessions": str(node["sessions"]),
    }


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_node_file(state_dir: Path, node_id: int, host: str, port: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    data = {"id": node_id, "address": f"{host}:{port}", "host": host, "port": port}
    (state_dir / "node.json").write_text(json.dumps(data))


# -- the control plane -------------------------------------------------------------------------------

# FAST_TIMING's 200 ms heartbeat and fast reaper, with a check-in window wide enough that nodes this
# test keeps alive never look missed on a busy machine, and a lease long enough that a silent node
# stays "Missed check-in" (instead of going OFFLINE) while the commands run.
TIMING = {"MUSTER_CHECK_IN_WINDOW": "2s", "MUSTER_LEASE_TTL": "60s"}


@pytest.fixture
def server(database_url: str) -> Any:
    proc = ServerProcess(database_url, env=TIMING).start()
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.asynccontextmanager
async def heartbeating(cluster: Cluster, nodes: Iterable[tuple[Lease, Load]]) -> AsyncIterator[None]:
    """Keeps nodes alive (every 100 ms, with their load) while the block runs."""
    nodes = list(nodes)

    async def beat() -> None:
        while True:
            for lease, load in nodes:
                with contextlib.suppress(E.MusterError):
                    await cluster.heartbeat(lease, load)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the tests ---------------------------------------------------------------------------------------


async def test_every_command_has_help_that_names_the_address_option() -> None:
    results = await asyncio.gather(*(muster(cmd, "--help") for cmd in COMMANDS))
    for cmd, r in zip(COMMANDS, results, strict=True):
        assert r.code == 0, (cmd, r.err)
        assert f"Usage: muster {cmd}" in r.out and "--address" in r.out and "MUSTER_ADDRESS" in r.out, r.out
    for cmd in ("list-nodes", "node-status", "watch"):
        assert "--json" in results[COMMANDS.index(cmd)].out


async def test_list_nodes_table_and_json_agree_on_every_status(database_url: str) -> None:
    # A node limit of 4 (counting STARTING and ONLINE nodes) refuses the sixth join: INVALID_LICENSE.
    server = ServerProcess(database_url, env={**TIMING, "MUSTER_MAX_NODES": "4"}).start()
    try:
        async with Cluster.connect(server.address) as cluster:
            busy_load = Load(0.5, 0.25, 0.125, 4, 2)
            busy = await cluster.join_node("app1.example", 8787, ipv4="10.0.0.1", load=busy_load)
            idle = await cluster.join_node("app2.example", 8788, ipv4="10.0.0.2", load=Load(cpu_count=2))
            drained = await cluster.join_node("app3.example", 8789, ipv4="10.0.0.3")
            await cluster.drain_node(drained.node_id)
            left = await cluster.join_node("app4.example", 8790)
            await cluster.leave_node(left)
            silent = await cluster.join_node("app5.example", 8791, ipv4="10.0.0.5")
            with pytest.raises(E.NodeLimitReachedError) as refused:
                await cluster.join_node("app6.example", 8792)
            unlicensed = int(refused.value.metadata["node"])
            alive = [(busy, busy_load), (idle, Load(cpu_count=2)), (drained, Load())]
            async with heartbeating(cluster, alive):

                async def silent_missed() -> bool:
                    return (await cluster.get_node(silent.node_id)).health is Health.MISSED_CHECK_IN

                await wait_for(silent_missed, timeout=15, what="the silent node to miss its check-in")
                table, as_json, by_env = await asyncio.gather(
                    muster("list-nodes", "--address", server.address),
                    muster("list-nodes", "--json", "--address", server.address),
                    muster("list-nodes", "--json", env={"MUSTER_ADDRESS": server.address}),
                )
    finally:
        server.stop()

    for r in (table, as_json, by_env):
        assert r.code == 0 and r.err == "", r.err
    rows = parse_table(table.out)
    listed = json.loads(as_json.out)
    assert set(listed) == {"revision", "nodes"} and listed["revision"] > 0
    nodes = listed["nodes"]
    assert [n["id"] for n in json.loads(by_env.out)["nodes"]] == [n["id"] for n in nodes]
    assert all(set(n) == NODE_KEYS for n in nodes)
    assert all(set(n["load"]) == {"load1", "load5", "load15", "cpu_count"} for n in nodes)
    by_id = {n["id"]: n for n in nodes}

    # The JSON: stored status, derived health, mode, load, sessions.
    want = {
        busy.node_id: ("ONLINE", "OK", "ACTIVE"),
        idle.node_id: ("ONLINE", "OK", "ACTIVE"),
        drained.node_id: ("ONLINE", "OK", "DRAINING"),
        left.node_id: ("OFFLINE", "OK", "ACTIVE"),
        silent.node_id: ("ONLINE", "MISSED_CHECK_IN", "ACTIVE"),
        unlicensed: ("INVALID_LICENSE", "OK", "ACTIVE"),
    }
    assert {i: (n["status"], n["health"], n["mode"]) for i, n in by_id.items()} == want
    assert by_id[busy.node_id]["load"] == {"load1": 0.5, "load5": 0.25, "load15": 0.125, "cpu_count": 4}
    # A node's sessions are the balancer's (none here: no session was placed or reported to it);
    # what the agent reports in its heartbeats is shown apart.
    assert by_id[busy.node_id]["sessions"] == 0 and by_id[busy.node_id]["reported_sessions"] == 2
    assert by_id[idle.node_id]["sessions"] == 0 and by_id[idle.node_id]["reported_sessions"] == 0
    assert by_id[busy.node_id]["address"] == "app1.example:8787" and by_id[left.node_id]["ipv4"] == ""
    assert by_id[left.node_id]["reason"] == "LEFT"
    assert [n["status"] for n in nodes[:4]] == ["ONLINE"] * 4, "ONLINE nodes first"
    for n in nodes:
        if n["last_seen"] is not None:
            assert datetime.fromisoformat(n["last_seen"]).utcoffset() == timedelta(0)

    # The table: the same nodes in the same order, readable statuses, local times.
    assert [int(r["ID"]) for r in rows] == [n["id"] for n in nodes]
    shown = {int(r["ID"]): r for r in rows}
    assert shown[silent.node_id]["Status"] == "Missed check-in"
    assert shown[unlicensed]["Status"] == "Invalid license"
    assert shown[left.node_id]["Status"] == "Offline" and shown[left.node_id]["IPv4"] == "-"
    assert (shown[drained.node_id]["Status"], shown[drained.node_id]["Mode"]) == ("Online", "Draining")
    kept_alive = {busy.node_id, idle.node_id, drained.node_id}
    for node in nodes:
        expected, row = table_row_of(node), shown[node["id"]]
        if node["id"] in kept_alive:
            # Their heartbeats move "last seen" between the two runs: compare it loosely.
            a = datetime.strptime(row.pop("Last seen"), "%Y-%m-%d %H:%M:%S")
            b = datetime.strptime(expected.pop("Last seen"), "%Y-%m-%d %H:%M:%S")
            assert abs(a - b) < timedelta(seconds=30)
        assert row == expected


async def test_delete_node_says_so_and_refuses_a_node_with_sessions_unless_forced(server: ServerProcess) -> None:
    address = server.address
    async with Cluster.connect(address) as cluster:
        busy = await cluster.join_node("busy.example", 8787, load=Load(session_count=2))
        idle = await cluster.join_node("idle.example", 8787)
        scripted = await cluster.join_node("scripted.example", 8787)

        refused = (await muster("delete-node", str(busy.node_id), "--address", address)).one_error_line()
        assert f"node {busy.node_id}" in refused and "--force" in refused and "drain" in refused
        assert (await cluster.get_node(busy.node_id)).state is NodeState.ONLINE

        r = await muster("delete-node", str(idle.node_id), "--address", address)
        assert (r.code, r.out, r.err) == (0, f"Node {idle.node_id} deleted.\n", "")
        r = await muster("delete-node", str(busy.node_id), "--force", "--address", address)
        assert (r.code, r.out, r.err) == (0, f"Node {busy.node_id} deleted.\n", "")
        for gone in (idle, busy):
            with pytest.raises(E.NodeNotFoundError):
                await cluster.get_node(gone.node_id)

        r = await muster("delete-node", str(scripted.node_id), "--json", "--address", address)
        assert r.code == 0
        answer = json.loads(r.out)
        assert answer["id"] == scripted.node_id and answer["deleted"] is True and answer["revision"] > 0
        assert (await cluster.list_nodes()).nodes == []

    unknown = (await muster("delete-node", "424242", "--address", address)).one_error_line()
    assert "424242" in unknown and "does not exist" in unknown


async def test_offline_and_online_by_id_and_for_this_node(server: ServerProcess, tmp_path: Path) -> None:
    address = server.address
    draining = "is draining: it keeps its sessions and gets no new ones.\n"
    async with Cluster.connect(address) as cluster:
        app = await cluster.join_node("app1.example", 8787)
        here = await cluster.join_node("127.0.0.9", 9999)  # what this host resolves to, below
        said = f"Node {app.node_id} (app1.example:8787) "

        async def mode(lease: Lease) -> NodeMode:
            return (await cluster.get_node(lease.node_id)).mode

        r = await muster("offline", str(app.node_id), "--address", address)
        assert (r.code, r.out, r.err) == (0, said + draining, "")
        assert await mode(app) is NodeMode.DRAINING
        r = await muster("online", str(app.node_id), "--address", address)
        assert (r.code, r.out, r.err) == (0, said + "is active.\n", "")
        assert await mode(app) is NodeMode.ACTIVE

        # No id: the agent's node.json in the state directory names the node.
        state = tmp_path / "agent"
        write_node_file(state, app.node_id, "app1.example", 8787)
        r = await muster("offline", "--state-dir", str(state), "--address", address)
        assert (r.code, r.out) == (0, said + draining)
        assert await mode(app) is NodeMode.DRAINING
        r = await muster("online", "--json", "--address", address, env={"MUSTER_STATE_DIR": str(state)})
        assert r.code == 0
        node = json.loads(r.out)
        assert (node["id"], node["mode"], node["status"]) == (app.node_id, "ACTIVE", "ONLINE")
        assert await mode(app) is NodeMode.ACTIVE

        # No id and no node.json: this host's address, found the agent's way, names the node.
        empty = str(tmp_path / "empty")
        this_host = {"MUSTER_HOST_NAME": "127.0.0.9", "MUSTER_PORT": "9999"}
        r = await muster("offline", "--state-dir", empty, "--address", address, env=this_host)
        assert (r.code, r.out) == (0, f"Node {here.node_id} (127.0.0.9:9999) " + draining)
        assert await mode(here) is NodeMode.DRAINING
        assert await mode(app) is NodeMode.ACTIVE

        # Neither: it asks for an id.
        elsewhere = {"MUSTER_HOST_NAME": "127.0.0.10", "MUSTER_PORT": "9999"}
        line = (await muster("online", "--state-dir", empty, "--address", address, env=elsewhere)).one_error_line()
        assert "node.json" in line and "127.0.0.10:9999" in line and "node's id" in line
        assert await mode(here) is NodeMode.DRAINING

        line = (await muster("offline", "424242", "--address", address)).one_error_line()
        assert "424242" in line


async def test_node_status_by_id_and_for_this_node(server: ServerProcess, tmp_path: Path) -> None:
    address = server.address
    async with Cluster.connect(address) as cluster:
        load = Load(0.5, 0.25, 0.125, 4, 3)
        app = await cluster.join_node("app1.example", 8787, ipv4="10.0.0.1", load=load)
        other = await cluster.join_node("app2.example", 8788)
        left = await cluster.join_node("app3.example", 8789)
        await cluster.leave_node(left)
        async with heartbeating(cluster, [(app, load), (other, Load())]):
            human, as_json = await asyncio.gather(
                muster("node-status", str(app.node_id), "--address", address),
                muster("node-status", str(app.node_id), "--json", "--address", address),
            )
            state = tmp_path / "agent"
            write_node_file(state, other.node_id, "app2.example", 8788)
            mine, mine_json = await asyncio.gather(
                muster("node-status", "--state-dir", str(state), "--address", address),
                muster("node-status", "--json", "--address", address, env={"MUSTER_STATE_DIR": str(state)}),
            )
        offline = await muster("node-status", str(left.node_id), "--address", address)

    assert human.code == 0 and as_json.code == 0, (human.err, as_json.err)
    status = json.loads(as_json.out)
    keys = {"revision", "node", "sessions", "placed_sessions", "reported_sessions", "online_nodes"}
    assert set(status) == keys and status["revision"] > 0
    assert set(status["node"]) == NODE_KEYS and status["node"]["id"] == app.node_id
    # The node's sessions are the balancer's (none: nothing was placed or reported to it); the
    # agent's own count (3) is shown beside them.
    assert (status["sessions"], status["reported_sessions"]) == (0, 3) and status["node"]["status"] == "ONLINE"
    assert sorted(n["id"] for n in status["online_nodes"]) == sorted([app.node_id, other.node_id])

    head, _, rest = human.out.partition("\n")
    assert head == f"Node {app.node_id}  app1.example:8787"
    details, _, online = rest.partition("\n\n")
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in details.splitlines())
    assert fields["Status"] == "Online" and fields["Mode"] == "Active"
    assert fields["Sessions"].startswith("0; the node's agent reports 3 (the balancer is missing reports"), fields
    assert (fields["Host"], fields["IPv4"], fields["Port"]) == ("app1.example", "10.0.0.1", "8787")
    assert fields["Load"] == "0.50 0.25 0.12 (4 CPUs)"
    count_line, _, table = online.partition("\n")
    assert count_line == "Online nodes: 2"
    rows = parse_table(table)
    assert sorted(int(r["ID"]) for r in rows) == sorted(n["id"] for n in status["online_nodes"])
    assert {r["Status"] for r in rows} == {"Online"}

    assert mine.code == 0 and mine.out.startswith(f"Node {other.node_id}  app2.example:8788\n"), mine.err
    assert json.loads(mine_json.out)["node"]["id"] == other.node_id

    assert offline.code == 0 and "  Status     Offline (LEFT)\n" in offline.out
    line = (await muster("node-status", "424242", "--address", address)).one_error_line()
    assert "424242" in line and "does not exist" in line


async def test_reset_cluster_needs_yes_without_a_terminal_and_removes_everything(server: ServerProcess) -> None:
    address = server.address
    async with Cluster.connect(address) as cluster:
        for i in range(3):
            await cluster.join_node(f"app{i}.example", 8787)
        epoch = (await cluster.get_cluster()).epoch

        line = (await muster("reset-cluster", "--address", address)).one_error_line()
        assert "--yes" in line and "terminal" in line
        assert len((await cluster.list_nodes()).nodes) == 3

        r = await muster("reset-cluster", "--yes", "--address", address)
        after = await cluster.get_cluster()
        assert after.epoch > epoch
        assert (r.code, r.out, r.err) == (0, f"Cluster reset: 3 nodes removed, new epoch {after.epoch}.\n", "")
        assert (await cluster.list_nodes()).nodes == []

        await cluster.join_node("again.example", 8787)
        r = await muster("reset-cluster", "--yes", "--json", "--address", address)
        answer = json.loads(r.out)
        assert answer["removed_nodes"] == 1 and answer["epoch"] == (await cluster.get_cluster()).epoch
        assert answer["epoch"] > after.epoch and answer["revision"] > 0

    r = await muster("list-nodes", "--address", address)
    assert (r.code, r.out) == (0, "No nodes.\n")
    r = await muster("list-nodes", "--json", "--address", address)
    assert json.loads(r.out)["nodes"] == []


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    """Reads a pty's master side until ``marker`` shows up (or it closes), within ``timeout`` seconds."""
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


async def _reset_on_a_terminal(address: str, answer: bytes) -> tuple[int, str]:
    master, slave = os.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            *MUSTER, "reset-cluster", "--address", address, stdin=slave, stdout=slave, stderr=slave, env=_env()
        )
        os.close(slave)
        slave = -1
        try:
            prompt = await asyncio.to_thread(_read_until, master, b"[y/N]", 20.0)
            assert b"This removes 1 node and the cluster definition" in prompt, prompt
            os.write(master, answer + b"\n")
            rest = await asyncio.to_thread(_read_until, master, b"\x00never\x00", 5.0)
            async with asyncio.timeout(20):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return code, (prompt + rest).decode(errors="replace")
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


async def test_reset_cluster_asks_on_a_terminal(server: ServerProcess) -> None:
    async with Cluster.connect(server.address) as cluster:
        await cluster.join_node("app.example", 8787)
        code, shown = await _reset_on_a_terminal(server.address, b"n")
        assert code != 0 and "muster: reset cancelled; nothing was changed" in shown, shown
        assert len((await cluster.list_nodes()).nodes) == 1
        code, shown = await _reset_on_a_terminal(server.address, b"y")
        assert code == 0 and "Cluster reset: 1 node removed, new epoch" in shown, shown
        assert (await cluster.list_nodes()).nodes == []


async def test_watch_json_prints_the_snapshot_then_every_change_and_exits_0_on_interrupt(
    server: ServerProcess,
) -> None:
    address = server.address
    async with Cluster.connect(address) as cluster:
        first = await cluster.join_node("first.example", 8787, wait_for_revision=True)
        async with running("watch", "--json", "--from-revision", "0", "--address", address) as proc:
            seen = await read_lines(proc, lambda item: item["type"] == "resync", as_json=True)
            node = await cluster.join_node("second.example", 8787, ipv4="10.0.0.2", wait_for_revision=True)
            await cluster.drain_node(node.node_id)
            await cluster.leave_node(node)
            last = await cluster.delete_node(node.node_id, wait_for_revision=True)
            seen += await read_lines(
                proc, lambda item: item["type"] != "resync" and item["revision"] >= last, as_json=True
            )
            code, err = await interrupt(proc)
    assert code == 0 and "Traceback" not in err, err

    resync = seen[0]
    assert resync["type"] == "resync" and resync["revision"] >= first.revision
    assert [n["id"] for n in resync["nodes"]] == [first.node_id]
    assert set(resync["nodes"][0]) == NODE_KEYS and resync["nodes"][0]["status"] == "ONLINE"
    assert {item["type"] for item in seen} <= {"resync", "event", "progress"}
    assert all(item["type"] != "resync" for item in seen[1:])

    events = [item for item in seen if item["type"] == "event"]
    revisions = [e["revision"] for e in events]
    assert revisions == list(range(resync["revision"] + 1, last + 1)), "every event once, in order, no gap"
    for before, after in zip(seen, seen[1:], strict=False):
        if after["type"] == "event":
            assert after["revision"] > before["revision"]
        else:
            assert after["revision"] >= before["revision"]
            assert after["head_revision"] >= after["through_revision"] == after["revision"]

    mine = [e for e in events if e["node_id"] == node.node_id]
    assert [e["kind"] for e in mine] == [
        "NodeJoined",
        "NodeModeChanged",
        "NodeStateChanged",
        "NodeStateChanged",
        "NodeDeleted",
    ]
    joined, drained, left, deleting, deleted = mine
    assert (joined["status"], joined["mode"], joined["node"]["ipv4"]) == ("ONLINE", "ACTIVE", "10.0.0.2")
    assert drained["mode"] == "DRAINING"
    assert (left["status"], left["previous_status"], left["node"]["reason"]) == ("OFFLINE", "ONLINE", "LEFT")
    assert deleting["status"] == "DELETING"
    assert deleted["address"] == "second.example:8787" and deleted["revision"] == last
    assert all(datetime.fromisoformat(e["time"]).tzinfo is not None for e in events)


async def test_watch_prints_one_line_per_event_and_exits_0_on_interrupt(server: ServerProcess) -> None:
    address = server.address
    line_re = re.compile(r"^rev (\d+)  (\S+)\s+(.*)$")
    async with Cluster.connect(address) as cluster:
        await cluster.join_node("before.example", 8787, wait_for_revision=True)
        head = (await cluster.get_cluster()).head_revision
        assert head > 0  # so that the watch starts with the events after it, not with a snapshot
        async with running("watch", "--from-revision", str(head), "--address", address) as proc:
            node = await cluster.join_node("app9.example", 8787, wait_for_revision=True)
            await cluster.drain_node(node.node_id)
            last = await cluster.leave_node(node, wait_for_revision=True)

            def is_last(line: str) -> bool:
                m = line_re.match(line)
                return bool(m) and m.group(2) not in {"Progress", "Resync"} and int(m.group(1)) >= last

            lines = await read_lines(proc, is_last, as_json=False)
            code, err = await interrupt(proc)
    assert code == 0 and "Traceback" not in err, err

    parsed = [line_re.match(line) for line in lines]
    assert all(parsed), lines
    assert not any(m and m.group(2) == "Resync" for m in parsed), lines
    events = [(int(m.group(1)), m.group(2), m.group(0)) for m in parsed if m and m.group(2) != "Progress"]
    assert [rev for rev, _, _ in events] == list(range(head + 1, last + 1)), lines
    by_kind = {kind: line for _, kind, line in events}
    assert (
        by_kind["NodeJoined"]
        == f"rev {node.revision}  NodeJoined        node {node.node_id}  app9.example:8787  Online  Active"
    )
    assert by_kind["NodeModeChanged"].endswith(f"node {node.node_id}  Draining")
    assert by_kind["NodeStateChanged"] == (
        f"rev {last}  NodeStateChanged  node {node.node_id}  app9.example:8787  Offline (LEFT)  Draining"
    )


async def test_watch_resumes_after_a_server_restart_without_losing_an_event(database_url: str) -> None:
    listen = f"127.0.0.1:{closed_port()}"  # a fixed port, so that the restarted server is where the watch looks
    env = {**TIMING, "MUSTER_LISTEN": listen}
    server = ServerProcess(database_url, env=env).start()
    try:
        async with Cluster.connect(listen) as cluster:
            before = await cluster.join_node("before.example", 8787, wait_for_revision=True)
        async with running("watch", "--json", "--from-revision", "0", "--address", listen) as proc:
            seen = await read_lines(proc, lambda item: item["type"] == "resync", as_json=True)
            server.stop()
            server = ServerProcess(database_url, env=env).start()
            async with Cluster.connect(listen) as cluster:
                after = await cluster.join_node("after.example", 8787, wait_for_revision=True)
            seen += await read_lines(
                proc, lambda item: item["type"] == "event" and item["revision"] >= after.revision, 30, as_json=True
            )
            code, err = await interrupt(proc)
    finally:
        server.stop()
    assert code == 0, err
    assert "muster: watch stream lost" in err and "muster: watch resumed" in err, err
    assert seen[0]["revision"] >= before.revision
    events = [item for item in seen if item["type"] == "event"]
    assert [e["revision"] for e in events] == list(range(seen[0]["revision"] + 1, after.revision + 1))
    assert events[-1]["kind"] == "NodeJoined" and events[-1]["node_id"] == after.node_id


async def test_watch_stops_quietly_when_its_reader_goes_away(server: ServerProcess) -> None:
    # `muster watch | head -n 1`: head exits after one line; the next write (a progress mark comes at
    # least every few seconds) finds the pipe closed, and the watch must end quietly.
    watch = shlex.join([*MUSTER, "watch", "--address", server.address])
    script = f'{watch} | head -n 1; echo "watch exited with ${{PIPESTATUS[0]}}" >&2'
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env()
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert re.fullmatch(r"rev \d+  Resync .*\n", out.decode()), out
    assert err.decode() == "watch exited with 0\n"


async def test_an_unreachable_control_plane_is_one_line_and_a_nonzero_exit_within_seconds() -> None:
    nowhere = f"127.0.0.1:{closed_port()}"
    runs = [
        ["list-nodes"],
        ["list-nodes", "--json"],
        ["delete-node", "1"],
        ["node-status", "1"],
        ["offline", "1"],
        ["online", "1"],
        ["reset-cluster", "--yes"],
        ["watch"],
        ["watch", "--json"],
    ]
    started = time.monotonic()
    results = await asyncio.gather(
        *(muster(*args, "--address", nowhere, timeout=20) for args in runs),
        muster("list-nodes", env={"MUSTER_ADDRESS": nowhere}, timeout=20),
    )
    assert time.monotonic() - started < 15
    for args, r in zip([*runs, ["list-nodes (MUSTER_ADDRESS)"]], results, strict=True):
        line = r.one_error_line()
        assert r.code == 1, args
        assert "unreachable" in line and "--address" in line and "MUSTER_ADDRESS" in line, (args, line)
        assert nowhere in line, (args, line)
