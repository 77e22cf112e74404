"""A PostgreSQL primary and a streaming standby on loopback, for failover tests.

Debian's PostgreSQL server binaries (``apt-get install postgresql``; CI installs them) run the two
servers; as root they run as the ``postgres`` system user. The standby is made with
``pg_basebackup -R`` and streams from the primary over a replication slot. :meth:`fail_over` kills
the primary (an immediate stop: no shutdown checkpoint, nothing more sent to the standby) and
promotes the standby, the way an operator or Patroni does when the primary's machine dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_BIN_ROOT = Path("/usr/lib/postgresql")


def require_peer(what: str, install: str) -> None:
    """A missing peer skips the test, unless MUSTER_REQUIRE_POSTGRES_PEERS=1 (CI), where it fails."""
    import pytest

    if os.environ.get("MUSTER_REQUIRE_POSTGRES_PEERS") == "1":
        pytest.fail(f"MUSTER_REQUIRE_POSTGRES_PEERS=1 but {what} is missing ({install})")
    pytest.skip(f"{what} is missing ({install}; MUSTER_REQUIRE_POSTGRES_PEERS=1 fails instead)")


def server_binaries() -> Path:
    """The newest Debian PostgreSQL server's ``bin`` directory (skips or fails the test without one)."""
    found = sorted(_BIN_ROOT.glob("*/bin/postgres"), key=lambda p: int(p.parent.parent.name))
    if not found:
        require_peer("Debian's PostgreSQL server", "apt-get install postgresql")
    return found[-1].parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL server process over a data directory."""

    def __init__(self, data: Path, port: int, bin_dir: Path, run_as: list[str]) -> None:
        self.data, self.port, self._bin, self._run_as = data, port, bin_dir, run_as
        self.proc: subprocess.Popen[bytes] | None = None
        self.held: list[int] = []  # WAL senders stopped by hold_replication
        self.log = data.parent / f"{data.name}.log"

    def tool(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._run_as, str(self._bin / name), *args], capture_output=True, text=True, check=check, timeout=120
        )

    def start(self, timeout: float = 60) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - the server writes it for its whole life
        self.proc = subprocess.Popen(
            [*self._run_as, str(self._bin / "postgres"), "-D", str(self.data), "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.tool("pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), check=False)
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"PostgreSQL on port {self.port} exited:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL on port {self.port} did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """An immediate stop (SIGQUIT to the postmaster): as if the machine died."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            for pid in self.held:  # stopped senders would keep the postmaster waiting 5 s
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        self.held = []

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def sql(self, statement: str) -> str:
        out = self.tool(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "postgres",
            "-Atqc", statement,
        )  # fmt: skip
        return out.stdout.strip()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


class ReplicatedPostgres:
    """A primary and one standby streaming from it.

    Args:
        root: an empty directory for both data directories and logs.
        synchronous: commit waits for the standby to flush (``synchronous_standby_names``,
            ``synchronous_commit = on``); otherwise replication is asynchronous (the default).
    """

    def __init__(self, root: Path, *, synchronous: bool = False) -> None:
        self.root = root
        self.synchronous = synchronous
        self._bin = server_binaries()
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            uid = int(subprocess.run(["id", "-u", "postgres"], capture_output=True, text=True, check=True).stdout)
            gid = int(subprocess.run(["id", "-g", "postgres"], capture_output=True, text=True, check=True).stdout)
            self._run_as = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
            root.chmod(0o755)
            shutil.chown(root, uid, gid)
        self.primary = PgServer(root / "a", _free_port(), self._bin, self._run_as)
        self.standby = PgServer(root / "b", _free_port(), self._bin, self._run_as)

    def start(self) -> None:
        a = self.primary
        a.tool("initdb", "-D", str(a.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C")
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "max_connections = 300",
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            "wal_log_hints = on",
            "fsync = off",
        ]
        if self.synchronous:
            settings += ["synchronous_standby_names = '*'", "synchronous_commit = on"]
        with open(a.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join(settings) + "\n")
        with open(a.data / "pg_hba.conf", "a") as hba:
            hba.write("host replication all 127.0.0.1/32 trust\n")
        a.start()
        a.sql("SELECT pg_create_physical_replication_slot('standby')")
        self._base_backup(self.standby, a)
        self.standby.start()
        self.wait_streaming()

    def _base_backup(self, standby: PgServer, source: PgServer) -> None:
        shutil.rmtree(standby.data, ignore_errors=True)
        standby.tool(
            "pg_basebackup", "-h", "127.0.0.1", "-p", str(source.port), "-U", "postgres",
            "-D", str(standby.data), "-R", "-X", "stream", "-S", "standby",
        )  # fmt: skip
        with open(standby.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {standby.port}\n")

    def wait_streaming(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.primary.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == "1":
                return
            time.sleep(0.1)
        raise TimeoutError("the standby did not start streaming")

    def hold_replication(self) -> None:
        """Stops the primary's WAL senders: what commits from now on never reaches the standby.

        (They are SIGSTOPped, and SIGKILLed with the primary.) This is the window an
        asynchronous standby lags by, made long enough to lose acknowledged commits for certain.
        """
        for pid in self.primary.sql("SELECT pid FROM pg_stat_replication").split():
            os.kill(int(pid), signal.SIGSTOP)
            self.primary.held.append(int(pid))

    @property
    def url(self) -> str:
        """A multi-host URL naming both servers; only the read-write one is used."""
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"

    def fail_over(self) -> None:
        """Kills the primary and promotes the standby (which becomes :attr:`primary`)."""
        self.primary.kill()
        self.promote()

    def promote(self) -> None:
        """Promotes the standby (the primary is dead): it becomes :attr:`primary`."""
        self.standby.tool("pg_ctl", "promote", "-w", "-D", str(self.standby.data))
        if self.synchronous:  # nobody to wait for until a new standby is attached
            self.standby.sql("ALTER SYSTEM SET synchronous_standby_names = ''")
            self.standby.sql("SELECT pg_reload_conf()")
        self.primary, self.standby = self.standby, self.primary

    def rebuild_standby(self) -> None:
        """Makes the dead old primary a standby of the new one (a fresh base backup)."""
        self.primary.sql("SELECT pg_create_physical_replication_slot('standby')")
        self._base_backup(self.standby, self.primary)
        self.standby.start()
        self.wait_streaming()
        if self.synchronous:
            self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            self.primary.sql("SELECT pg_reload_conf()")

    def stop(self) -> None:
        for server in (self.primary, self.standby):
            with contextlib.suppress(Exception):
                server.stop()
