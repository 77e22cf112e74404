"""Patroni fails PostgreSQL over by itself: Muster's replicas follow, no lease expires, nothing
acknowledged is lost and fencing tokens keep increasing.

Debian's ``patroni`` (3.0) runs two members of Debian's PostgreSQL 15 on loopback with a private
``etcd-server`` (3.4) as its DCS, ``synchronous_mode: true``. Two registry replicas and one locks
replica serve through one multi-host URL with ``target_session_attrs=read-write``. The leader's
machine "dies" (its Patroni and its PostgreSQL SIGKILLed, nothing shut down): nobody promotes the
standby but Patroni on the other member, once the leader key's TTL runs out. Without Patroni or etcd
the test skips, unless MUSTER_REQUIRE_POSTGRES_PEERS=1 (CI), where it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import registry, servers, wait_for
from replicated import require_peer, server_binaries

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import Cluster
from muster.core.server import run_migrations

pytestmark = pytest.mark.timeout(300)
SERVING = health_pb2.HealthCheckResponse.SERVING
EPOCH = 1 << 40
INSTALL = "apt-get install patroni etcd-server"
# Patroni's timing (the DCS's `ttl`, `loop_wait`, `retry_timeout`; loop_wait + 2 × retry_timeout must
# not exceed ttl): the leader key lives 10 s after the leader's last loop, so the standby takes over
# 10–11 s after the leader dies. Patroni's defaults (30, 10, 10) make that 30–40 s.
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 1, 4


def _free_port(taken: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signals one process we started (by its pid) and reaps it; SIGKILL if it does not go."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def _etcd(root: Path, ports: set[int]) -> Iterator[str]:
    """One private etcd member on loopback (free ports, its own data directory); yields host:port.

    (bench/etcd.py starts the same etcd, but imports the benchmark workloads and reaches etcd over
    the aetcd stubs; Patroni needs only the address.)
    """
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    client, peer = _free_port(ports), _free_port(ports)
    log = open(root / "etcd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            "--name=patroni-test",
            f"--data-dir={root / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{client}",
            f"--advertise-client-urls=http://127.0.0.1:{client}",
            f"--listen-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
            f"--initial-cluster=patroni-test=http://127.0.0.1:{peer}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=error",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while (_get_json(f"http://127.0.0.1:{client}/health") or {}).get("health") != "true":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {(root / 'etcd.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield f"127.0.0.1:{client}"
    finally:
        _stop(proc)
        log.close()


class Member:
    """One Patroni member (as the ``postgres`` user when we are root) and the PostgreSQL it runs."""

    def __init__(self, root: Path, name: str, etcd: str, ports: set[int], run_as: list[str]) -> None:
        self.name, self.root, self._run_as = name, root / name, run_as
        self.pg_port, self.api_port = _free_port(ports), _free_port(ports)
        self.data = self.root / "data"
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.config = root / f"{name}.yml"
        hba = ["local all all trust", "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]
        config = {
            "scope": "muster-test",
            "name": name,
            "restapi": {"listen": f"127.0.0.1:{self.api_port}", "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"host": etcd},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "synchronous_mode": True,  # commits wait for the standby; only it may be promoted
                    "postgresql": {
                        "use_pg_rewind": False,
                        "use_slots": True,
                        "parameters": {"max_connections": 300, "wal_log_hints": "on", "fsync": "off"},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": str(self.data),
                "bin_dir": str(server_binaries()),
                "pgpass": str(self.root / "pgpass"),
                "authentication": {"superuser": {"username": "postgres"}, "replication": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": str(self.root)},
                "pg_hba": hba,
            },
            "watchdog": {"mode": "off"},
        }
        self.config.write_text(json.dumps(config, indent=1))  # JSON is YAML

    def start(self) -> None:
        self.root.mkdir(mode=0o700)
        if self._run_as:
            shutil.chown(self.root, "postgres", "postgres")
        log = open(self.log, "ab")  # noqa: SIM115 - Patroni writes it for its whole life
        self.proc = subprocess.Popen(
            [*self._run_as, shutil.which("patroni") or "/usr/bin/patroni", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def state(self) -> dict:
        """What this member's REST API says about itself (``{}`` while it does not answer)."""
        return _get_json(f"http://127.0.0.1:{self.api_port}/patroni") or {}

    def cluster(self) -> dict:
        """The cluster as this member's REST API sees it (``{}`` while it does not answer)."""
        return _get_json(f"http://127.0.0.1:{self.api_port}/cluster") or {}

    def postmaster(self) -> int | None:
        """The pid of this member's PostgreSQL postmaster, if one is running."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            if Path(f"/proc/{pid}").exists():
                return pid
        return None

    def _kill_postgres(self) -> None:
        """SIGKILLs the postmaster and then every process it forked (as a dying machine would)."""
        pid = self.postmaster()
        if pid is None:
            return
        children = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    children.append(int(stat.parent.name))
        for p in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in [pid, *children]) and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """The machine dies: Patroni first (it must not stop or restart PostgreSQL), then PostgreSQL."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGKILL)
        self._kill_postgres()

    def stop(self) -> None:
        """Patroni stops its PostgreSQL (a fast shutdown); whatever is left is killed."""
        if self.proc is not None:
            _stop(self.proc, signal.SIGTERM, timeout=30)
        self._kill_postgres()


def _leader(members: list[Member]) -> Member | None:
    """The member whose REST API says it is the running primary, if exactly one says so."""
    leaders = [m for m in members if _is_primary(m.state())]
    return leaders[0] if len(leaders) == 1 else None


def _is_primary(state: dict) -> bool:
    return state.get("role") in {"master", "primary"} and state.get("state") == "running"  # "master" before 3.1


async def _sync_standby_streaming(leader: Member, standby: Member) -> bool:
    roles = {m["name"]: m for m in leader.cluster().get("members", [])}
    if roles.get(standby.name, {}).get("role") != "sync_standby" or roles[standby.name].get("state") != "running":
        return False
    try:
        con = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{leader.pg_port}/postgres", timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        row = await con.fetchrow("SELECT state, sync_state FROM pg_stat_replication")
        return row is not None and (row["state"], row["sync_state"]) == ("streaming", "sync")
    finally:
        await con.close()


async def _heartbeats(address: str, node: node_pb2.Node, stop: asyncio.Event) -> None:
    async with registry(address) as stub:
        while not stop.is_set():
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.Heartbeat(pb.HeartbeatRequest(node_id=node.id, lease_id=node.lease_id), timeout=1)
            await asyncio.sleep(0.2)


async def _serving_since(address: str, stop: asyncio.Event, seen: list[tuple[float, int]]) -> None:
    """Records (time, status) each time the replica's health changes (UNKNOWN while it cannot answer)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            try:
                status = (await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)).status
            except grpc.aio.AioRpcError:
                status = health_pb2.HealthCheckResponse.UNKNOWN
            if not seen or seen[-1][1] != status:
                seen.append((time.monotonic(), status))
            await asyncio.sleep(0.05)


async def _joiner(
    address: str, name: str, n: int, acked: list[tuple[float, node_pb2.Node]], stop: asyncio.Event, tasks: list
) -> None:
    """Joins ``n`` nodes, one every 0.5 s, each retried under its request id until acknowledged
    (a join that committed unacknowledged is returned, not doubled); heartbeats every one."""
    async with registry(address) as stub:
        for i in range(n):
            while not stop.is_set():
                try:
                    request = pb.JoinNodeRequest(host=f"{name}-{i}", port=1, request_id=f"join-{name}-{i}")
                    node = (await stub.JoinNode(request, timeout=2)).node
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            else:
                return
            acked.append((time.monotonic(), node))
            tasks.append(asyncio.create_task(_heartbeats(address, node, stop)))
            await asyncio.sleep(0.5)


async def _token(address: str) -> int:
    """The fencing token of one grant of the lock ``patroni`` (acquired, then released)."""
    async with Cluster.connect(address) as cluster:
        async with cluster.lock("patroni", ttl=timedelta(seconds=5), wait=timedelta(seconds=30)) as lease:
            return lease.token


@pytest.fixture
def patroni_cluster():
    """Two Patroni members on a private etcd, a leader and a streaming synchronous standby."""
    if not (shutil.which("patroni") or os.path.exists("/usr/bin/patroni")):
        require_peer("Debian's patroni", INSTALL)
    if not (shutil.which("etcd") or os.path.exists("/usr/bin/etcd")):
        require_peer("Debian's etcd-server", INSTALL)
    server_binaries()  # skips (or fails) without Debian's PostgreSQL server
    run_as: list[str] = []
    with tempfile.TemporaryDirectory(prefix="muster-patroni-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            run_as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups", "--"]
            shutil.chown(root, "postgres", "postgres")
        ports: set[int] = set()
        with _etcd(root, ports) as etcd:
            members = [Member(root, f"pg{i}", etcd, ports, run_as) for i in range(2)]
            try:
                for m in members:
                    m.start()
                yield members
            except BaseException:
                for m in members:
                    print(f"--- {m.name} ({m.log}):\n{m.log.read_text(errors='replace')[-3000:]}")
                raise
            finally:
                for m in members:
                    m.stop()


async def test_patroni_fails_over_by_itself_and_nothing_acknowledged_is_lost(patroni_cluster) -> None:
    members: list[Member] = patroni_cluster
    began = time.monotonic()
    leader = await wait_for(lambda: _leader(members), timeout=120, what="a Patroni leader")
    standby = next(m for m in members if m is not leader)
    await wait_for(lambda: _sync_standby_streaming(leader, standby), timeout=120, what="a streaming sync standby")
    bootstrapped = time.monotonic()

    hosts = ",".join(f"127.0.0.1:{m.pg_port}" for m in members)
    url = f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"
    await run_migrations(url, ["registry", "locks"], wait=30)

    with servers(url, 2) as regs, servers(url, 1, service="locks") as lockers:
        addresses = [s.address for s in regs]
        stop, watch_stop = asyncio.Event(), asyncio.Event()
        health: dict[str, list] = {s.address: [] for s in [*regs, *lockers]}
        tasks = [asyncio.create_task(_serving_since(a, watch_stop, seen)) for a, seen in health.items()]
        heartbeats: list[asyncio.Task] = []
        joiners: list[asyncio.Task] = []
        acked: list[tuple[float, node_pb2.Node]] = []
        try:
            async with registry(addresses[0]) as stub:
                nodes = [(await stub.JoinNode(pb.JoinNodeRequest(host=f"h{i}", port=1))).node for i in range(4)]
            heartbeats += [asyncio.create_task(_heartbeats(addresses[i % 2], n, stop)) for i, n in enumerate(nodes)]
            joiners += [
                asyncio.create_task(_joiner(addresses[i], f"j{i}", 10, acked, stop, heartbeats)) for i in range(2)
            ]
            before = await _token(lockers[0].address)
            await wait_for(lambda: len(acked) >= 4, timeout=30, what="joins before the failover")

            killed = time.monotonic()
            await asyncio.to_thread(leader.kill)
            promoted = await wait_for(
                lambda: _is_primary(standby.state()),
                timeout=90,
                what=f"Patroni to promote {standby.name}",
            )
            took_over = time.monotonic()
            assert promoted

            def all_serving() -> bool:
                return all(seen and seen[-1][0] > killed and seen[-1][1] == SERVING for seen in health.values())

            await wait_for(all_serving, timeout=60, what="every replica SERVING on the new primary")
            back = max(seen[-1][0] for seen in health.values())
            after = await _token(lockers[0].address)
            await asyncio.wait_for(asyncio.gather(*joiners), timeout=60)  # every join acknowledged, some after
            await asyncio.sleep(2.0)  # more lease periods (1.5 s) with heartbeats flowing
            async with registry(addresses[1]) as stub:
                listed = {n.id: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}
            stop.set()
            watch_stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, *heartbeats), timeout=30)
        finally:  # on a failure too: nothing of this test keeps running on the loop
            stop.set()
            watch_stop.set()
            for task in [*tasks, *heartbeats, *joiners]:
                task.cancel()
            await asyncio.gather(*tasks, *heartbeats, *joiners, return_exceptions=True)

    con = await asyncpg.connect(url)
    try:
        floor = await con.fetchval("SELECT epoch_floor FROM core.head")
        timeline = await con.fetchval("SELECT core.timeline()")
        expired = await con.fetchval("SELECT count(*) FROM registry.nodes WHERE state_reason = 'LEASE_EXPIRED'")
        stored = {r["id"] for r in await con.fetch("SELECT id FROM registry.nodes")}
    finally:
        await con.close()
    cluster = standby.cluster()

    # Patroni, not the test, promoted the standby: it is the leader on timeline 2.
    assert {m["name"]: m["role"] for m in cluster["members"]}.get(standby.name) == "leader", cluster
    assert timeline == 2 and floor == 2 * EPOCH, (timeline, floor)
    # Tokens: the grant after the failover is above the one before and above the new epoch's floor.
    assert before < EPOCH < floor < after, (before, floor, after)
    # Every acknowledged join is on the new primary (synchronous mode), ONLINE, none expired: the
    # outage credit covered the switch.
    joined = [*nodes, *(n for _, n in acked)]
    assert len(acked) == 20 and any(t > killed for t, _ in acked) and any(t < killed for t, _ in acked)
    assert len({n.id for n in joined}) == len(joined) and {n.id for n in joined} <= stored
    assert expired == 0
    assert all(listed[n.id].state == node_pb2.Node.STATE_ONLINE for n in joined), listed
    print(
        f"\nPatroni failover (synchronous_mode, ttl {TTL}s, loop_wait {LOOP_WAIT}s): bootstrap "
        f"{bootstrapped - began:.1f}s; leader killed, {standby.name} promoted by Patroni "
        f"{took_over - killed:.1f}s later; every replica SERVING {back - killed:.1f}s after the kill "
        f"({back - took_over:.1f}s after the promotion was seen); tokens {before} -> {after}"
    )
