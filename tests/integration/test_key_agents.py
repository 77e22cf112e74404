"""Node agents managing their keys against a real control plane: definition by ten agents at once,
refusals recorded on the node (and nothing else changed), rotation followed without restarts, and
the registry's key check both in-process and over gRPC to a separate keys service."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import stat
import sys
from asyncio.subprocess import PIPE
from pathlib import Path

import asyncpg
import grpc
import pytest
from agents import AgentProcess
from harness import ServerProcess, error_reason, registry, wait_for

from muster.api.registry.v1 import node_pb2
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import Cluster, KeyFingerprints, keyfiles
from muster.client import errors as E

MASTER = os.urandom(32)
ENV = {"MUSTER_MASTER_KEY": base64.b64encode(MASTER).decode(), "MUSTER_KEY_GRACE_PERIOD": "3s"}
KEY_LINE = r"^muster agent: keys (defined|fetched|uploaded|matched)"


@pytest.fixture
def control_plane(database_url: str):
    """Registry and keys in one process (the registry checks keys in-process, as under ``muster up``)."""
    server = ServerProcess(database_url, ["registry,keys"], env=ENV).start()
    try:
        yield server
    finally:
        server.stop()


async def _rows(url: str, query: str) -> list[tuple]:
    con = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await con.fetch(query)]
    finally:
        await con.close()


def _fps(paths: keyfiles.KeyPaths) -> KeyFingerprints:
    local = keyfiles.check(paths)
    return KeyFingerprints(local.cookie_fingerprint, local.launcher_fingerprint)


async def _muster(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "muster.cli.main", *args, env={**env, "COLUMNS": "200"}, stdout=PIPE, stderr=PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def _keys_agent(address: str, directory: Path) -> AgentProcess:
    return AgentProcess([address], args=["--keys-dir", str(directory)])


async def test_ten_agents_starting_at_once_end_with_one_cluster_key(
    control_plane: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    dirs = [tmp_path / f"node{i}" for i in range(10)]
    agents = [_keys_agent(control_plane.address, d) for d in dirs]
    try:
        for a in agents:
            a.start(wait_joined=False)
        for a in agents:
            await a.line(KEY_LINE, 60)
        paths = [keyfiles.KeyPaths.in_dir(d) for d in dirs]
        assert len({p.secure_cookie_key.read_bytes() for p in paths}) == 1
        assert len({p.launcher_key.read_bytes() for p in paths}) == 1
        for p in paths:
            for f in p.all():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert await _rows(database_url, "SELECT version, state FROM keys.versions") == [(1, 2)]
        assert sum(bool(a.lines_matching(r"keys defined")) for a in agents) == 1
        async with Cluster.connect(control_plane.address) as c:
            nodes = (await c.list_nodes()).nodes
            assert sorted(n.state.name for n in nodes) == ["ONLINE"] * 10
            status = await c.key_status()
            assert {n.node_id for n in status.nodes if 1 in n.acknowledged_versions} == {n.id for n in nodes}
    finally:
        for a in agents:
            a.stop()


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


async def test_refused_agents_say_why_their_status_is_set_and_nothing_else_changes(
    control_plane: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    good = _keys_agent(control_plane.address, tmp_path / "good")
    good.start()
    await good.line(KEY_LINE, 30)
    cluster_paths = keyfiles.KeyPaths.in_dir(tmp_path / "good")
    cluster = _fps(cluster_paths)
    other = keyfiles.generate_keys(tmp_path / "other")

    def mismatched_cookie(p: keyfiles.KeyPaths) -> None:
        _write(p.secure_cookie_key, os.urandom(32))

    def mismatched_launcher(p: keyfiles.KeyPaths) -> None:
        _write(p.launcher_key, other.launcher_key.read_bytes())
        _write(p.launcher_pub, other.launcher_pub.read_bytes())

    def open_file(p: keyfiles.KeyPaths) -> None:
        _write(p.secure_cookie_key, cluster_paths.secure_cookie_key.read_bytes(), 0o644)

    def weak_key(p: keyfiles.KeyPaths) -> None:
        _write(p.secure_cookie_key, os.urandom(8))

    def garbage_pem(p: keyfiles.KeyPaths) -> None:
        _write(p.launcher_key, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")

    cases = [
        (mismatched_cookie, "INVALID_SECURE_COOKIE_KEY", [cluster.secure_cookie_key, "remove the node's key files"]),
        (mismatched_launcher, "INVALID_LAUNCHER_KEY", [cluster.launcher_key, _fps(other).launcher_key]),
        (open_file, "INVALID_KEY_PERMISSIONS", ["0644", "chmod 600"]),
        (weak_key, "INVALID_SECURE_COOKIE_KEY", ["8 bytes", "head -c 32 /dev/urandom"]),
        (garbage_pem, "ERROR_READING_LAUNCHER_KEY", ["not a readable PEM private key"]),
    ]
    before_keys = await _rows(database_url, "SELECT version, state, cookie_fingerprint FROM keys.versions")
    try:
        async with Cluster.connect(control_plane.address) as c:
            for i, (spoil, state, words) in enumerate(cases):
                d = tmp_path / f"bad{i}"
                paths = keyfiles.KeyPaths.in_dir(d)
                spoil(paths)
                files_before = {f: f.read_bytes() for f in paths.all() if f.exists()}
                bad = _keys_agent(control_plane.address, d)
                bad.start(wait_joined=False)
                try:
                    assert await bad.exited(30) == 1, bad.output()
                    said = "\n".join(bad.lines_matching(".", stderr=True))
                    for w in words:
                        assert w in said, (state, said)
                finally:
                    bad.stop()
                node = next(n for n in (await c.list_nodes()).nodes if n.host == bad.host_name)
                assert node.status == state, (node, bad.output())
                assert node.state_message and all(w in node.state_message for w in words[:1])
                assert node.state_details.get("fix"), node
                # Nothing else changed: the keys, the good node, and the bad node's own files.
                assert await _rows(database_url, "SELECT version, state, cookie_fingerprint FROM keys.versions") == (
                    before_keys
                )
                assert (await c.get_node(good.node_id)).status == "ONLINE"
                assert {f: f.read_bytes() for f in paths.all() if f.exists()} == files_before
                assert _fps(cluster_paths) == cluster
            assert (await c.get_node(good.node_id)).state_message == ""
            # `muster list-nodes` shows the status, `muster node-status` the reason and the fix.
            first_bad = next(n for n in (await c.list_nodes()).nodes if n.status == "INVALID_SECURE_COOKIE_KEY")
        shown = await _muster("node-status", str(first_bad.id), "--address", control_plane.address)
        assert "Invalid secure cookie key" in shown
        assert f"Expected   {cluster.secure_cookie_key}" in shown and "Fix" in shown, shown
        listed = await _muster("list-nodes", "--address", control_plane.address)
        for word in ("Invalid secure cookie key", "Invalid launcher key", "Invalid key permissions"):
            assert word in listed, listed
    finally:
        good.stop()


async def test_agents_follow_a_rotation_and_the_old_key_is_refused_after_the_grace_period(
    control_plane: ServerProcess, database_url: str, tmp_path: Path
) -> None:
    dirs = [tmp_path / f"node{i}" for i in range(3)]
    agents = [_keys_agent(control_plane.address, d) for d in dirs]
    paths = [keyfiles.KeyPaths.in_dir(d) for d in dirs]
    try:
        for a in agents:
            a.start()
        for a in agents:
            await a.line(KEY_LINE, 30)
        v1 = _fps(paths[0])
        old_files = tmp_path / "old"
        shutil.copytree(dirs[0], old_files, ignore=shutil.ignore_patterns("*.d"))
        async with Cluster.connect(control_plane.address) as c:
            version, _ = await c.rotate_keys()
            assert version.version == 2 and version.state == "PENDING"
            # Every agent writes version 2 beside its files and acknowledges; then it is promoted and
            # every agent replaces its files with it. No agent restarts.
            await wait_for(
                lambda: all(_fps(p).secure_cookie_key == version.fingerprints.secure_cookie_key for p in paths),
                30,
                what="v2 in place",
            )
            status = await c.key_status()
            assert status.active is not None and status.active.version == 2
            assert all(a.running() for a in agents)
            assert len({p.secure_cookie_key.read_bytes() for p in paths}) == 1
            for p in paths:
                assert stat.S_IMODE(p.secure_cookie_key.stat().st_mode) == 0o600
            # During the grace period the old key is still accepted ...
            during = await c.verify_keys(0, v1)
            assert during.outcome == "MATCHED"
            # ... and after it, refused; the agents removed their copies of version 1.
            await wait_for(
                lambda: not any(keyfiles.version_path(p.secure_cookie_key, 1).exists() for p in paths),
                30,
                what="v1 copies removed",
            )
            with pytest.raises(E.InvalidSecureCookieKeyError) as refused:
                await c.verify_keys(0, v1)
            assert refused.value.metadata["node_version_state"] == "RETIRED"
        late = _keys_agent(control_plane.address, old_files)
        late.start(wait_joined=False)
        try:
            assert await late.exited(30) == 1
            assert late.lines_matching("retired version 1", stderr=True), late.output()
        finally:
            late.stop()
        assert all(a.running() for a in agents)
    finally:
        for a in agents:
            a.stop()


async def test_a_separate_keys_service_checks_joins_over_grpc(database_url: str, tmp_path: Path) -> None:
    keys = ServerProcess(database_url, ["keys"], env=ENV).start()
    reg = ServerProcess(database_url, ["registry"], env={**ENV, "MUSTER_KEYS_ADDRESS": keys.address}).start()
    try:
        # Agents talk to the registry and the keys service at their own addresses.
        env = {"MUSTER_KEYS_ADDRESS": keys.address}
        first = AgentProcess([reg.address], args=["--keys-dir", str(tmp_path / "a")], env=env)
        first.start()
        await first.line(KEY_LINE, 30)
        d = tmp_path / "b"
        _write(keyfiles.KeyPaths.in_dir(d).secure_cookie_key, os.urandom(32))
        second = AgentProcess([reg.address], args=["--keys-dir", str(d)], env=env)
        second.start(wait_joined=False)
        try:
            assert await second.exited(30) == 1
        finally:
            second.stop()
            first.stop()
        async with Cluster.connect(reg.address) as c:
            node = next(n for n in (await c.list_nodes()).nodes if n.host == second.host_name)
            assert node.status == "INVALID_SECURE_COOKIE_KEY"
            assert (
                node.state_details["cluster_fingerprint"]
                == _fps(keyfiles.KeyPaths.in_dir(tmp_path / "a")).secure_cookie_key
            )
    finally:
        reg.stop()
        keys.stop()


@pytest.mark.parametrize(
    ("check", "field"),
    [
        (node_pb2.NodeKeyCheck(secure_cookie_key_fingerprint="XYZ"), "key_check.secure_cookie_key_fingerprint"),
        (node_pb2.NodeKeyCheck(launcher_key_fingerprint="0" * 17), "key_check.launcher_key_fingerprint"),
        (
            node_pb2.NodeKeyCheck(
                problem=node_pb2.KeyFileProblem(state=node_pb2.Node.STATE_ONLINE, path="/k", message="m")
            ),
            "key_check.problem.state",
        ),
        (
            node_pb2.NodeKeyCheck(
                problem=node_pb2.KeyFileProblem(state=node_pb2.Node.STATE_INVALID_KEY_PERMISSIONS, message="m")
            ),
            "key_check.problem.path",
        ),
        (
            node_pb2.NodeKeyCheck(
                problem=node_pb2.KeyFileProblem(
                    state=node_pb2.Node.STATE_INVALID_KEY_PERMISSIONS, path="/k", mode=0o100000, message="m"
                )
            ),
            "key_check.problem.mode",
        ),
        (
            node_pb2.NodeKeyCheck(
                problem=node_pb2.KeyFileProblem(
                    state=node_pb2.Node.STATE_INVALID_KEY_PERMISSIONS, path="/k", message="x" * 1025
                )
            ),
            "key_check.problem.message",
        ),
    ],
)
async def test_a_bad_key_check_is_invalid_argument_and_writes_nothing(
    control_plane: ServerProcess, database_url: str, check: node_pb2.NodeKeyCheck, field: str
) -> None:
    async with registry(control_plane.address) as stub:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.JoinNode(pb.JoinNodeRequest(host="n1.test", port=8787, key_check=check))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason, metadata = error_reason(err.value)
    assert (reason, metadata["field"]) == ("INVALID_FIELD", field)
    assert await _rows(database_url, "SELECT id FROM registry.nodes") == []
    assert await _rows(database_url, "SELECT version FROM keys.versions") == []


async def test_refusal_reaches_the_event_stream(control_plane: ServerProcess, tmp_path: Path) -> None:
    async with Cluster.connect(control_plane.address) as c:
        await c.ensure_keys(1, keyfiles.KeyPaths.in_dir(tmp_path / "first"))
        head = (await c.get_cluster()).head_revision
        d = keyfiles.KeyPaths.in_dir(tmp_path / "bad")
        _write(d.secure_cookie_key, os.urandom(32))
        with pytest.raises(E.InvalidSecureCookieKeyError) as refused:
            await c.join_node("bad.test", 8787, keys=keyfiles.check(d))
        assert refused.value.metadata["node_fingerprint"] == _fps(d).secure_cookie_key
        assert "fix" in refused.value.metadata
        async with c.watch(0) as stream:
            snapshot = await anext(aiter(stream))
            assert type(snapshot).__name__ == "Resync" and snapshot.active_key_version == 1
        async with c.watch(head) as stream:
            async for item in stream:
                if getattr(item, "kind", "") == "NodeJoined":
                    assert item.node.status == "INVALID_SECURE_COOKIE_KEY"
                    assert item.node.state_details["node_fingerprint"] == _fps(d).secure_cookie_key
                    assert _fps(d).secure_cookie_key in item.node.state_message
                    break
