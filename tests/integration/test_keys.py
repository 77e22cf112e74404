"""The keys service against real replicas: definition races, refusals, fetch audit, rotation, keys at rest."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
from pathlib import Path

import asyncpg
import pytest
from harness import ServerProcess, servers, wait_for

from muster.client import Cluster, KeyFingerprints, LocalKeyFileError, keyfiles
from muster.client import errors as E
from muster.keys import crypto

MASTER = os.urandom(32)
ENV = {"MUSTER_MASTER_KEY": base64.b64encode(MASTER).decode(), "MUSTER_KEY_GRACE_PERIOD": "1s"}


@pytest.fixture
def keys_server(database_url: str):
    with servers(database_url, 1, env=ENV, service="keys") as (server,):
        yield server


def _fps(paths: keyfiles.KeyPaths) -> KeyFingerprints:
    local = keyfiles.check(paths)
    return KeyFingerprints(local.cookie_fingerprint, local.launcher_fingerprint)


async def _db(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return await con.fetch(query, *args)
    finally:
        await con.close()


async def test_ten_nodes_starting_at_once_define_exactly_one_key_set(database_url: str, tmp_path: Path) -> None:
    with servers(database_url, 2, env=ENV, service="keys") as procs:
        dirs = [keyfiles.KeyPaths.in_dir(tmp_path / f"node{i}") for i in range(10)]

        async def start(i: int) -> object:
            async with Cluster.connect(procs[i % 2].address) as c:
                return await c.ensure_keys(i + 1, dirs[i])

        results = await asyncio.wait_for(asyncio.gather(*(start(i) for i in range(10))), 60)
        assert sum(r.action == "defined" for r in results) == 1
        assert {r.fingerprints for r in results} == {results[0].fingerprints}
        assert {p.secure_cookie_key.read_bytes() for p in dirs} == {dirs[0].secure_cookie_key.read_bytes()}
        for p in dirs:
            for f in p.all():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600
            assert _fps(p) == results[0].fingerprints
        rows = await _db(database_url, "SELECT version, state FROM keys.versions")
        assert [(r["version"], r["state"]) for r in rows] == [(1, 2)]
        defined = await _db(database_url, "SELECT count(*) AS n FROM core.events WHERE kind LIKE '%.KeysDefined'")
        assert defined[0]["n"] == 1
        async with Cluster.connect(procs[0].address) as c:
            status = await c.key_status()
        assert sorted(n.node_id for n in status.nodes) == list(range(1, 11))
        assert all(n.acknowledged_versions == (1,) for n in status.nodes)


async def test_ten_concurrent_uploads_exactly_one_defines_and_the_rest_are_refused(
    database_url: str, tmp_path: Path
) -> None:
    with servers(database_url, 2, env=ENV, service="keys") as procs:
        locals_ = [keyfiles.check(keyfiles.generate_keys(tmp_path / f"n{i}")) for i in range(10)]

        async def upload(i: int) -> object:
            async with Cluster.connect(procs[i % 2].address) as c:
                try:
                    return await c.upload_keys(
                        i + 1,
                        secure_cookie_key=locals_[i].cookie_key,
                        launcher_private_key_pem=locals_[i].launcher_private_pem,
                    )
                except E.InvalidSecureCookieKeyError as exc:
                    return exc

        results = await asyncio.wait_for(asyncio.gather(*(upload(i) for i in range(10))), 60)
        winners = [i for i, r in enumerate(results) if not isinstance(r, Exception) and r.defined]
        assert len(winners) == 1
        w = winners[0]
        assert results[w].version.fingerprints == KeyFingerprints(
            locals_[w].cookie_fingerprint, locals_[w].launcher_fingerprint
        )
        for i, r in enumerate(results):
            if i != w:
                assert isinstance(r, E.InvalidSecureCookieKeyError)
                assert r.metadata["cluster_fingerprint"] == locals_[w].cookie_fingerprint
                assert r.metadata["node_fingerprint"] == locals_[i].cookie_fingerprint


async def test_the_first_nodes_uploaded_keys_become_the_clusters(keys_server, tmp_path: Path) -> None:
    first = keyfiles.generate_keys(tmp_path / "first")
    later = keyfiles.KeyPaths.in_dir(tmp_path / "later")
    async with Cluster.connect(keys_server.address) as c:
        assert (await c.ensure_keys(1, first)).action == "uploaded"
        assert (await c.ensure_keys(2, later)).action == "fetched"
        assert (await c.ensure_keys(1, first)).action == "matched"
    assert later.secure_cookie_key.read_bytes() == first.secure_cookie_key.read_bytes()
    assert later.launcher_key.read_bytes() == first.launcher_key.read_bytes()
    assert _fps(later) == _fps(first)


async def _snapshot(url: str) -> tuple:
    versions = await _db(url, "SELECT version, state, cookie_fingerprint, launcher_fingerprint FROM keys.versions")
    nodes = await _db(url, "SELECT node_id, live FROM keys.nodes ORDER BY node_id")
    acks = await _db(url, "SELECT node_id, version FROM keys.node_acks ORDER BY 1, 2")
    events = await _db(url, "SELECT count(*) AS n FROM core.events")
    return [tuple(r) for r in versions], [tuple(r) for r in nodes], [tuple(r) for r in acks], events[0]["n"]


async def test_mismatched_keys_are_refused_with_both_fingerprints_and_nothing_changes(
    keys_server, database_url: str, tmp_path: Path
) -> None:
    cluster_keys = keyfiles.generate_keys(tmp_path / "cluster")
    other = keyfiles.check(keyfiles.generate_keys(tmp_path / "other"))
    mine = keyfiles.check(cluster_keys)
    async with Cluster.connect(keys_server.address) as c:
        await c.ensure_keys(1, cluster_keys)
        before = await _snapshot(database_url)
        with pytest.raises(E.InvalidSecureCookieKeyError) as cookie:
            await c.verify_keys(2, KeyFingerprints(other.cookie_fingerprint, mine.launcher_fingerprint))
        assert cookie.value.code.name == "FAILED_PRECONDITION"
        assert cookie.value.metadata["node_fingerprint"] == other.cookie_fingerprint
        assert cookie.value.metadata["cluster_fingerprint"] == mine.cookie_fingerprint
        assert "muster" not in cookie.value.metadata["fix"] or cookie.value.metadata["fix"]
        with pytest.raises(E.InvalidLauncherKeyError) as launcher:
            await c.verify_keys(3, KeyFingerprints(mine.cookie_fingerprint, other.launcher_fingerprint))
        assert launcher.value.metadata["node_fingerprint"] == other.launcher_fingerprint
        assert launcher.value.metadata["cluster_fingerprint"] == mine.launcher_fingerprint
        with pytest.raises(E.InvalidSecureCookieKeyError):
            await c.upload_keys(4, secure_cookie_key=other.cookie_key)
        assert await _snapshot(database_url) == before


async def test_weak_keys_garbage_pem_and_open_key_files_are_refused(
    keys_server, database_url: str, tmp_path: Path
) -> None:
    async with Cluster.connect(keys_server.address) as c:
        with pytest.raises(E.InvalidArgumentError) as weak:
            await c.upload_keys(1, secure_cookie_key=b"12345678")
        assert weak.value.field == "secure_cookie_key"
        assert "head -c 32 /dev/urandom" in str(weak.value) and "muster keys generate" in str(weak.value)
        assert weak.value.metadata["length"] == "8"
        with pytest.raises(E.LauncherKeyUnreadableError) as pem:
            await c.upload_keys(
                1, launcher_private_key_pem="-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"
            )
        assert pem.value.reason == "ERROR_READING_LAUNCHER_KEY" and pem.value.field == "launcher_private_key_pem"
        assert "nope" not in str(pem.value)
        assert (await _db(database_url, "SELECT count(*) AS n FROM keys.versions"))[0]["n"] == 0
        paths = keyfiles.generate_keys(tmp_path / "open")
        os.chmod(paths.launcher_key, 0o644)
        with pytest.raises(LocalKeyFileError) as perms:
            await c.ensure_keys(1, paths)
        assert perms.value.reason == "INVALID_KEY_PERMISSIONS" and perms.value.metadata["mode"] == "0644"
        assert not (await c.key_status()).defined  # refused locally, before any call


async def test_fetch_hands_out_the_keys_and_is_audited(keys_server, database_url: str, tmp_path: Path) -> None:
    paths = keyfiles.generate_keys(tmp_path / "n1")
    local = keyfiles.check(paths)
    async with Cluster.connect(keys_server.address) as c:
        with pytest.raises(E.KeysNotDefinedError):
            await c.fetch_keys(5)
        await c.ensure_keys(1, paths)
        keys = await c.fetch_keys(5)
        assert keys.version == 1 and keys.state == "ACTIVE"
        assert keys.secure_cookie_key == local.cookie_key
        assert keys.fingerprints == KeyFingerprints(local.cookie_fingerprint, local.launcher_fingerprint)
        assert local.cookie_key.hex() not in repr(keys) and "PRIVATE" not in repr(keys)
        with pytest.raises(E.KeyVersionNotFoundError):
            await c.fetch_keys(5, version=7)
        status = await c.key_status()
    (fetch,) = [f for f in status.recent_fetches if f.node_id == 5]
    assert fetch.version == 1 and fetch.fetch_time is not None and fetch.peer
    rows = await _db(database_url, "SELECT node_id, version, fetch_time FROM keys.fetches")
    assert [(r["node_id"], r["version"]) for r in rows] == [(5, 1)]


async def test_another_master_key_cannot_open_the_stored_keys(keys_server, database_url: str, tmp_path: Path) -> None:
    async with Cluster.connect(keys_server.address) as c:
        await c.ensure_keys(1, keyfiles.KeyPaths.in_dir(tmp_path / "n1"))
    env = {**ENV, "MUSTER_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    with servers(database_url, 1, env=env, service="keys") as (other,):
        async with Cluster.connect(other.address) as c:
            with pytest.raises(E.MasterKeyMismatchError) as err:
                await c.fetch_keys(2)
    assert err.value.metadata["stored_master_key_id"] == crypto.master_key_id(MASTER)


async def test_rotation_promotes_after_every_live_node_acks_and_the_old_version_retires(
    keys_server, database_url: str, tmp_path: Path
) -> None:
    nodes = {i: keyfiles.KeyPaths.in_dir(tmp_path / f"n{i}") for i in (1, 2)}
    async with Cluster.connect(keys_server.address) as c:
        for i, p in nodes.items():
            await c.ensure_keys(i, p)
        old = _fps(nodes[1])
        v2, revision = await c.rotate_keys(wait_for_revision=True)
        assert v2.version == 2 and v2.state == "PENDING" and revision > 0
        with pytest.raises(E.KeyRotationPendingError):
            await c.rotate_keys()
        new_keys = await c.fetch_keys(1, version=2)
        assert new_keys.state == "PENDING"
        # Each node writes the pending version beside its files and acknowledges it.
        for p in nodes.values():
            keyfiles.install_keys(
                p,
                version=2,
                secure_cookie_key=new_keys.secure_cookie_key,
                launcher_private_pem=new_keys.launcher_private_key_pem,
                launcher_public_pem=new_keys.launcher_public_key_pem,
                promote=False,
            )
            assert _fps(p) == old  # the files themselves wait for the promotion
        # A node that already holds the pending version is accepted; so is the active one.
        assert (await c.verify_keys(0, new_keys.fingerprints)).matched_version == 2
        first = await c.ack_key_version(1, 2, new_keys.fingerprints)
        assert not first.promoted and first.version.state == "PENDING"
        assert (await c.key_status()).pending is not None
        second = await c.ack_key_version(2, 2, new_keys.fingerprints)
        assert second.promoted and second.version.state == "ACTIVE"
        for p in nodes.values():
            keyfiles.promote_version(p, 2)
            assert _fps(p) == new_keys.fingerprints
        status = await c.key_status()
        by_version = {v.version: v for v in status.versions}
        assert by_version[1].state == "RETIRING"
        assert by_version[1].retire_time is not None and by_version[2].promote_time is not None
        grace = (by_version[1].retire_time - by_version[2].promote_time).total_seconds()
        assert abs(grace - 1.0) < 0.01  # counted from promotion, on the database's clock
        assert (await c.verify_keys(0, old)).matched_version == 1  # accepted during the grace period

        async def retired() -> bool:
            return {v.version: v.state for v in (await c.key_status()).versions}[1] == "RETIRED"

        await wait_for(retired, timeout=15, what="version 1 retired")
        with pytest.raises(E.InvalidSecureCookieKeyError) as refused:
            await c.verify_keys(0, old)
        assert refused.value.metadata["node_version"] == "1"
        assert refused.value.metadata["node_version_state"] == "RETIRED"
        assert refused.value.metadata["cluster_fingerprint"] == new_keys.fingerprints.secure_cookie_key
        with pytest.raises(E.KeyVersionNotFoundError):
            await c.fetch_keys(1, version=1)
    rows = await _db(database_url, "SELECT retire_time, promote_time FROM keys.versions WHERE version = 1")
    kinds = await _db(
        database_url, "SELECT kind, time FROM core.events WHERE kind LIKE 'muster.api.keys%' ORDER BY append_id"
    )
    assert [r["kind"].rsplit(".", 1)[1] for r in kinds] == [
        "KeysDefined",
        "KeyVersionAdded",
        "KeyVersionPromoted",
        "KeyVersionRetired",
    ]
    assert kinds[-1]["time"] >= rows[0]["retire_time"]  # retired after its time, by the database's clock


async def test_a_node_going_offline_in_the_registry_completes_a_rotation(database_url: str, tmp_path: Path) -> None:
    with (
        servers(database_url, 1, service="registry") as (reg,),
        servers(database_url, 1, env=ENV, service="keys") as (keys,),
    ):
        async with Cluster.connect(reg.address) as r, Cluster.connect(keys.address) as c:
            leases = [await r.join_node("10.0.0.1", 8000 + i) for i in range(2)]
            ids = [lease.node_id for lease in leases]
            for i, node_id in enumerate(ids):
                await c.ensure_keys(node_id, keyfiles.KeyPaths.in_dir(tmp_path / f"n{i}"))
            await c.rotate_keys()
            new = await c.fetch_keys(ids[0], version=2)
            assert not (await c.ack_key_version(ids[0], 2, new.fingerprints)).promoted
            await r.leave_node(leases[1])  # OFFLINE: no longer live, so the first node's ack suffices

            async def promoted() -> bool:
                return (await c.key_status()).active.version == 2

            await wait_for(promoted, timeout=15, what="version 2 promoted after the node left")
            status = await c.key_status()
            assert {n.node_id: n.live for n in status.nodes} == {ids[0]: True, ids[1]: False}


async def test_a_database_dump_reveals_no_key(keys_server, database_url: str, tmp_path: Path) -> None:
    secrets_: list[bytes] = []
    async with Cluster.connect(keys_server.address) as c:
        await c.ensure_keys(1, keyfiles.generate_keys(tmp_path / "n1"))
        await c.rotate_keys()
        for version in (1, 2):
            k = await c.fetch_keys(1, version=version)
            body = "".join(k.launcher_private_key_pem.strip().splitlines()[1:-1])
            secrets_ += [k.secure_cookie_key, base64.b64decode(body)]
        assert (await c.encrypt_secret("pw")).startswith("muster:v1:")
    con = await asyncpg.connect(database_url)
    try:
        tables = await con.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'"
        )
        dump_text, dump_bytes = [], []
        for t in tables:
            ident = f'"{t["table_schema"]}"."{t["table_name"]}"'
            for row in await con.fetch(f"SELECT * FROM {ident}"):  # noqa: S608 - names from the catalog
                dump_text.append(str(dict(row)))
                dump_bytes += [v for v in row.values() if isinstance(v, bytes)]
    finally:
        await con.close()
    assert any(t["table_schema"] == "keys" for t in tables)
    text = "\n".join(dump_text)
    for secret in secrets_:
        for needle in (secret.hex(), base64.b64encode(secret).decode(), base64.b64encode(secret[:24]).decode()):
            assert needle not in text
        assert not any(secret[:16] in value for value in dump_bytes)


async def test_the_keys_service_refuses_to_start_without_a_master_key(database_url: str) -> None:
    env = {k: v for k, v in ENV.items() if k != "MUSTER_MASTER_KEY"}
    with pytest.raises(RuntimeError) as err:
        ServerProcess(database_url, ["keys"], env=env).start(timeout=60)
    assert "set MUSTER_MASTER_KEY or master_key_file" in str(err.value)


async def test_encrypt_secret_and_reset(keys_server, tmp_path: Path) -> None:
    paths = keyfiles.KeyPaths.in_dir(tmp_path / "n1")
    async with Cluster.connect(keys_server.address) as c:
        first = await c.ensure_keys(1, paths)
        text = await c.encrypt_secret("db-password")
        assert text.startswith(f"muster:v1:{first.fingerprints.secure_cookie_key}:")
        assert keyfiles.decrypt_password(text, paths.secure_cookie_key) == "db-password"
        removed, revision = await c.reset_keys(wait_for_revision=True)
        assert removed == 1 and revision > 0
        assert not (await c.key_status()).defined
        again = await c.ensure_keys(2, keyfiles.KeyPaths.in_dir(tmp_path / "n2"))
        assert again.action == "defined" and again.fingerprints != first.fingerprints


async def test_key_material_never_reaches_the_server_log_at_debug(database_url: str, tmp_path: Path) -> None:
    """Define, fetch, a refused mismatch, rotate, ack, encrypt: the log holds no key byte (raw, hex, base64)."""
    log_path = tmp_path / "server.log"
    server = ServerProcess(database_url, ["keys"], env={**ENV, "MUSTER_LOG_LEVEL": "DEBUG"}, log_path=log_path)
    server.start()
    secrets_: list[bytes] = [MASTER]
    try:
        async with Cluster.connect(server.address) as c:
            await c.ensure_keys(1, keyfiles.generate_keys(tmp_path / "n1"))
            await c.ensure_keys(2, keyfiles.KeyPaths.in_dir(tmp_path / "n2"))
            with pytest.raises(E.InvalidSecureCookieKeyError):
                await c.ensure_keys(3, keyfiles.generate_keys(tmp_path / "n3"))  # a node with other keys
            await c.rotate_keys()
            for version in (1, 2):
                k = await c.fetch_keys(1, version=version)
                body = "".join(k.launcher_private_key_pem.strip().splitlines()[1:-1])
                secrets_ += [k.secure_cookie_key, base64.b64decode(body)]
            for node in (1, 2):
                await c.ack_key_version(node, 2, (await c.fetch_keys(node, version=2)).fingerprints)
            await c.encrypt_secret("database-password")
        secrets_.append((tmp_path / "n3" / keyfiles.COOKIE_FILE).read_bytes())  # the refused node's own key
    finally:
        server.stop()
    log = log_path.read_text(errors="replace")
    assert "DEBUG" in log and len(log) > 500  # the log really ran at DEBUG
    for secret in secrets_:
        for needle in (
            secret.hex(),
            base64.b64encode(secret).decode(),
            base64.b64encode(secret[:24]).decode(),
            base64.urlsafe_b64encode(secret[:24]).decode(),
        ):
            assert needle not in log
        assert secret[:16].decode("latin-1") not in log
    assert "database-password" not in log
