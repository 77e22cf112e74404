"""The cluster under test: a PostgreSQL it owns (an embedded one, or a primary and a synchronous
streaming standby of Debian's PostgreSQL when the nemesis fails the database over), server replicas,
node agents, workload clients, and the proxies between every client and every replica.

Everything is a process this object started and stops by its pid. The orchestrator is synchronous:
blocking here (a replica restarting, PostgreSQL coming back) stalls nobody else, because the
proxies run in their own process.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents import AgentProcess
from harness import ROOT, ServerProcess

from .proxy import ProxyControl

SERVICES = "registry,keys,balancer,locks"
WORKLOAD = Path(__file__).resolve().parent / "workload.py"
KEY_LINE = r"^muster agent: keys (defined|fetched|uploaded|matched)"

# Short timings, so that leases expire and failovers happen within seconds; not so short that a busy
# 2-core machine expires healthy nodes all the time. The outage threshold stays well under the lease
# (as 2 s is under 30 s by default): a database outage too short to be credited must not outlast a
# lease, or every short restart would expire every node by design.
TIMING = {
    "MUSTER_HEARTBEAT_INTERVAL": "300ms",
    "MUSTER_CHECK_IN_WINDOW": "1200ms",
    "MUSTER_LEASE_TTL": "3s",
    "MUSTER_OUTAGE_THRESHOLD": "1500ms",
    "MUSTER_REAP_INTERVAL": "100ms",
    "MUSTER_POLL_INTERVAL": "500ms",
    "MUSTER_GRACE_PERIOD": "1s",
    "MUSTER_KEY_GRACE_PERIOD": "4s",
    "MUSTER_PROGRESS_INTERVAL": "1s",
}
LEASE_TTL = 3.0

RESOURCE_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS chaos;
CREATE TABLE IF NOT EXISTS chaos.resource (id integer PRIMARY KEY, fence bigint NOT NULL);
INSERT INTO chaos.resource VALUES (1, 0) ON CONFLICT DO NOTHING;
-- The fenced resource's write log: ids follow the order of the writes (they serialize on the row).
CREATE TABLE IF NOT EXISTS chaos.sections (
    id bigserial PRIMARY KEY,
    token bigint NOT NULL,
    phase text NOT NULL,
    worker text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pdeathsig(cmd: list[str]) -> list[str]:
    """The command, killed when the orchestrator dies (setpriv: the main thread starts every child)."""
    return ["setpriv", "--pdeathsig", "KILL", "--", *cmd]


def run_sql(url: str, sql: str, *args: Any, fetch: bool = True) -> Any:
    """One statement (or script) on a fresh connection, from synchronous code."""
    import asyncio

    import asyncpg

    async def go() -> Any:
        con = await asyncpg.connect(url, timeout=5)
        try:
            if not fetch:
                return await con.execute(sql, *args)
            return [dict(r) for r in await con.fetch(sql, *args)]
        finally:
            await con.close()

    return asyncio.run(go())


@dataclass
class Replica:
    """One server replica (several incarnations over a run; one at a time)."""

    index: int
    log_path: Path
    server: ServerProcess | None = None
    paused: bool = False
    incarnations: int = 0

    @property
    def name(self) -> str:
        return f"replica-{self.index}"

    @property
    def up(self) -> bool:
        return self.server is not None and self.server.proc is not None and self.server.proc.poll() is None


@dataclass
class Agent:
    """One node agent (restarted with the same host name, state and keys after a kill)."""

    name: str
    host: str
    addresses: list[str]
    state_dir: Path
    keys_dir: Path
    proc: AgentProcess | None = None
    past: list[AgentProcess] = field(default_factory=list)
    paused: bool = False

    def command(self) -> list[str]:
        return _pdeathsig([sys.executable, "-m", "muster.cli.main"])

    def start(self, *, wait: bool) -> None:
        if self.proc is not None:
            self.past.append(self.proc)
        self.proc = AgentProcess(
            self.addresses,
            host_name=self.host,
            args=["--keys-dir", str(self.keys_dir)],
            command=self.command(),
            state_dir=self.state_dir,
        )
        self.proc.start(wait_joined=wait, timeout=60)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.running()

    @property
    def node_id(self) -> int:
        """The node's id, from the agent's node.json (0 before its first join)."""
        try:
            return int(json.loads((self.state_dir / "node.json").read_text())["id"])
        except (OSError, ValueError, KeyError):
            return 0

    def output(self) -> str:
        return "\n".join(p.output() for p in [*self.past, *([self.proc] if self.proc else [])])


@dataclass
class Client:
    """One workload process."""

    name: str
    role: str
    proc: subprocess.Popen[bytes]
    history: Path
    skew: str = ""
    paused: bool = False

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)


class ChaosCluster:
    """Starts, faults and stops the whole cluster under ``workdir``."""

    def __init__(self, workdir: Path, *, replicas: int = 2, log_level: str = "INFO", replicated: bool = False) -> None:
        self.workdir = workdir
        # A primary and a standby (tests/replicated.py) instead of the embedded PostgreSQL: what the
        # failover fault needs. Synchronous replication, so nothing acknowledged is lost in a failover
        # and every checker's "nothing acknowledged lost" stays a guarantee.
        self.replicated = replicated
        self.pair: Any = None
        self._url = ""
        self.logs = workdir / "logs"
        self.history = workdir / "history"
        for d in (self.logs, self.history):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o711)  # PostgreSQL's unprivileged user must traverse it
        self.stop_file = workdir / "stop_at"
        self.master_key = base64.b64encode(os.urandom(32)).decode()
        self.env = {**TIMING, "MUSTER_MASTER_KEY": self.master_key, "MUSTER_LOG_LEVEL": log_level}
        self.pg: Any = None
        self.proxy: ProxyControl | None = None
        self.replicas = [Replica(i, self.logs / f"replica-{i}.log") for i in range(replicas)]
        self.slots: dict[str, list[str]] = {}  # client name -> its proxy names, one per replica
        self.slot_addresses: dict[str, list[str]] = {}  # client name -> its proxies' addresses
        self.agents: list[Agent] = []
        self.clients: list[Client] = []
        self.agent_exits: list[dict[str, Any]] = []  # agents that exited by themselves
        self.agent_refusals: list[dict[str, Any]] = []  # refused for a retired key, mended by the operator
        # Bound and never listening: connections to it are refused. Where a dead replica's proxies
        # point, so that nothing else that binds its old port (another test) receives our clients.
        self._nowhere = socket.socket()
        self._nowhere.bind(("127.0.0.1", 0))
        self.nowhere = f"127.0.0.1:{self._nowhere.getsockname()[1]}"

    # -- database ------------------------------------------------------------------------------

    def start_database(self) -> None:
        if self.replicated:
            self._start_pair()
            return
        from muster.core.embedded import EmbeddedPostgres

        self.pg = EmbeddedPostgres(
            self.workdir / "pg" / "data", port=_free_port(), fsync=False, log_file=self.logs / "postgres.log"
        )
        self.pg.start()
        self._url = str(self.pg.url)
        run_sql(self._url, RESOURCE_SCHEMA, fetch=False)

    def _start_pair(self) -> None:
        from replicated import ReplicatedPostgres

        missing = missing_server()
        if missing:
            raise SetupError(missing)
        root = self.workdir / "pg"
        root.mkdir()
        self.pair = ReplicatedPostgres(root, synchronous=True)
        self.pair.start()
        # A standby retries its primary every 5 s by default: after every restart of the primary its
        # synchronous commits would hang that long. And a base backup starts with a checkpoint spread
        # over most of checkpoint_timeout: under the workload a rebuild took 40 s; checkpoints at full
        # speed take a second (fsync is off anyway). Set before any base backup, so a rebuilt standby
        # (whose configuration is the primary's) has it too.
        for server in (self.pair.primary, self.pair.standby):
            server.sql("ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
            server.sql("ALTER SYSTEM SET checkpoint_completion_target = 0")
            server.sql("SELECT pg_reload_conf()")
        # Both hosts, fixed for the run (a server keeps its port when it changes role); every replica,
        # client and checker connects through it and lands on whichever is primary.
        self._url = str(self.pair.url)
        run_sql(self._url, RESOURCE_SCHEMA, fetch=False)

    @property
    def database_url(self) -> str:
        return self._url

    @property
    def database_name(self) -> str:
        """What a restart restarts: the embedded server, or the pair's current primary."""
        return _server_name(self.pair.primary) if self.pair is not None else "postgres"

    def stop_database(self, mode: str) -> None:
        if self.pair is None:
            self.pg.stop(mode)
        elif mode == "immediate":
            self.pair.primary.kill()
        else:
            self.pair.primary.stop()

    def start_database_again(self) -> None:
        if self.pair is None:
            self.pg.start(timeout=60)
        else:
            self.pair.primary.start(timeout=60)

    @property
    def database_up(self) -> bool:
        if self.pair is not None:
            return _server_running(self.pair.primary)
        return bool(self.pg is not None and self.pg.running)

    # -- failover (the replicated pair only) -----------------------------------------------------

    def kill_primary(self) -> str:
        """An immediate stop of the primary, as if its machine died; returns its name."""
        name = _server_name(self.pair.primary)
        self.pair.primary.kill()
        return name

    def promote_standby(self) -> dict[str, Any]:
        """Promotes the standby (the new primary, on a new timeline); returns its name and timeline."""
        self.pair.promote()
        # The timeline WAL is written on now (pg_control_checkpoint() lags until the next checkpoint).
        timeline = self.pair.primary.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        return {"new_primary": _server_name(self.pair.primary), "timeline": int(timeline or "0", 16)}

    def rebuild_standby(self) -> None:
        """The dead old primary, made a streaming (synchronous) standby of the new one: a later
        failover can happen again."""
        self.pair.rebuild_standby()

    @property
    def standby_up(self) -> bool:
        return self.pair is None or _server_running(self.pair.standby)

    # -- replicas ------------------------------------------------------------------------------

    def start_proxy(self) -> None:
        self.proxy = ProxyControl(self.logs / "proxy.log")

    def start_replica(self, r: Replica) -> None:
        r.server = ServerProcess(self.database_url, [SERVICES], env=self.env, log_path=r.log_path).start(timeout=60)
        r.incarnations += 1
        r.paused = False
        assert self.proxy is not None
        for proxies in self.slots.values():
            self.proxy.set_upstream(proxies[r.index], r.server.address)

    def kill_replica(self, r: Replica) -> None:
        if r.server is not None:
            if r.paused:
                r.server.signal(signal.SIGCONT)
            r.server.kill()
            if r.server.proc is not None and r.server.proc.stdout:
                r.server.proc.stdout.close()
        r.paused = False
        assert self.proxy is not None
        for proxies in self.slots.values():
            self.proxy.set_upstream(proxies[r.index], self.nowhere)

    def upstream(self, r: Replica) -> str:
        return r.server.address if r.up and r.server is not None else self.nowhere

    # -- clients and their proxies -------------------------------------------------------------

    def slot(self, name: str) -> list[str]:
        """The addresses a client uses: a proxy of its own to each replica."""
        assert self.proxy is not None
        names = [f"{name}>{r.name}" for r in self.replicas]
        addresses = [self.proxy.add(n, self.upstream(r)) for n, r in zip(names, self.replicas, strict=True)]
        self.slots[name] = names
        self.slot_addresses[name] = addresses
        return addresses

    def add_agents(self, count: int) -> None:
        for i in range(count):
            name = f"a{i}"
            base = self.workdir / "agents" / name
            (base / "keys").mkdir(parents=True, exist_ok=True)
            (base / "state").mkdir(parents=True, exist_ok=True)
            self.agents.append(Agent(name, f"chaos-{name}.test", self.slot(name), base / "state", base / "keys"))

    def start_agents(self, timeout: float = 60.0) -> None:
        # The first defines the cluster's keys; the others start together once it has.
        first, *rest = self.agents
        first.start(wait=True)
        assert first.proc is not None
        first.proc.wait_line(KEY_LINE, timeout)
        for a in rest:
            a.start(wait=False)
        for a in rest:
            assert a.proc is not None
            a.proc.wait_line(KEY_LINE, timeout)

    def start_client(
        self, role: str, name: str, cfg: dict[str, Any], *, skew: str = "", faketime: str = "faketime"
    ) -> Client:
        history = self.history / f"{name}.jsonl"
        cfg = {**cfg, "name": name, "log": str(history), "addresses": self.slot(name)}
        cmd = [sys.executable, str(WORKLOAD), role, json.dumps(cfg)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSTER_", "FAKETIME"))}
        env.update({"GRPC_VERBOSITY": "ERROR", "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()})
        if skew:
            # The wall clock is far off; the monotonic clock (leases, deadlines) is left alone.
            # faketime runs the client as its child: the client too dies with its parent, or a kill
            # of a client that did not finish (by its pid: faketime's) would leave it running.
            cmd = [faketime, "-f", skew, *_pdeathsig(cmd)]
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        err = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            proc = subprocess.Popen(_pdeathsig(cmd), env=env, stdout=err, stderr=err, cwd=ROOT)
        finally:
            err.close()
        client = Client(name, role, proc, history, skew)
        self.clients.append(client)
        return client

    def capture_keys(self) -> None:
        """Copies every key version the agents hold into ``keys_seen/`` (for the key-leak check: a
        retired version's copies are gone by the end). Called between faults, so none is missed."""
        from muster.client import keyfiles

        out = self.workdir / "keys_seen"
        for a in self.agents:
            paths = keyfiles.KeyPaths.in_dir(a.keys_dir)
            pairs = [(paths.secure_cookie_key, paths.launcher_key)] + [
                (keyfiles.version_path(paths.secure_cookie_key, v), keyfiles.version_path(paths.launcher_key, v))
                for v in keyfiles.held_versions(paths)
            ]
            for cookie, pem in pairs:
                try:
                    data = cookie.read_bytes()
                    pem_data = pem.read_bytes() if pem.is_file() else b""
                except OSError:
                    continue  # being replaced right now
                dest = out / keyfiles.cookie_fingerprint(data)
                if dest.exists():
                    continue
                dest.mkdir(parents=True)
                (dest / "secure-cookie-key").write_bytes(data)
                if pem_data:
                    (dest / "launcher.pem").write_bytes(pem_data)

    # -- the end -------------------------------------------------------------------------------

    def heal(self) -> list[str]:
        """Undoes every fault still in effect; returns what it did."""
        done = []
        assert self.proxy is not None
        for name in self.slots.values():
            for n in name:
                self.proxy.heal(n)
        if not self.database_up:
            self.start_database_again()
            done.append("started PostgreSQL")
        if not self.standby_up:
            self.rebuild_standby()
            done.append("rebuilt the standby")
        for r in self.replicas:
            if r.paused and r.server is not None:
                r.server.signal(signal.SIGCONT)
                r.paused = False
                done.append(f"continued {r.name}")
            if not r.up:
                self.start_replica(r)
                done.append(f"started {r.name}")
        done += self.mend_refused()
        for a in self.agents:
            if a.paused and a.proc is not None:
                a.proc.signal(signal.SIGCONT)
                a.paused = False
                done.append(f"continued agent {a.name}")
            if not a.running:
                self.agent_exits.append(self.exit_of(a))
                a.start(wait=False)
                done.append(f"started agent {a.name}")
        for c in self.clients:
            if c.paused:
                c.signal(signal.SIGCONT)
                c.paused = False
                done.append(f"continued {c.name}")
        return done

    def mend_refused(self) -> list[str]:
        """What the operator does for an agent that was down through a whole rotation and was refused
        for holding the retired version (the refusal's fix): removes its key files and starts it again,
        so it fetches the ACTIVE version. Other exits are left to :meth:`heal` (they are failures)."""
        done = []
        for a in self.agents:
            if a.running or a.paused or a.proc is None or "holds retired version" not in a.proc.output():
                continue
            self.agent_refusals.append(self.exit_of(a))
            shutil.rmtree(a.keys_dir, ignore_errors=True)
            a.keys_dir.mkdir(mode=0o700)
            a.start(wait=False)
            done.append(f"removed agent {a.name}'s retired key files and started it again")
        return done

    @staticmethod
    def exit_of(a: Agent) -> dict[str, Any]:
        code = a.proc.proc.returncode if a.proc is not None and a.proc.proc is not None else None
        return {"agent": a.name, "code": code, "tail": a.proc.output()[-1500:] if a.proc else "", "t": time.monotonic()}

    def wait_clients(self, names: list[str], timeout: float) -> dict[str, int | None]:
        """Waits for these clients to exit; kills (by pid) those that do not in time."""
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for c in self.clients:
            if c.name not in names:
                continue
            try:
                codes[c.name] = c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.signal(signal.SIGCONT)
                c.proc.kill()
                c.proc.wait(5)
                codes[c.name] = None
        return codes

    def write_logs(self) -> None:
        for a in self.agents:
            (self.logs / f"agent-{a.name}.log").write_text(a.output())

    def stop(self) -> None:
        """Stops every process this object started, each by its pid; the database last."""
        for c in self.clients:
            if c.proc.poll() is None:
                c.signal(signal.SIGCONT)
                c.proc.kill()
                c.proc.wait(5)
        for a in self.agents:
            if a.proc is not None:
                with contextlib.suppress(Exception):
                    a.proc.stop()
        with contextlib.suppress(Exception):
            self.write_logs()
        for r in self.replicas:
            if r.server is not None:
                if r.paused:
                    r.server.signal(signal.SIGCONT)
                with contextlib.suppress(Exception):
                    r.server.stop()
        if self.proxy is not None:
            self.proxy.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.stop("fast")
        if self.pair is not None:
            with contextlib.suppress(Exception):
                self.pair.stop()
            # Into logs/, where the key-leak check reads every PostgreSQL log.
            for server in (self.pair.primary, self.pair.standby):
                with contextlib.suppress(OSError):
                    shutil.copyfile(server.log, self.logs / f"postgres-{server.data.name}.log")
        self._nowhere.close()

    def remove(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


class SetupError(RuntimeError):
    """The cluster cannot be set up on this machine (a missing peer): exit 2 with this message."""


def missing_server() -> str:
    """Why the replicated pair cannot run here ("" when it can)."""
    from replicated import _BIN_ROOT

    if any(_BIN_ROOT.glob("*/bin/postgres")) and any(_BIN_ROOT.glob("*/bin/pg_basebackup")):
        return ""
    return (
        "the failover fault needs Debian's PostgreSQL server for a primary and a streaming standby "
        f"(no {_BIN_ROOT}/*/bin/postgres): apt-get install postgresql, or run without the fault: --faults failover=0"
    )


def _server_name(server: Any) -> str:
    return f"pg-{server.data.name}"


def _server_running(server: Any) -> bool:
    return server.proc is not None and server.proc.poll() is None


def _pythonpath() -> str:
    parts = [str(ROOT / "tests")]
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)
