"""Authentication and TLS against real server processes.

Every server here is a separate ``muster serve`` process on loopback; certificates are made in the
test with ``cryptography`` (a CA, a server certificate for 127.0.0.1/localhost, client certificates).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT, ServerProcess, error_reason

from muster.api.locks.v1 import locks_service_pb2 as lpb
from muster.api.locks.v1 import locks_service_pb2_grpc
from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import Cluster
from muster.client import errors as E
from muster.core import auth

NODE = "node-secret-token-7f3a9c1e5b"
ADMIN = "admin-secret-token-2d8e4f6a0c"
WRONG = "wrong-secret-token-9b1d3f5a7e"
TOKENS = {"MUSTER_NODE_TOKEN": NODE, "MUSTER_ADMIN_TOKEN": ADMIN}


def _md(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


@pytest.fixture
def token_server(database_url: str) -> Iterator[ServerProcess]:
    server = ServerProcess(database_url, ["registry"], env=TOKENS).start()
    try:
        yield server
    finally:
        server.stop()


async def _refused(call, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value
    assert error_reason(info.value)[0] == reason


async def _read_stream(call) -> None:
    async for _ in call:
        pass


async def _held_open(*messages):
    """A request stream the way clients send one: messages, then the stream stays open (a while)."""
    for m in messages:
        yield m
    await asyncio.sleep(3)  # longer than the server waits; then ends, so no task is left behind


async def _state(stub) -> tuple[list, int]:
    resp = await stub.ListNodes(pb.ListNodesRequest(), metadata=_md(ADMIN))
    return [(n.id, n.state, n.mode) for n in resp.nodes], resp.revision


async def test_bad_credentials_are_refused_and_change_nothing(token_server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(token_server.address) as ch:
        stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
        joined = await stub.JoinNode(
            pb.JoinNodeRequest(host="app1.test", port=8787, wait_for_revision=True), metadata=_md(NODE)
        )
        node_id = joined.node.id
        before = await _state(stub)
        unauth, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
        join = pb.JoinNodeRequest(host="app2.test", port=8787, wait_for_revision=True)
        await _refused(stub.JoinNode(join), unauth, "MISSING_TOKEN")
        await _refused(stub.JoinNode(join, metadata=_md(WRONG)), unauth, "BAD_TOKEN")
        for token, code, reason in [
            (None, unauth, "MISSING_TOKEN"),
            (WRONG, unauth, "BAD_TOKEN"),
            (NODE, denied, "ADMIN_REQUIRED"),
        ]:
            md = _md(token)
            await _refused(
                stub.DeleteNode(pb.DeleteNodeRequest(node_id=node_id, force=True), metadata=md), code, reason
            )
            await _refused(
                stub.SetNodeMode(pb.SetNodeModeRequest(node_id=node_id, mode=node_pb2.Node.MODE_DRAINING), metadata=md),
                code,
                reason,
            )
            await _refused(stub.ResetCluster(pb.ResetClusterRequest(), metadata=md), code, reason)
        await _refused(stub.ListNodes(pb.ListNodesRequest()), unauth, "MISSING_TOKEN")
        await asyncio.sleep(0.3)  # give any (wrongly) accepted change time to be numbered
        assert await _state(stub) == before


async def test_the_client_maps_refusals_to_their_exceptions(token_server: ServerProcess) -> None:
    async with Cluster.connect(token_server.address, token=None, max_attempts=1) as cluster:
        with pytest.raises(E.MissingTokenError) as missing:
            await cluster.list_nodes()
        assert isinstance(missing.value, E.UnauthenticatedError)
    async with Cluster.connect(token_server.address, token=WRONG, max_attempts=1) as cluster:
        with pytest.raises(E.BadTokenError):
            await cluster.list_nodes()
    async with Cluster.connect(token_server.address, token=NODE) as cluster:
        lease = await cluster.join_node("app1.test", 8787)
        await cluster.heartbeat(lease)
        with pytest.raises(E.AdminRequiredError) as denied:
            await cluster.delete_node(lease.node_id, force=True)
        assert isinstance(denied.value, E.PermissionDeniedError)
        assert "MUSTER_ADMIN_TOKEN" in str(denied.value)
    async with Cluster.connect(token_server.address, token=ADMIN) as cluster:
        await cluster.drain_node(lease.node_id)
        await cluster.delete_node(lease.node_id, force=True, wait_for_revision=True)
        assert (await cluster.list_nodes()).nodes == []
        await cluster.reset_cluster()


async def test_streams_need_a_token_too(token_server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(token_server.address) as ch:
        stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
        unauth = grpc.StatusCode.UNAUTHENTICATED
        # unary-stream
        watch = pb.WatchEventsRequest(start_revision=0)
        await _refused(_read_stream(stub.WatchEvents(watch)), unauth, "MISSING_TOKEN")
        await _refused(_read_stream(stub.WatchEvents(watch, metadata=_md(WRONG))), unauth, "BAD_TOKEN")
        # stream-stream
        joined = await stub.JoinNode(pb.JoinNodeRequest(host="app1.test", port=8787), metadata=_md(NODE))
        beat = pb.KeepAliveRequest(heartbeat=pb.HeartbeatRequest(node_id=joined.node.id, lease_id=joined.node.lease_id))

        async def beats():
            yield beat

        await _refused(_read_stream(stub.KeepAlive(_held_open(beat))), unauth, "MISSING_TOKEN")
        await _refused(_read_stream(stub.KeepAlive(_held_open(beat), metadata=_md(WRONG))), unauth, "BAD_TOKEN")
        await _refused(_read_stream(stub.KeepAlive(_held_open())), unauth, "MISSING_TOKEN")  # nothing sent yet
        # ...and the node token opens both.
        replies = [r async for r in stub.KeepAlive(beats(), metadata=_md(NODE))]
        assert len(replies) == 1 and replies[0].heartbeat.HasField("lease_expire_time")
        call = stub.WatchEvents(watch, metadata=_md(NODE))
        first = await asyncio.wait_for(call.read(), 10)
        assert first.WhichOneof("kind") == "resync" and [n.id for n in first.resync.nodes] == [joined.node.id]
        call.cancel()


async def test_the_client_sends_its_token_on_streams_as_on_unary_calls(token_server: ServerProcess) -> None:
    """Regression: grpc.aio dropped an interceptor's metadata on response-streaming calls, so a
    client with a token could join but not watch, keep alive or hold a lock session."""
    from muster.client import Cluster

    async with Cluster.connect(token_server.address, token=NODE) as c:
        lease = await c.join_node("streams.test", 8787)
        async with c.watch(0) as events:
            first = await asyncio.wait_for(anext(aiter(events)), 10)
        assert type(first).__name__ == "Resync" and [n.id for n in first.nodes] == [lease.node_id]
        keep_alive = c.keep_alive(lease)
        try:
            beat = await asyncio.wait_for(keep_alive.beat(), 10)
        finally:
            await keep_alive.close()
        assert beat.lease_expire_time is not None


async def test_health_and_reflection_need_no_token(token_server: ServerProcess) -> None:
    async with grpc.aio.insecure_channel(token_server.address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        replies = [r async for r in reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(ask())]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "muster.api.registry.v1.RegistryService" in names


async def test_lock_service_checks_tokens_and_admin_calls(database_url: str) -> None:
    server = ServerProcess(database_url, ["locks"], env=TOKENS).start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = locks_service_pb2_grpc.LocksServiceStub(ch)
            acquire = lpb.AcquireRequest(name="job", holder="t", request_id="r1")
            acquire.ttl.FromSeconds(30)
            unauth = grpc.StatusCode.UNAUTHENTICATED
            await _refused(stub.Acquire(acquire), unauth, "MISSING_TOKEN")
            held = await stub.Acquire(acquire, metadata=_md(NODE))

            async def keep():
                yield lpb.KeepAliveRequest(lease_id=held.lease.lease_id)

            ka = lpb.KeepAliveRequest(lease_id=held.lease.lease_id)
            await _refused(_read_stream(stub.KeepAlive(_held_open(ka))), unauth, "MISSING_TOKEN")
            assert len([r async for r in stub.KeepAlive(keep(), metadata=_md(NODE))]) == 1
            await _refused(_read_stream(stub.Session(_held_open(lpb.SessionRequest()))), unauth, "MISSING_TOKEN")
            brk = lpb.BreakLockRequest(name="job")
            await _refused(stub.BreakLock(brk, metadata=_md(NODE)), grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
            listed = await stub.ListLocks(lpb.ListLocksRequest(), metadata=_md(NODE))
            assert [lk.name for lk in listed.locks] == ["job"]
            await stub.BreakLock(brk, metadata=_md(ADMIN))
    finally:
        server.stop()


async def test_tokens_never_reach_the_log(database_url: str) -> None:
    server = ServerProcess(database_url, ["registry"], env={**TOKENS, "MUSTER_LOG_LEVEL": "DEBUG"}).start()
    try:
        async with grpc.aio.insecure_channel(server.address) as ch:
            stub = registry_service_pb2_grpc.RegistryServiceStub(ch)
            for token in (None, WRONG, NODE, ADMIN):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.DeleteNode(pb.DeleteNodeRequest(node_id=12345), metadata=_md(token))
                assert all(t not in (info.value.details() or "") for t in (NODE, ADMIN, WRONG))
            await stub.JoinNode(pb.JoinNodeRequest(host="app1.test", port=8787), metadata=_md(NODE))
        assert server.log_path is not None
        log = server.log_path.read_text(errors="replace")
        assert "refused /muster.api.registry.v1.RegistryService/DeleteNode" in log  # the log is really DEBUG-rich
        for secret in (NODE, ADMIN, WRONG):
            assert secret not in log
    finally:
        server.stop()


# -- start-up rules ------------------------------------------------------------------------------


def _serve(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``muster serve registry`` expected to exit at once."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    full.update({"MUSTER_DATABASE_URL": "postgresql://127.0.0.1:1/none", "GRPC_VERBOSITY": "ERROR", **env})
    return subprocess.run(
        [sys.executable, "-m", "muster.cli.main", "serve", "registry"],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_public_address_without_authentication_refuses_to_start() -> None:
    result = _serve({"MUSTER_LISTEN": "0.0.0.0:0"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("muster: refusing to serve 0.0.0.0:0 without authentication")
    assert "MUSTER_NODE_TOKEN" in lines[0] and "MUSTER_TLS_CLIENT_CA_FILE" in lines[0]


def test_a_token_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "node.token"
    f.write_text(NODE + "\n")
    f.chmod(0o644)
    result = _serve({"MUSTER_NODE_TOKEN_FILE": str(f)})
    assert result.returncode != 0
    assert "accessible by group or others (mode 0644); run: chmod 600" in result.stderr
    assert NODE not in result.stderr + result.stdout


async def test_loopback_without_tokens_runs_open_with_a_warning(registry_server: ServerProcess) -> None:
    assert registry_server.log_path is not None
    log = registry_server.log_path.read_text(errors="replace")
    assert "running without authentication: anyone on this machine can manage the cluster" in log
    async with Cluster.connect(registry_server.address, token=None) as cluster:
        lease = await cluster.join_node("app1.test", 8787)
        await cluster.delete_node(lease.node_id, force=True)


async def test_token_files_configure_the_server(database_url: str, tmp_path: Path) -> None:
    files = {}
    for name, value in (("node", NODE), ("admin", ADMIN)):
        f = tmp_path / f"{name}.token"
        f.write_text(f"{value}\n")
        f.chmod(0o600)
        files[f"MUSTER_{name.upper()}_TOKEN_FILE"] = str(f)
    server = ServerProcess(database_url, ["registry"], env={**files, "MUSTER_LISTEN": "0.0.0.0:0"}).start()
    try:
        address = "127.0.0.1:" + server.address.rpartition(":")[2]
        async with Cluster.connect(address, token=NODE) as cluster:
            lease = await cluster.join_node("app1.test", 8787)
            with pytest.raises(E.AdminRequiredError):
                await cluster.delete_node(lease.node_id, force=True)
        async with Cluster.connect(address, token=ADMIN) as cluster:
            await cluster.delete_node(lease.node_id, force=True)
    finally:
        server.stop()


# -- TLS and mTLS --------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    rogue_cert: bytes
    rogue_key: bytes

    @property
    def ca_pem(self) -> bytes:
        return self.ca.read_bytes()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    elif not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _issue("Muster test CA", ca_key, _name("Muster test CA"), ca_key, ca=True)
    server_key = _key()
    server = _issue("127.0.0.1", server_key, ca.subject, ca_key, server=True)
    client_key = _key()
    client = _issue("app1.test", client_key, ca.subject, ca_key)
    rogue_ca_key = _key()
    rogue_key = _key()
    rogue = _issue("intruder", rogue_key, _name("Other CA"), rogue_ca_key)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))
    (d / "server.key").write_bytes(_pem_key(server_key))
    (d / "server.key").chmod(0o600)
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        client.public_bytes(pem),
        _pem_key(client_key),
        rogue.public_bytes(pem),
        _pem_key(rogue_key),
    )


def _tls_env(pki: Pki, *, mtls: bool) -> dict[str, str]:
    env = {"MUSTER_TLS_CERT_FILE": str(pki.server_cert), "MUSTER_TLS_KEY_FILE": str(pki.server_key)}
    if mtls:
        env["MUSTER_TLS_CLIENT_CA_FILE"] = str(pki.ca)
    return env


async def test_tls_with_tokens(database_url: str, pki: Pki) -> None:
    server = ServerProcess(database_url, ["registry"], env={**TOKENS, **_tls_env(pki, mtls=False)}).start()
    try:
        async with Cluster.connect(server.address, token=NODE, tls=True, root_certificates=pki.ca_pem) as cluster:
            await cluster.join_node("app1.test", 8787)
            assert len((await cluster.list_nodes()).nodes) == 1
        # A plain-text client cannot talk to a TLS server.
        async with grpc.aio.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await registry_service_pb2_grpc.RegistryServiceStub(ch).ListNodes(
                    pb.ListNodesRequest(), metadata=_md(NODE), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Nor does a client that does not trust the CA.
        async with grpc.aio.secure_channel(server.address, grpc.ssl_channel_credentials()) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await registry_service_pb2_grpc.RegistryServiceStub(ch).ListNodes(
                    pb.ListNodesRequest(), metadata=_md(NODE), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS does not replace the token.
        async with Cluster.connect(
            server.address, token=None, tls=True, root_certificates=pki.ca_pem, max_attempts=1
        ) as cluster:
            with pytest.raises(E.MissingTokenError):
                await cluster.list_nodes()
    finally:
        server.stop()


async def test_mtls_refuses_clients_without_a_trusted_certificate(database_url: str, pki: Pki) -> None:
    env = {"MUSTER_ADMIN_TOKEN": ADMIN, "MUSTER_LISTEN": "0.0.0.0:0", **_tls_env(pki, mtls=True)}
    server = ServerProcess(database_url, ["registry"], env=env).start()
    address = "127.0.0.1:" + server.address.rpartition(":")[2]
    try:
        async with Cluster.connect(
            address, tls=True, root_certificates=pki.ca_pem, token=None, max_attempts=1
        ) as cluster:
            with pytest.raises(E.UnavailableError):
                await cluster.list_nodes()
        async with Cluster.connect(
            address,
            tls=True,
            root_certificates=pki.ca_pem,
            client_certificate=pki.rogue_cert,
            client_key=pki.rogue_key,
            token=None,
            max_attempts=1,
        ) as cluster:
            with pytest.raises(E.UnavailableError):
                await cluster.list_nodes()
        certified = {
            "tls": True,
            "root_certificates": pki.ca_pem,
            "client_certificate": pki.client_cert,
            "client_key": pki.client_key,
        }
        async with Cluster.connect(address, token=None, **certified) as cluster:
            lease = await cluster.join_node("app1.test", 8787)
            await cluster.heartbeat(lease)
            # A certificate makes a node, never an admin.
            with pytest.raises(E.AdminRequiredError):
                await cluster.delete_node(lease.node_id, force=True)
        async with Cluster.connect(address, token=ADMIN, **certified) as cluster:
            await cluster.delete_node(lease.node_id, force=True)
        # Health stays open to any certified caller.
        creds = grpc.ssl_channel_credentials(pki.ca_pem, pki.client_key, pki.client_cert)
        async with grpc.aio.secure_channel(address, creds) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


# -- the interceptor on every RPC shape (an in-process server: stream-unary has no Muster RPC yet) --


async def test_every_rpc_shape_is_checked() -> None:
    import hashlib

    async def uu(request, context):
        return b"ok"

    async def us(request, context):
        yield b"ok"

    async def su(request_iterator, context):
        async for _ in request_iterator:
            pass
        return b"ok"

    async def ss(request_iterator, context):
        async for _ in request_iterator:
            yield b"ok"

    handlers = {
        "UU": grpc.unary_unary_rpc_method_handler(uu),
        "US": grpc.unary_stream_rpc_method_handler(us),
        "SU": grpc.stream_unary_rpc_method_handler(su),
        "SS": grpc.stream_stream_rpc_method_handler(ss),
    }
    interceptor = auth.AuthInterceptor(
        hashlib.sha256(NODE.encode()).digest(), hashlib.sha256(ADMIN.encode()).digest(), certificate_is_node=False
    )
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("muster.test.v1.ShapeService", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:

            def requests(md):
                if md == _md(NODE):

                    async def gen():
                        yield b"x"

                    return gen()
                return _held_open(b"x")

            calls = {
                "UU": lambda md: ch.unary_unary("/muster.test.v1.ShapeService/UU")(b"x", metadata=md),
                "US": lambda md: _collect(ch.unary_stream("/muster.test.v1.ShapeService/US")(b"x", metadata=md)),
                "SU": lambda md: ch.stream_unary("/muster.test.v1.ShapeService/SU")(requests(md), metadata=md),
                "SS": lambda md: _collect(
                    ch.stream_stream("/muster.test.v1.ShapeService/SS")(requests(md), metadata=md)
                ),
            }
            for shape, call in calls.items():
                await _refused(call(None), grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
                await _refused(call(_md(WRONG)), grpc.StatusCode.UNAUTHENTICATED, "BAD_TOKEN")
                got = await call(_md(NODE))
                assert got in (b"ok", [b"ok"]), shape
    finally:
        await server.stop(None)


async def _collect(call) -> list:
    return [r async for r in call]


async def _muster(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("MUSTER_")}
    full.update(env)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "muster.cli.main",
        *args,
        env=full,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_commands_send_the_token_from_the_environment(token_server: ServerProcess) -> None:
    address = {"MUSTER_ADDRESS": token_server.address}
    code, out, err = await _muster(["list-nodes", "--json"], address)
    assert code == 1 and out == "" and err.startswith("muster: this server requires a token")
    code, _, err = await _muster(["list-nodes", "--json"], {**address, "MUSTER_NODE_TOKEN": NODE})
    assert code == 0, err
    async with Cluster.connect(token_server.address, token=NODE) as cluster:
        lease = await cluster.join_node("app1.test", 8787)
    code, out, err = await _muster(["offline", str(lease.node_id)], {**address, "MUSTER_NODE_TOKEN": NODE})
    assert code == 1 and "needs the admin token" in err and NODE not in err
    code, _, err = await _muster(
        ["offline", str(lease.node_id)], {**address, "MUSTER_NODE_TOKEN": NODE, "MUSTER_ADMIN_TOKEN": ADMIN}
    )
    assert code == 0, err
