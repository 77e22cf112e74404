"""Node agents as processes: ``muster agent`` started, read, asked, signalled and stopped by pid.

Like :class:`harness.ServerProcess`: only names (addresses, paths, pids) cross into the test's event
loop. Each agent gets a short state directory of its own under the system temp dir (a unix socket
path holds at most 107 bytes), removed when the agent is stopped.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import ROOT

_AGENT_NUMBERS = itertools.count(1)

JOINED = re.compile(r"^muster agent: node (\d+) joined as (\S+) \(found by ([^)]+)\) via (\S+)$")
REJOINED = re.compile(r"^muster agent: (.+); joined again as node (\d+)$")
LEFT = re.compile(r"^muster agent: node (\d+) left \((OFFLINE|deleted)\)$")


class AgentProcess:
    """One ``muster agent`` process.

    Args:
        addresses: the control plane's replicas.
        host_name: ``--host-name`` (default: a unique name, so agents on one machine are distinct nodes).
        port: ``--port`` (None: not given).
        args: more arguments.
        env: more environment (every inherited ``MUSTER_*`` variable is dropped first).
        command: the command to run instead of ``python -m muster.cli.main`` (another venv's ``muster``).
        state_dir: the state directory (default: a fresh one, removed at :meth:`stop`).
    """

    def __init__(
        self,
        addresses: list[str] | str,
        *,
        host_name: str | None = "",
        port: int | None = 8787,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.addresses = addresses if isinstance(addresses, str) else ",".join(addresses)
        if host_name == "":
            # Unique per process and agent: id(self) was used once, and Python reuses the ids of
            # collected objects, so a later agent took over an earlier one's node row.
            host_name = f"agent-{os.getpid()}-{next(_AGENT_NUMBERS)}.test"
        self.host_name = host_name
        self.port = port
        self.args = args or []
        self.env = env or {}
        self.command = command or [sys.executable, "-m", "muster.cli.main"]
        self._own_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="ma-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._readers: list[threading.Thread] = []
        self.node_id = 0
        self.address = ""
        self.strategy = ""
        self.via = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0, *, wait_joined: bool = True) -> AgentProcess:
        """Starts the agent; by default waits for its ``joined`` line and reads the node id from it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.update({"GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        cmd = [*self.command, "agent", "--address", self.addresses, "--state-dir", str(self.state_dir)]
        if self.host_name:
            cmd += ["--host-name", self.host_name]
        if self.port is not None:
            cmd += ["--port", str(self.port)]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            t = threading.Thread(target=self._read, args=(stream, sink), daemon=True)
            t.start()
            self._readers.append(t)
        if wait_joined:
            try:
                m = self.wait_line(JOINED, timeout)
            except AssertionError:
                self.kill()
                raise
            self.node_id, self.address, self.strategy, self.via = int(m[1]), m[2], m[3], m[4]
        return self

    def _read(self, stream: Any, sink: list[tuple[float, str]]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                sink.append((time.time(), raw.decode(errors="replace").rstrip("\n")))
                self._cond.notify_all()
        stream.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> float:
        """Sends a signal; returns the wall-clock time just before it was sent."""
        assert self.proc is not None
        at = time.time()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return at

    def wait(self, timeout: float) -> int:
        """Waits for the process to exit; returns its exit code (AssertionError after ``timeout``)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.pid} did not exit within {timeout}s:\n{self.output()}") from None

    async def exited(self, timeout: float) -> int:
        """Like :meth:`wait`, without blocking the event loop."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"agent {self.pid} did not exit within {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (after a SIGCONT, in case it was stopped) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s); then removes a state directory of its own."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        for t in self._readers:
            t.join(5)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- output --------------------------------------------------------------------------------

    def output(self) -> str:
        """Everything it printed so far (stdout, then stderr)."""
        with self._cond:
            return (
                "\n".join(line for _, line in self.out) + "\n--- stderr ---\n" + "\n".join(line for _, line in self.err)
            )

    def _find(self, pattern: re.Pattern[str], sink: list[tuple[float, str]], start: int) -> re.Match[str] | None:
        for _, line in sink[start:]:
            m = pattern.search(line)
            if m:
                return m
        return None

    def wait_line(self, pattern: re.Pattern[str] | str, timeout: float, *, stderr: bool = False) -> re.Match[str]:
        """Blocks until a line matches (searching everything printed so far)."""
        pat = re.compile(pattern) if isinstance(pattern, str) else pattern
        sink = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = self._find(pat, sink, 0)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc is not None and self.proc.poll() is not None and self._done()):
                    raise AssertionError(f"no line matching {pat.pattern!r} within {timeout}s:\n{self.output()}")
                self._cond.wait(min(left, 0.1))

    def _done(self) -> bool:
        return all(not t.is_alive() for t in self._readers)

    async def line(self, pattern: re.Pattern[str] | str, timeout: float, *, stderr: bool = False) -> re.Match[str]:
        """Like :meth:`wait_line`, without blocking the event loop."""
        pat = re.compile(pattern) if isinstance(pattern, str) else pattern
        sink = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                m = self._find(pat, sink, 0)
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pat.pattern!r} within {timeout}s:\n{self.output()}")
            await asyncio.sleep(0.02)

    def lines_matching(self, pattern: re.Pattern[str] | str, *, stderr: bool = False) -> list[str]:
        pat = re.compile(pattern) if isinstance(pattern, str) else pattern
        with self._cond:
            return [line for _, line in (self.err if stderr else self.out) if pat.search(line)]

    # -- the socket ----------------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "agent.sock"

    @property
    def node_file(self) -> Path:
        return self.state_dir / "node.json"

    async def request(self, request: dict[str, Any] | bytes, timeout: float = 5.0) -> dict[str, Any]:
        """Sends one request line on the agent's socket and returns its JSON reply."""
        return (await self.requests([request], timeout))[0]

    async def requests(self, requests: list[dict[str, Any] | bytes], timeout: float = 5.0) -> list[dict[str, Any]]:
        """Sends several request lines on one connection; returns the replies in order."""
        async with asyncio.timeout(timeout):
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 20)
            except OSError as exc:
                raise AssertionError(
                    f"agent {self.pid} does not answer on its socket ({exc}):\n{self.output()}"
                ) from None
            try:
                replies = []
                for req in requests:
                    line = req if isinstance(req, bytes) else json.dumps(req).encode() + b"\n"
                    writer.write(line)
                    await writer.drain()
                    reply = await reader.readline()
                    assert reply, "the agent closed the connection"
                    replies.append(json.loads(reply))
                return replies
            finally:
                writer.close()

    async def status(self) -> dict[str, Any]:
        """``{"op": "status"}``."""
        reply = await self.request({"op": "status"})
        assert reply["ok"], reply
        return reply


def stop_all(agents: list[AgentProcess]) -> None:
    """Stops every agent (each by its pid), even when one of them fails to stop."""
    for a in agents:
        try:
            a.stop()
        except Exception:  # noqa: BLE001 - stop the others regardless
            a.kill()
