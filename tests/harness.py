"""Test harness: databases, server processes, and a watcher that records what it sees.

Servers run as separate processes (``python -m muster.cli.main serve registry``) bound to port 0;
the harness reads the address each one prints. Only names (URLs, addresses) cross into the test's
event loop, never live pools or channels.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_status import rpc_status

from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.api.registry.v1 import registry_service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
_READY = re.compile(r"muster: serving .* on (\S+) \(database")

# Short timings so that lease tests run in seconds.
FAST_TIMING = {
    "MUSTER_HEARTBEAT_INTERVAL": "200ms",
    "MUSTER_CHECK_IN_WINDOW": "600ms",
    "MUSTER_LEASE_TTL": "1500ms",
    "MUSTER_REAP_INTERVAL": "100ms",
    "MUSTER_POLL_INTERVAL": "500ms",
    "MUSTER_GRACE_PERIOD": "2s",
}


class ServerProcess:
    """A Muster server in its own process.

    Args:
        database_url: the database it serves from.
        services: e.g. ``["registry"]``.
        env: extra ``MUSTER_*`` settings.
    """

    def __init__(
        self,
        database_url: str,
        services: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        workers: int = 1,
    ) -> None:
        self.database_url = database_url
        self.workers = workers
        self.services = services or ["registry"]
        self.env = {**FAST_TIMING, **(env or {})}
        self.address = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = log_path
        self._own_log = False
        self._log = None

    def start(self, timeout: float = 60.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.update(self.env)
        env["MUSTER_DATABASE_URL"] = self.database_url
        env["GRPC_VERBOSITY"] = "ERROR"
        env.setdefault("MUSTER_LISTEN", "127.0.0.1:0")
        # setpriv --pdeathsig: the server dies with the test process, even when that is killed.
        cmd = [
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            sys.executable,
            "-m",
            "muster.cli.main",
            "serve",
            self.services[0],
            *(["--workers", str(self.workers)] if self.workers > 1 else []),
        ]
        assert len(self.services) == 1, "one service per process (muster serve); muster up runs them all"
        if self.log_path is None:
            import tempfile

            fd, name = tempfile.mkstemp(prefix="muster-server-", suffix=".log")
            os.close(fd)
            self.log_path, self._own_log = Path(name), True
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT)
        deadline = time.monotonic() + timeout
        buf = b""
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                m = _READY.search(buf.decode(errors="replace"))
                if m:
                    self.address = m.group(1)
                    return self
            if self.proc.poll() is not None:
                break
        self.kill()
        log = self.log_path.read_text(errors="replace")[-3000:] if self.log_path else ""
        raise RuntimeError(f"server did not start: {buf.decode(errors='replace')[-2000:]}\n{log}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        self.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.terminate(10)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._own_log and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


@contextlib.contextmanager
def servers(
    database_url: str, n: int, env: dict[str, str] | None = None, service: str = "registry"
) -> Iterator[list[ServerProcess]]:
    """``n`` replicas of a service on one database, stopped at the end."""
    procs = [ServerProcess(database_url, [service], env=env) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextlib.asynccontextmanager
async def registry(address: str) -> AsyncIterator[registry_service_pb2_grpc.RegistryServiceStub]:
    """A stub on a fresh channel."""
    async with grpc.aio.insecure_channel(address) as ch:
        yield registry_service_pb2_grpc.RegistryServiceStub(ch)


def error_reason(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo reason and metadata of a failed call."""
    from google.rpc import error_details_pb2

    md = grpc.aio.Metadata(*(err.trailing_metadata() or ()))
    for key, value in md:
        if key == "grpc-status-details-bin":
            from google.rpc import status_pb2

            st = status_pb2.Status.FromString(value)
            for d in st.details:
                info = error_details_pb2.ErrorInfo()
                if d.Unpack(info):
                    return info.reason, dict(info.metadata)
    return "", {}


_ = rpc_status  # imported so that the status details types are registered


@dataclass
class Recorder:
    """Follows WatchEvents across reconnects (to any of several addresses) and records every message."""

    addresses: list[str]
    start_revision: int = 0
    revisions: list[int] = field(default_factory=list)
    events: list = field(default_factory=list)
    resyncs: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    through: int = 0
    connections: int = 0
    state: dict[int, object] = field(default_factory=dict)
    sequence: list[tuple[str, int]] = field(default_factory=list)  # ("event" | "resync", revision) in order
    received: list[float] = field(default_factory=list)  # time.monotonic() of every message

    async def run(self, stop: asyncio.Event) -> None:
        """Watches until ``stop`` is set; on any stream error reconnects from ``through``."""
        attempt = 0
        self.through = self.start_revision
        while not stop.is_set():
            address = self.addresses[attempt % len(self.addresses)]
            attempt += 1
            try:
                async with grpc.aio.insecure_channel(address) as ch:
                    stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
                    call = stub.WatchEvents(pb.WatchEventsRequest(start_revision=self.through))
                    self.connections += 1
                    reader = asyncio.ensure_future(self._consume(call))
                    stopper = asyncio.ensure_future(stop.wait())
                    done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                    if stopper in done:
                        call.cancel()
                        reader.cancel()
                        with contextlib.suppress(BaseException):
                            await reader
                        return
                    stopper.cancel()
                    reader.result()
            except grpc.aio.AioRpcError as err:
                self.errors.append(err.code())
                await asyncio.sleep(0.05)
            except (asyncio.CancelledError, GeneratorExit):
                raise

    async def _consume(self, call) -> None:
        async for msg in call:
            self.received.append(time.monotonic())
            kind = msg.WhichOneof("kind")
            if kind == "events":
                for ev in msg.events.events:
                    self.revisions.append(ev.revision)
                    self.events.append(ev)
                    self.sequence.append(("event", ev.revision))
                    apply_event(self.state, ev)
            elif kind == "resync":
                self.resyncs.append(msg.resync)
                self.sequence.append(("resync", msg.resync.revision))
                self.state.clear()
                for node in msg.resync.nodes:
                    self.state[node.id] = node
            else:
                self.progress.append(msg)
            self.through = msg.through_revision


def apply_event(state: dict[int, object], ev) -> None:
    """Applies one registry event to a node map (events carry the resulting state)."""
    from muster.api.registry.v1 import node_pb2

    kind = ev.kind.rsplit(".", 1)[-1]
    if kind == "NodeDeleted":
        msg = node_pb2.NodeDeleted()
        ev.payload.Unpack(msg)
        state.pop(msg.node_id, None)
    elif kind == "ClusterReset":
        state.clear()
    elif kind == "NodeModeChanged":
        msg = node_pb2.NodeModeChanged()
        ev.payload.Unpack(msg)
        if msg.node_id in state:
            state[msg.node_id].mode = msg.mode
    elif kind in {"NodeJoined", "NodeStateChanged", "NodeSuspected", "NodeRecovered"}:
        cls = getattr(node_pb2, kind)
        msg = cls()
        ev.payload.Unpack(msg)
        state[msg.node.id] = msg.node


def comparable(node) -> tuple:
    """The fields of a node that events must reproduce exactly."""
    return (
        node.id,
        node.address,
        node.state,
        node.state_reason,
        node.mode,
        node.health,
        node.lease_id,
        dict(node.labels),
    )


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Polls an async or sync predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
