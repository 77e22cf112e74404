"""An agent killed with SIGKILL passes through the stages in `muster list-nodes`: Missed check-in, then Offline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from agents import AgentProcess
from harness import ROOT, ServerProcess

TIMING = {"MUSTER_HEARTBEAT_INTERVAL": "200ms", "MUSTER_CHECK_IN_WINDOW": "1s", "MUSTER_LEASE_TTL": "6s"}


async def _list_nodes(address: str, *flags: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muster.cli.main",
        "list-nodes",
        "--address",
        address,
        *flags,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _row(table: str, node_id: int) -> str:
    return next(line for line in table.splitlines() if line.split() and line.split()[0] == str(node_id))


async def test_a_killed_agent_shows_missed_check_in_then_offline(database_url: str) -> None:
    server = ServerProcess(database_url, env=TIMING).start()
    agent = AgentProcess([server.address]).start()
    try:
        assert "Online" in _row(await _list_nodes(server.address), agent.node_id)
        agent.signal(signal.SIGKILL)
        killed = time.monotonic()
        seen_missed = False
        deadline = killed + 30
        while time.monotonic() < deadline:
            table = await _list_nodes(server.address)
            row = _row(table, agent.node_id)
            if "Missed check-in" in row:
                seen_missed = True
                nodes = {n["id"]: n for n in json.loads(await _list_nodes(server.address, "--json"))["nodes"]}
                if nodes[agent.node_id]["status"] == "ONLINE":  # the JSON agrees (unless it just expired)
                    assert nodes[agent.node_id]["health"] == "MISSED_CHECK_IN"
            if "Offline" in row:
                break
            await asyncio.sleep(0.2)
        assert seen_missed, "the killed agent never showed Missed check-in"
        assert "Offline" in row and time.monotonic() - killed >= 5  # not before the 6 s lease
        nodes = {n["id"]: n for n in json.loads(await _list_nodes(server.address, "--json"))["nodes"]}
        assert nodes[agent.node_id]["status"] == "OFFLINE" and nodes[agent.node_id]["reason"] == "LEASE_EXPIRED"
    finally:
        agent.stop()
        server.stop()
