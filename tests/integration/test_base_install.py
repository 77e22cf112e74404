"""The base install (``pip install muster``, no extras) is what a node needs: the client and the agent.

A wheel of this checkout goes into a fresh virtualenv without the ``server`` extra (its base
dependencies come from the package index, cached across runs in the system temp dir). In it the
client imports, the server's dependencies are absent, ``muster up`` says how to install them, and
``muster agent`` joins a real registry and leaves it on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from agents import AgentProcess
from harness import ROOT, ServerProcess

from muster.client import Cluster, NodeState

PIP_CACHE = Path(tempfile.gettempdir()) / "muster-test-pip-cache"


def _run(cmd: list[str], *, timeout: float, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.mark.timeout(600)
async def test_the_base_install_imports_the_client_and_runs_the_agent_without_the_server(database_url: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="muster-base-"))
    # Nothing of this checkout or of the test's virtualenv may leak into the fresh one.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSTER_", "PYTHON", "VIRTUAL_ENV"))}
    env["PIP_CACHE_DIR"] = str(PIP_CACHE)
    server = None
    try:
        wheels = work / "wheels"
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(ROOT)]
        if importlib.util.find_spec("hatchling") is not None:
            build.insert(4, "--no-build-isolation")  # the backend is here: no download needed to build
        out = _run(build, timeout=300, cwd=work, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        (wheel,) = wheels.glob("muster-*.whl")

        venv = work / "venv"
        out = _run([sys.executable, "-m", "venv", str(venv)], timeout=120, cwd=work, env=env)
        assert out.returncode == 0, out.stderr
        python, muster = str(venv / "bin" / "python"), str(venv / "bin" / "muster")
        out = _run([python, "-m", "pip", "install", "-q", str(wheel)], timeout=480, cwd=work, env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

        probe = "import muster.client, sys; print(muster.client.__file__); print(sys.prefix)"
        out = _run([python, "-c", probe], timeout=60, cwd=work, env=env)
        assert out.returncode == 0, out.stderr
        client_file, prefix = out.stdout.split()
        assert client_file.startswith(str(venv)) and prefix == str(venv), out.stdout
        for server_only in ("asyncpg", "uvloop", "pgserver"):
            out = _run([python, "-c", f"import {server_only}"], timeout=60, cwd=work, env=env)
            assert out.returncode != 0 and "ModuleNotFoundError" in out.stderr, (server_only, out.stderr)

        out = _run([muster, "up"], timeout=60, cwd=work, env=env)
        assert out.returncode != 0
        assert "pip install 'muster[server]'" in out.stderr, out.stderr

        server = ServerProcess(database_url).start()
        agent = AgentProcess(
            [server.address], host_name="base.example", command=[muster], state_dir=work / "state", env=env
        )
        try:
            agent.start(timeout=60)
            assert agent.address == "base.example:8787" and agent.strategy == "host name"
            assert (await agent.status())["state"] == "connected"
            agent.signal(signal.SIGTERM)
            assert await agent.exited(15) == 0, agent.output()
            assert agent.lines_matching(r"left \(OFFLINE\)"), agent.output()
        finally:
            agent.stop()
        async with Cluster.connect(server.address) as cluster:
            node = await cluster.get_node(agent.node_id)
        assert node.state is NodeState.OFFLINE and node.state_reason == "LEFT"
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
