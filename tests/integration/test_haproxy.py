"""Sticky routing at the edge: Debian's HAProxy, run with deploy/haproxy/haproxy.cfg, in front of small
HTTP backends (one per node), routing each session's requests by the map `muster routes` writes; then
a backend is killed and its node stops heartbeating, the balancer moves its sessions, and
`muster routes --watch` swaps the new map into the running HAProxy over its runtime API.

Everything runs on loopback with free ports; every wait is bounded and every process started here
is stopped here, by pid. Without the `haproxy` binary the test is skipped, unless
MUSTER_REQUIRE_HAPROXY=1 (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

import pytest
from harness import ROOT, ServerProcess, wait_for

from muster.client import Cluster, Lease
from muster.client import errors as E

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
ENV = {
    "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
    "MUSTER_HEARTBEAT_INTERVAL": "200ms",
    "MUSTER_CHECK_IN_WINDOW": "600ms",
    "MUSTER_LEASE_TTL": "1500ms",
}
MUSTER = [sys.executable, "-m", "muster.cli.main"]
USERS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "nina"]
WROTE = re.compile(r"^muster routes: wrote (\d+) routes to (\S+) \((\d+) online, (\d+) remapped, (\d+) moved sessions")

# A node's application: answers every request with its own name.
BACKEND = r"""
import http.server, sys
name = sys.argv[1].encode()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(name)))
        self.end_headers()
        self.wfile.write(name)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _haproxy() -> str:
    path = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None
    )
    if path is None:
        if os.environ.get("MUSTER_REQUIRE_HAPROXY") == "1":
            pytest.fail("MUSTER_REQUIRE_HAPROXY=1 but the haproxy binary is missing (apt-get install haproxy)")
        pytest.skip("the haproxy binary is missing (apt-get install haproxy; MUSTER_REQUIRE_HAPROXY=1 fails instead)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pdeathsig() -> list[str]:
    # The child dies with the test process, even when that is killed.
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Backend:
    """A tiny HTTP server in its own process, answering its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Backend:
        self.proc = subprocess.Popen(
            [*_pdeathsig(), sys.executable, "-c", BACKEND, self.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            _stop(self.proc)
            raise AssertionError(f"backend {self.name} did not start within {timeout}s")
        self.port = int(line)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class HAProxy:
    """``haproxy -f deploy/haproxy/haproxy.cfg -db`` with its paths and port from the environment."""

    def __init__(self, binary: str, workdir: Path, map_file: Path) -> None:
        self.binary = binary
        self.port = _free_port()
        self.socket = workdir / "haproxy.sock"
        self.map_file = map_file
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> HAProxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.update(
            MUSTER_ROUTES_MAP=str(self.map_file),
            MUSTER_HAPROXY_BIND=f"127.0.0.1:{self.port}",
            MUSTER_HAPROXY_SOCKET=str(self.socket),
        )
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*_pdeathsig(), self.binary, "-f", str(CONFIG), "-db"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            if self.socket.exists():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            time.sleep(0.05)
        raise AssertionError(f"haproxy did not listen within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        _stop(self.proc)

    def get(self, path: str = "/", session: str | None = None) -> tuple[int, str]:
        """One request on a fresh connection: the status and the body (the backend's name)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            headers = {"Connection": "close"}
            if session is not None:
                headers["Cookie"] = f"MUSTER_SESSION={session}"
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def get_kept_alive(self, sessions: list[str]) -> list[str]:
        """Requests for these sessions in turn over one kept-alive connection: the backends' names."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            out = []
            for sid in sessions:
                conn.request("GET", "/", headers={"Cookie": f"MUSTER_SESSION={sid}"})
                resp = conn.getresponse()
                out.append(resp.read().decode())
            return out
        finally:
            conn.close()


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    env["GRPC_VERBOSITY"] = "ERROR"
    return env


async def _muster(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *MUSTER,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_cli_env(),
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"muster {' '.join(args)} did not finish within {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _heartbeats(c: Cluster, lease: Lease) -> None:
    while True:
        with contextlib.suppress(E.UnavailableError):
            await c.heartbeat(lease)
        await asyncio.sleep(0.2)


async def _balancer_sees(c: Cluster, online: int, timeout: float = 15.0) -> None:
    async def seen() -> bool:
        try:
            status = await c.status()
        except E.UnavailableError:
            return False
        return sum(1 for n in status.nodes if n.state == "ONLINE") >= online

    await wait_for(seen, timeout=timeout, interval=0.2, what=f"the balancer to see {online} ONLINE nodes")


async def _place(c: Cluster, user: str, timeout: float = 10.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            placed = await c.place_session(user)
            return placed.session.id, placed.node_id
        except E.UnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _cancelled_at_exit(tasks: dict[int, asyncio.Task[None]]) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


def _tail(f: BinaryIO) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")[-3000:]


def _map_entries(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split()
            entries[key] = value
    return entries


@pytest.mark.timeout(180)
async def test_haproxy_routes_each_session_to_its_node_and_follows_its_move_when_the_node_dies(
    database_url: str,
) -> None:
    binary = _haproxy()
    workdir = Path(tempfile.mkdtemp(prefix="muster-haproxy-"))  # short: a unix socket path holds 107 bytes
    map_file = workdir / "routes.map"
    server = ServerProcess(database_url, ["registry,keys,balancer"], env=ENV)
    backends: list[Backend] = []
    haproxy: HAProxy | None = None
    watcher: asyncio.subprocess.Process | None = None
    beats: dict[int, asyncio.Task[None]] = {}
    watcher_log = (workdir / "routes-watch.err").open("w+b")
    try:
        server.start()
        backends = [Backend(name).start() for name in ("app1", "app2", "app3")]
        async with Cluster.connect(server.address) as c, _cancelled_at_exit(beats):
            name_of: dict[int, str] = {}
            backend_of: dict[int, Backend] = {}
            for b in backends:
                lease = await c.join_node("127.0.0.1", b.port)
                name_of[lease.node_id], backend_of[lease.node_id] = b.name, b
                beats[lease.node_id] = asyncio.create_task(_heartbeats(c, lease))
            await _balancer_sees(c, 3)
            placed = {}
            for i, user in enumerate(USERS):  # fewest sessions wins: six spread over the three nodes
                sid, node_id = await _place(c, user)
                await c.report_session_started(node_id, sid, pid=1000 + i, user=user)
                placed[sid] = node_id
                if len(placed) >= 6 and set(placed.values()) == set(name_of):
                    break
            assert set(placed.values()) == set(name_of), "the sessions spread over every node"

            # The map, once, before HAProxy starts (HAProxy loads it at start).
            code, out, err = await _muster("routes", "--haproxy-map", str(map_file), "--address", server.address)
            assert code == 0, err
            m = WROTE.match(out)
            assert m and m.groups() == ("3", str(map_file), "3", "0", "0"), out
            entries = _map_entries(map_file.read_text())
            for node_id, b in backend_of.items():
                assert entries[f"n{node_id}"] == f"127.0.0.1:{b.port}"
            assert entries["@count"] == "3"

            haproxy = HAProxy(binary, workdir, map_file).start()
            hx = haproxy

            # Each session reaches its node: by cookie, by query parameter, by path.
            for sid, node_id in placed.items():
                assert await asyncio.to_thread(hx.get, "/", sid) == (200, name_of[node_id]), sid
            sid, node_id = next(iter(placed.items()))
            assert await asyncio.to_thread(hx.get, f"/work?muster_session={sid}") == (200, name_of[node_id])
            assert await asyncio.to_thread(hx.get, f"/s/{sid}/index.html") == (200, name_of[node_id])
            # Alternating sessions over one kept-alive client connection never reach the wrong node.
            order = [s for _ in range(3) for s in placed]
            assert await asyncio.to_thread(hx.get_kept_alive, order) == [name_of[placed[s]] for s in order]
            # Without a session id: any node, spread.
            anywhere = [await asyncio.to_thread(hx.get, "/") for _ in range(30)]
            assert {status for status, _ in anywhere} == {200}
            assert {body for _, body in anywhere} <= set(name_of.values())
            assert len({body for _, body in anywhere}) >= 2

            # From now on the map follows the cluster, and HAProxy takes it over the runtime API.
            watcher = await asyncio.create_subprocess_exec(
                *MUSTER,
                "routes",
                "--watch",
                "--haproxy-map",
                str(map_file),
                "--haproxy-socket",
                str(hx.socket),
                "--address",
                server.address,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=watcher_log,
                env=_cli_env(),
                cwd=ROOT,
            )
            assert watcher.stdout is not None
            watched: list[str] = []

            async def next_line() -> str:
                assert watcher is not None and watcher.stdout is not None
                line = (await asyncio.wait_for(watcher.stdout.readline(), 20)).decode()
                assert line, f"muster routes --watch ended: {_tail(watcher_log)}"
                watched.append(line)
                return line

            first = await next_line()
            assert WROTE.match(first) and first.rstrip().endswith("; HAProxy updated)"), first

            # A node dies: its application is killed and its heartbeats stop.
            victim = placed[sid]
            moved_ids = [s for s, n in placed.items() if n == victim]
            kept = {s: n for s, n in placed.items() if n != victim}
            beats[victim].cancel()
            backend_of[victim].kill()

            async def all_moved() -> dict[str, int] | None:
                now = {}
                for old in moved_ids:
                    session, moved = await c.route_session(old)
                    if not moved or session.node_id == victim:
                        return None
                    now[old] = session.node_id
                return now

            moved_to = await wait_for(all_moved, timeout=30, interval=0.2, what="the balancer to move the sessions")

            async def routed_after_failover() -> bool:
                for old, node_id in moved_to.items():
                    if await asyncio.to_thread(hx.get, "/", old) != (200, name_of[node_id]):
                        return False
                return True

            await wait_for(routed_after_failover, timeout=20, interval=0.2, what="HAProxy to route the moved sessions")
            for old, node_id in moved_to.items():
                session, _ = await c.route_session(old)  # where RouteSession says it is, HAProxy sends it
                assert session.node_id == node_id
                assert await asyncio.to_thread(hx.get, "/", old) == (200, name_of[session.node_id])
            for s, node_id in kept.items():
                assert await asyncio.to_thread(hx.get, "/", s) == (200, name_of[node_id]), s
            # An id of the dead node that the map does not list (ended, or never known) reaches a live node.
            status, body = await asyncio.to_thread(hx.get, "/", f"{'0' * 32}.n{victim}")
            assert status == 200 and body != name_of[victim]
            # New visitors only reach live nodes.
            anywhere = [await asyncio.to_thread(hx.get, "/") for _ in range(20)]
            assert {status for status, _ in anywhere} == {200}
            assert {body for _, body in anywhere} <= {name_of[n] for n in kept.values()}

            # The file says the same: the old ids and the dead route point at live nodes.
            entries = _map_entries(map_file.read_text())
            for old, node_id in moved_to.items():
                assert entries[old] == f"127.0.0.1:{backend_of[node_id].port}"
            assert entries[f"n{victim}"] in {f"127.0.0.1:{backend_of[n].port}" for n in kept.values()}
            assert entries["@count"] == "2"
            last = None
            while last is None or last.group(5) != str(len(moved_ids)):
                last = WROTE.match(await next_line())
            assert last.group(3, 4) == ("2", "1") and watched[-1].rstrip().endswith("; HAProxy updated)"), watched
            # A single run prints the same map as the one the watcher wrote.
            code, out, err = await _muster("routes", "--address", server.address)
            assert code == 0, err
            assert out == map_file.read_text()

            # Ctrl+C ends the watch cleanly.
            watcher.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(watcher.wait(), 10) == 0
    finally:
        if watcher is not None and watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
        if haproxy is not None:
            haproxy.stop()
        for b in backends:
            b.stop()
        server.stop()
        watcher_log.close()
        shutil.rmtree(workdir, ignore_errors=True)
