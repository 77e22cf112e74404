"""EmbeddedPostgres runs a real PostgreSQL from the pgserver wheel's binaries."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from muster.core.embedded import EmbeddedPostgres


def _fetchval(url: str, query: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def _execute(url: str, query: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(query)
        finally:
            await conn.close()

    asyncio.run(run())


def _port(pg: EmbeddedPostgres) -> int:
    return int(pg.url.rsplit(":", 1)[1].split("/", 1)[0])


def _gone(pid: int) -> bool:
    """Whether the process has exited (a zombie waiting for init to reap it counts)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def data_dir(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory under tmp_path that the server's user can reach when we are root.

    pytest makes its temp directories 0700; as root the server runs as another user,
    which must traverse them. EmbeddedPostgres only fixes the direct parent (tmp_path).
    """
    if os.geteuid() == 0:
        top = tmp_path_factory.getbasetemp().parent
        for directory in tmp_path.parents:
            os.chmod(directory, stat.S_IMODE(directory.stat().st_mode) | stat.S_IXOTH)
            if directory == top:
                break
    return tmp_path / "pg"


def test_start_query_restart_stop(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir, fsync=False)
    try:
        pg.start()
        assert pg.running
        pid = pg.pid
        assert pid is not None
        assert _fetchval(pg.url, "SELECT 1") == 1
        assert _fetchval(pg.url, "SHOW synchronous_commit") == "on"
        assert _fetchval(pg.url, "SHOW fsync") == "off"
        assert _fetchval(pg.url, "SELECT current_database()") == "muster"
        assert _fetchval(pg.admin_url(), "SELECT current_database()") == "postgres"
        password_file = data_dir.parent / "pg.password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert password_file.stat().st_uid == os.geteuid()
        if os.geteuid() == 0:
            user = subprocess.run(
                ["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True, check=True
            ).stdout.strip()
            assert user and user not in ("root", "0")

        port = _port(pg)
        pg.restart(mode="immediate")
        assert pg.running
        assert pg.pid != pid
        assert _gone(pid)
        assert _port(pg) == port
        assert _fetchval(pg.url, "SELECT 1") == 1

        pid = pg.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        pg.start()  # right away: start() waits for the killed postmaster to be gone
        assert _gone(pid)
        assert _fetchval(pg.url, "SELECT 1") == 1

        pid = pg.pid
        assert pid is not None
        pg.stop()
        assert not pg.running
        assert pg.pid is None
        assert _gone(pid)
        pg.stop()  # idempotent
    finally:
        pg.stop()


def test_data_persists_across_stop_and_start(data_dir: Path) -> None:
    with EmbeddedPostgres(data_dir, fsync=False) as pg:
        _execute(pg.url, "CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
    with EmbeddedPostgres(data_dir, fsync=False) as again:
        assert _fetchval(again.url, "SELECT v FROM kept") == 42


def test_start_again_after_sigkill_with_a_busy_backend(data_dir: Path) -> None:
    pg = EmbeddedPostgres(data_dir, fsync=False)
    busy = threading.Thread(
        target=lambda: _swallow(_execute, pg.url, "SELECT count(*) FROM generate_series(1, 10000000000)"),
        daemon=True,
    )
    try:
        pg.start()
        _execute(pg.url, "CREATE TABLE t (v int); INSERT INTO t VALUES (1)")
        busy.start()
        backend = None
        for _ in range(200):
            backend = _fetchval(
                pg.url,
                "SELECT pid FROM pg_stat_activity WHERE query LIKE '%generate_series%' AND pid <> pg_backend_pid()",
            )
            if backend:
                break
            time.sleep(0.05)
        assert backend
        pid = pg.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert not _gone(backend)  # a busy backend outlives its postmaster for a while
        pg.start()
        assert _gone(backend)
        assert pg.pid != pid
        assert _fetchval(pg.url, "SELECT v FROM t") == 1
    finally:
        pg.stop()
        busy.join(10)


def _swallow(function: Any, *args: Any) -> None:
    try:
        function(*args)
    except Exception:
        pass
