"""The lock commands: locktester twice, locks (table and JSON), locks break, jobs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from datetime import UTC, datetime, timedelta

import pytest
from harness import ROOT, ServerProcess

from muster.client import Cluster


@pytest.fixture
def locks_server(database_url: str):
    server = ServerProcess(database_url, ["locks"]).start()
    try:
        yield server
    finally:
        server.stop()


async def _muster(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muster.cli.main",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MUSTER_STATE_DIR": "/nonexistent"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_locktester_twice_the_second_is_refused_and_names_the_holder(locks_server) -> None:
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muster.cli.main",
        "locktester",
        "--name",
        "lt",
        "--address",
        locks_server.address,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MUSTER_STATE_DIR": "/nonexistent"},
    )
    try:
        line = (await asyncio.wait_for(first.stdout.readline(), 30)).decode().strip()
        assert line.startswith("* Acquired lock lt (token ") and line.endswith(")")
        token = line.rsplit("token ", 1)[1].rstrip(")")
        code, out, _ = await _muster("locktester", "--name", "lt", "--address", locks_server.address)
        assert code == 1
        assert out.strip().startswith("* Unable to acquire lock lt: held by ")
        assert out.strip().endswith(f"(token {token})") and f":{first.pid} " in out

        code, out, _ = await _muster("locks", "--json", "--address", locks_server.address)
        listed = json.loads(out)["locks"]
        assert code == 0 and listed[0]["name"] == "lt" and str(listed[0]["holders"][0]["token"]) == token
        code, table, _ = await _muster("locks", "--address", locks_server.address)
        assert code == 0 and "lt" in table and token in table and f":{first.pid}" in table

        first.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(first.communicate(), 20)
        assert first.returncode == 0 and f"* Released lock lt (token {token})" in rest.decode()
    finally:
        if first.returncode is None:
            first.kill()


async def test_locks_break_moves_the_fence_and_the_holder_loses_its_lease(locks_server) -> None:
    async with Cluster.connect(locks_server.address) as c:
        lease = await c.acquire("stuck", ttl=timedelta(minutes=5))
        code, out, _ = await _muster("locks", "break", "stuck", "--address", locks_server.address)
        assert code == 0 and out.startswith("Lock stuck broken: 1 hold(s) released")
        assert not await c.validate_fence("stuck", lease.token)
        code, _, err = await _muster("locks", "break", "never-held", "--address", locks_server.address)
        assert code == 1 and err.startswith("muster: lock never-held has never been held")


async def test_jobs_lists_firings_as_table_and_json(locks_server) -> None:
    async with Cluster.connect(locks_server.address) as c:
        when = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
        f = await c.claim_firing("nightly-report", when, ttl=timedelta(seconds=30), holder="node 1 (a:1)")
        await c.complete_firing(f)
    code, out, _ = await _muster("jobs", "--json", "--address", locks_server.address)
    firings = json.loads(out)["firings"]
    assert code == 0 and firings[0]["job"] == "nightly-report" and firings[0]["state"] == "COMPLETED"
    code, table, _ = await _muster("jobs", "--address", locks_server.address)
    assert "nightly-report" in table and "COMPLETED" in table and "node 1 (a:1)" in table
