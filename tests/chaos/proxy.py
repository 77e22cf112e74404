"""A loopback TCP proxy the nemesis can sever: one process, many proxies, driven over stdin.

Every client reaches every replica through a proxy of its own, so the nemesis can cut one client
from one replica (and keep each client's address stable when a replica restarts on another port).

Run as a process (``python proxy.py``); each stdin line is a JSON command, answered by one JSON line:

- ``{"op": "add", "name": N, "upstream": "127.0.0.1:P"}`` -> ``{"ok": true, "port": 40001}``
- ``{"op": "upstream", "name": N, "upstream": "127.0.0.1:Q"}``: where new connections go
- ``{"op": "cut", "name": N, "mode": "reset"|"blackhole"}``: ``reset`` aborts every connection with
  a RST and refuses new ones; ``blackhole`` keeps connections open but drops every byte both ways
  (new connections are accepted and go nowhere), so only deadlines and keepalives notice
- ``{"op": "heal", "name": N}``: back to forwarding (black-holed connections are aborted: their
  streams lost bytes and cannot go on)
- ``{"op": "stats"}``

:class:`ProxyControl` starts the process and sends the commands (blocking; the orchestrator is
synchronous, and the proxy runs on in its own process while the orchestrator blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

CHUNK = 65536


class _Conn:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.blackholed = False

    def abort(self) -> None:
        for w in (self.client, self.upstream):
            if w is None:
                continue
            sock = w.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()


class Proxy:
    """One listening port forwarding to one upstream."""

    def __init__(self, name: str, upstream: str) -> None:
        self.name = name
        self.upstream = upstream
        self.mode = "ok"
        self.conns: set[_Conn] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self.refused = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        self.accepted += 1
        if self.mode == "reset":
            self.refused += 1
            conn.abort()
            return
        self.conns.add(conn)
        try:
            if self.mode == "blackhole":
                conn.blackholed = True
                await self._drain(reader, conn)
                return
            host, port = self.upstream.rsplit(":", 1)
            try:
                ureader, uwriter = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2.0)
            except (OSError, TimeoutError):
                self.refused += 1
                conn.abort()
                return
            conn.upstream = uwriter
            if self.mode != "ok":  # cut while connecting
                conn.blackholed = self.mode == "blackhole"
                if self.mode == "reset":
                    conn.abort()
                    return
            await asyncio.gather(self._pipe(reader, uwriter, conn), self._pipe(ureader, writer, conn))
        finally:
            self.conns.discard(conn)
            conn.abort()

    async def _drain(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while await reader.read(CHUNK):
                pass

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if conn.blackholed:
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            # One side ended: end the other (a half-open gRPC connection is of no use).
            conn.abort()

    def cut(self, mode: str) -> None:
        self.mode = mode
        for conn in list(self.conns):
            if mode == "reset":
                conn.abort()
            else:
                conn.blackholed = True

    def heal(self) -> None:
        self.mode = "ok"
        for conn in list(self.conns):
            if conn.blackholed:
                conn.abort()


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    proxies: dict[str, Proxy] = {}

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "add":
                p = Proxy(cmd["name"], cmd["upstream"])
                await p.start()
                proxies[p.name] = p
                reply({"ok": True, "port": p.port})
            elif op == "upstream":
                proxies[cmd["name"]].upstream = cmd["upstream"]
                reply({"ok": True})
            elif op == "cut":
                proxies[cmd["name"]].cut(cmd.get("mode", "reset"))
                reply({"ok": True})
            elif op == "heal":
                proxies[cmd["name"]].heal()
                reply({"ok": True})
            elif op == "stats":
                reply(
                    {
                        "ok": True,
                        "proxies": {
                            n: {"mode": p.mode, "open": len(p.conns), "accepted": p.accepted, "refused": p.refused}
                            for n, p in proxies.items()
                        },
                    }
                )
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - answer every line
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


class ProxyControl:
    """The proxy process, seen from the orchestrator: add proxies, cut and heal them (blocking calls)."""

    def __init__(self, log_path: Path) -> None:
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        self._lock = threading.Lock()
        self.ports: dict[str, int] = {}

    def _cmd(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the proxy process is gone")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"proxy: {answer.get('error')}")
        return answer

    def add(self, name: str, upstream: str) -> str:
        """A new proxy to ``upstream``; returns its ``127.0.0.1:port``."""
        port = int(self._cmd(op="add", name=name, upstream=upstream)["port"])
        self.ports[name] = port
        return f"127.0.0.1:{port}"

    def set_upstream(self, name: str, upstream: str) -> None:
        self._cmd(op="upstream", name=name, upstream=upstream)

    def cut(self, name: str, mode: str) -> None:
        self._cmd(op="cut", name=name, mode=mode)

    def heal(self, name: str) -> None:
        self._cmd(op="heal", name=name)

    def stats(self) -> dict[str, Any]:
        return dict(self._cmd(op="stats")["proxies"])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


if __name__ == "__main__":
    asyncio.run(_serve())
