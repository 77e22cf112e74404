"""Muster through a real PgBouncer in transaction pooling mode (Debian's ``pgbouncer``; CI installs it
and sets MUSTER_REQUIRE_POSTGRES_PEERS=1, without which a missing one skips).

Transaction pooling hands each transaction whichever server connection is free: prepared statements
and session settings do not survive between transactions, and LISTEN does not work. With
``MUSTER_DATABASE_POOLED=true`` the pool keeps no prepared statement and sends no session setting,
and LISTEN and migrations take ``MUSTER_DATABASE_DIRECT_URL``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from harness import Recorder, ServerProcess, registry, wait_for
from replicated import require_peer

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import Cluster

pytestmark = pytest.mark.timeout(180)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pgbouncer(database_url: str):
    """A PgBouncer in transaction mode in front of the test's database; yields its URL."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        require_peer("PgBouncer", "apt-get install pgbouncer")
    db = urlsplit(database_url)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="muster-pgbouncer-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        (root / "users.txt").write_text('"bouncer" ""\n')
        password = f" password={db.password}" if db.password else ""
        (root / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"muster = host={db.hostname} port={db.port} dbname={db.path.lstrip('/')} user={db.username}{password}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {root / 'users.txt'}\n"
            "pool_mode = transaction\ndefault_pool_size = 10\nmax_client_conn = 500\n"
            f"logfile = {root / 'pgbouncer.log'}\n"
        )
        cmd = [binary, str(root / "pgbouncer.ini")]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            cmd[1:1] = ["-u", "postgres"]
            for f in root.iterdir():
                shutil.chown(f, "postgres")
            shutil.chown(root, "postgres")
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PgBouncer did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.05)
            yield f"postgresql://bouncer@127.0.0.1:{port}/muster"
        finally:
            proc.terminate()
            proc.wait(10)


async def test_the_services_work_through_pgbouncer_in_transaction_mode(pgbouncer: str, database_url: str) -> None:
    env = {
        "MUSTER_DATABASE_POOLED": "true",
        "MUSTER_DATABASE_DIRECT_URL": database_url,
        "MUSTER_POLL_INTERVAL": "30s",  # prompt delivery below proves LISTEN works (on the direct URL)
        "MUSTER_POOL_MAX_SIZE": "30",  # more clients than PgBouncer has server connections (10)
    }
    regs = [ServerProcess(pgbouncer, ["registry"], env=env).start() for _ in range(2)]
    locks = ServerProcess(pgbouncer, ["locks"], env=env).start()
    try:
        stop = asyncio.Event()
        watcher = Recorder([regs[1].address])
        watch = asyncio.create_task(watcher.run(stop))
        async with registry(regs[0].address) as stub:
            nodes = [(await stub.JoinNode(pb.JoinNodeRequest(host=f"b{i}", port=1))).node for i in range(20)]

            async def churn(node: node_pb2.Node) -> None:
                for i in range(10):
                    await stub.Heartbeat(pb.HeartbeatRequest(node_id=node.id, lease_id=node.lease_id))
                    mode = node_pb2.Node.MODE_DRAINING if i % 2 == 0 else node_pb2.Node.MODE_ACTIVE
                    await stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node.id, mode=mode))

            await asyncio.gather(*(churn(n) for n in nodes))
            last = await stub.SetNodeMode(
                pb.SetNodeModeRequest(node_id=nodes[0].id, mode=node_pb2.Node.MODE_DRAINING, wait_for_revision=True)
            )
            started = time.monotonic()
            await wait_for(lambda: watcher.through >= last.revision, timeout=10, what="the watcher to follow")
            delivery = time.monotonic() - started
            listed = {n.id: n for n in (await stub.ListNodes(pb.ListNodesRequest())).nodes}

        tokens: list[int] = []

        async def worker() -> None:
            async with Cluster.connect(locks.address) as cluster:
                for _ in range(15):
                    async with cluster.lock("through-the-pooler", wait=timedelta(seconds=30)) as lease:
                        tokens.append(lease.token)

        await asyncio.gather(*(worker() for _ in range(8)))
        stop.set()
        await watch
    finally:
        for s in [*regs, locks]:
            s.stop()

    assert delivery < 3, f"delivery took {delivery:.1f}s: LISTEN did not reach the database"
    assert listed[nodes[0].id].mode == node_pb2.Node.MODE_DRAINING
    assert all(listed[n.id].mode == node_pb2.Node.MODE_ACTIVE for n in nodes[1:])
    assert all(listed[n.id].state == node_pb2.Node.STATE_ONLINE for n in nodes)
    assert sorted(tokens) == list(range(1, 121)), "every grant one token, none twice"
    assert watcher.revisions == sorted(set(watcher.revisions))
    assert watcher.revisions[-1] - watcher.revisions[0] + 1 == len(watcher.revisions) or watcher.resyncs
