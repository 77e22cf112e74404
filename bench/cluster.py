"""A control plane for benchmarks: its own embedded PostgreSQL and server processes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from muster.core.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cluster:
    """Addresses of the replicas and the database URL."""

    database_url: str
    addresses: list[str]
    pids: list[int]  # the server processes (with --workers: each supervisor; its workers are its children)


@contextlib.contextmanager
def control_plane(
    replicas: int,
    *,
    fsync: bool = True,
    env: dict[str, str] | None = None,
    service: str = "registry",
    workers: int = 1,
) -> Iterator[Cluster]:
    """Starts PostgreSQL and ``replicas`` replicas of ``service`` (each ``workers`` processes on one
    port: ``muster serve --workers``); stops them all at the end."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from harness import ServerProcess

    settings = {
        "MUSTER_LOG_LEVEL": "WARNING",
        "MUSTER_HEARTBEAT_INTERVAL": "5s",
        "MUSTER_CHECK_IN_WINDOW": "15s",
        "MUSTER_LEASE_TTL": "30s",
        "MUSTER_REAP_INTERVAL": "1s",
        "MUSTER_POLL_INTERVAL": "1s",
        "MUSTER_GRACE_PERIOD": "2s",
        **(env or {}),
    }
    with tempfile.TemporaryDirectory(prefix="muster-bench-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", fsync=fsync)
        pg.start()
        procs = []
        try:
            for _ in range(replicas):
                procs.append(ServerProcess(pg.url, [service], env=settings, workers=workers).start())
            yield Cluster(pg.url, [p.address for p in procs], [p.pid for p in procs])
        finally:
            for p in procs:
                p.stop()
            pg.stop()
            os.sync()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time so far of the given processes and their children (``--workers``)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total
