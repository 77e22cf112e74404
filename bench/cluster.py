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


@contextlib.contextmanager
def control_plane(
    replicas: int, *, fsync: bool = True, env: dict[str, str] | None = None, service: str = "registry"
) -> Iterator[Cluster]:
    """Starts PostgreSQL and ``replicas`` processes of ``service``; stops them all at the end."""
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
                procs.append(ServerProcess(pg.url, [service], env=settings).start())
            yield Cluster(pg.url, [p.address for p in procs])
        finally:
            for p in procs:
                p.stop()
            pg.stop()
            os.sync()
