"""``muster serve SERVICE --workers N``: N processes on one port, stopped together, failing together.

Real processes: the supervisor is started as ``muster serve`` would be, and every pid it and its
workers have is stopped at the end of each test whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from harness import FAST_TIMING

from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.api.registry.v1 import registry_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
_READY = re.compile(r"muster: serving registry on (\S+) \(database: .*\) with (\d+) workers, pids ([\d ]+)\n")


class Group:
    """A ``--workers`` supervisor and its workers."""

    def __init__(self, proc: subprocess.Popen[bytes], address: str, pids: list[int]) -> None:
        self.proc = proc
        self.address = address
        self.pids = pids


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


@contextlib.contextmanager
def group(database_url: str, workers: int = 2) -> Iterator[Group]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env.update(FAST_TIMING)
    env.update({"MUSTER_DATABASE_URL": database_url, "GRPC_VERBOSITY": "ERROR", "MUSTER_LOG_LEVEL": "WARNING"})
    cmd = [sys.executable, "-m", "muster.cli.main", "serve", "registry"]
    cmd += ["--workers", str(workers), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, cwd=ROOT)
    pids: list[int] = []
    try:
        buf, deadline = b"", time.monotonic() + 90
        assert proc.stdout is not None
        while time.monotonic() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 0.2)
            if ready:
                buf += os.read(proc.stdout.fileno(), 4096)
                m = _READY.search(buf.decode(errors="replace"))
                if m:
                    pids = [int(p) for p in m.group(3).split()]
                    assert int(m.group(2)) == workers == len(pids)
                    yield Group(proc, m.group(1), pids)
                    break
        else:
            raise AssertionError(f"the workers did not serve: {buf.decode(errors='replace')[-2000:]}")
    finally:
        # Every pid started, by its id: the workers (psutil finds them even if the ready line never came).
        with contextlib.suppress(psutil.NoSuchProcess):
            pids += [c.pid for c in psutil.Process(proc.pid).children() if c.pid not in pids]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in _wait_gone(pids, 5):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.stdout is not None:
            proc.stdout.close()


def _serving_pids(g: Group) -> set[int]:
    """The workers holding an established connection on the group's port."""
    port = int(g.address.rpartition(":")[2])
    out = set()
    for pid in g.pids:
        for c in psutil.Process(pid).net_connections(kind="tcp"):
            if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port:
                out.add(pid)
    return out


@pytest.mark.timeout(120)
async def test_two_workers_share_the_port_and_both_answer(database_url: str) -> None:
    with group(database_url) as g:
        # Separate connections (no shared subchannel pool): the kernel spreads them over the workers.
        channels = [
            grpc.aio.insecure_channel(g.address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(24)
        ]
        try:
            for i, ch in enumerate(channels):
                stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
                await stub.JoinNode(pb.JoinNodeRequest(host=f"w-{i}", port=1))
            assert _serving_pids(g) == set(g.pids), "every worker holds connections it answered on"
            # One database, one cluster: every worker sees the others' writes.
            for ch in channels[:4]:
                listed = await registry_service_pb2_grpc.RegistryServiceStub(ch).ListNodes(pb.ListNodesRequest())
                assert len(listed.nodes) == len(channels)
        finally:
            for ch in channels:
                await ch.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stopping_the_supervisor_stops_every_worker(database_url: str, sig: signal.Signals) -> None:
    with group(database_url) as g:
        g.proc.send_signal(sig)  # SIGINT: Ctrl+C (a terminal sends it to the workers too; they stop either way)
        assert await asyncio.to_thread(g.proc.wait, 30) == 0
        assert await asyncio.to_thread(_wait_gone, g.pids, 10) == []


@pytest.mark.timeout(120)
async def test_a_killed_supervisor_takes_its_workers_with_it(database_url: str) -> None:
    with group(database_url) as g:
        g.proc.kill()
        await asyncio.to_thread(g.proc.wait, 10)
        assert await asyncio.to_thread(_wait_gone, g.pids, 20) == [], "workers outlived a SIGKILLed parent"


@pytest.mark.timeout(120)
async def test_a_dead_worker_stops_the_group_loudly(database_url: str) -> None:
    with group(database_url) as g:
        os.kill(g.pids[0], signal.SIGKILL)
        assert await asyncio.to_thread(g.proc.wait, 30) == 1
        assert await asyncio.to_thread(_wait_gone, g.pids, 10) == []
