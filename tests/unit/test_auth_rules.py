"""Authentication without a server: the method table, token checks, settings and the open-mode rule."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest

from muster.api.locks.v1 import locks_service_pb2
from muster.api.registry.v1 import registry_service_pb2
from muster.client import ClientConfig
from muster.core import auth
from muster.core.config import Settings

NODE = "node-token-0123456789abcdef"
ADMIN = "admin-token-0123456789abcdef"


def _methods(module, service: str) -> list[str]:
    desc = module.DESCRIPTOR.services_by_name[service]
    return [f"/{desc.full_name}/{m.name}" for m in desc.methods]


def test_admin_methods_are_exactly_the_operator_calls() -> None:
    registry = _methods(registry_service_pb2, "RegistryService")
    locks = _methods(locks_service_pb2, "LocksService")
    admin = {m for m in registry + locks if auth.required_role(m) is auth.Role.ADMIN}
    assert admin == {
        "/muster.api.registry.v1.RegistryService/DeleteNode",
        "/muster.api.registry.v1.RegistryService/ResetCluster",
        "/muster.api.registry.v1.RegistryService/SetNodeMode",
        "/muster.api.locks.v1.LocksService/BreakLock",
    }
    for m in registry + locks:
        if m not in admin:
            assert auth.required_role(m) is auth.Role.NODE, m
    # Built at the same time; named here so that they are never open by accident.
    assert auth.required_role("/muster.api.keys.v1.KeysService/RotateKeys") is auth.Role.ADMIN
    assert auth.required_role("/muster.api.keys.v1.KeysService/ResetKeys") is auth.Role.ADMIN
    assert auth.required_role("/muster.api.keys.v1.KeysService/FetchKeys") is auth.Role.NODE


def test_health_and_reflection_are_open_and_unknown_methods_are_not() -> None:
    assert auth.required_role("/grpc.health.v1.Health/Check") is auth.Role.OPEN
    assert auth.required_role("/grpc.health.v1.Health/Watch") is auth.Role.OPEN
    assert auth.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is auth.Role.OPEN
    assert auth.required_role("/muster.api.future.v1.FutureService/Anything") is auth.Role.NODE
    assert auth.required_role("/grpc.health.v1.HealthX/Check") is auth.Role.NODE


def _interceptor(*, mtls: bool = False, admin: str | None = ADMIN) -> auth.AuthInterceptor:
    return auth.AuthInterceptor(
        hashlib.sha256(NODE.encode()).digest(),
        hashlib.sha256(admin.encode()).digest() if admin else None,
        certificate_is_node=mtls,
    )


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token is not None else ()


JOIN = "/muster.api.registry.v1.RegistryService/JoinNode"
DELETE = "/muster.api.registry.v1.RegistryService/DeleteNode"


def _reason(err: object) -> str | None:
    return None if err is None else err.reason  # type: ignore[attr-defined]


def test_the_interceptor_decides_by_role_and_token() -> None:
    i = _interceptor()
    assert _reason(i.check(JOIN, _md(None))) == "MISSING_TOKEN"
    assert _reason(i.check(JOIN, _md("wrong-token-0123456789"))) == "BAD_TOKEN"
    assert _reason(i.check(JOIN, _md(NODE))) is None
    assert _reason(i.check(JOIN, _md(ADMIN))) is None
    assert _reason(i.check(DELETE, _md(None))) == "MISSING_TOKEN"
    assert _reason(i.check(DELETE, _md("wrong-token-0123456789"))) == "BAD_TOKEN"
    assert _reason(i.check(DELETE, _md(NODE))) == "ADMIN_REQUIRED"
    assert _reason(i.check(DELETE, _md(ADMIN))) is None
    assert _reason(i.check("/grpc.health.v1.Health/Check", _md(None))) is None
    assert _reason(i.check(JOIN, (("authorization", f"Basic {NODE}"),))) == "BAD_TOKEN"
    assert _reason(i.check(JOIN, (("authorization", f"bearer {NODE}"),))) is None
    err = i.check(DELETE, _md(NODE))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.metadata == {"method": DELETE}
    assert i.check(JOIN, _md(None)).code == grpc.StatusCode.UNAUTHENTICATED


def test_under_mtls_a_certificate_is_a_node_but_never_an_admin() -> None:
    i = _interceptor(mtls=True)
    assert i.check(JOIN, _md(None)) is None
    assert _reason(i.check(DELETE, _md(None))) == "ADMIN_REQUIRED"
    assert _reason(i.check(JOIN, _md("wrong-token-0123456789"))) == "BAD_TOKEN"
    assert i.check(DELETE, _md(ADMIN)) is None


def test_without_an_admin_token_admin_calls_are_refused() -> None:
    i = _interceptor(admin=None)
    assert _reason(i.check(DELETE, _md(NODE))) == "ADMIN_REQUIRED"
    assert i.check(JOIN, _md(NODE)) is None


def test_errors_never_echo_the_token() -> None:
    i = _interceptor()
    for token in (None, "wrong-token-0123456789", NODE):
        err = i.check(DELETE, _md(token))
        assert err is not None
        text = str(err) + repr(err.metadata) + repr(err.details())
        assert NODE not in text and "wrong-token" not in text and ADMIN not in text


def test_tokens_are_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    i = _interceptor()
    assert i.check(DELETE, _md(NODE)) is not None
    # Both tokens are compared every time, on fixed-length digests.
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)
    calls.clear()
    assert auth.token_matches(hashlib.sha256(b"x").digest(), None) is False
    assert len(calls) == 1


def test_bearer_token_parsing() -> None:
    assert auth.bearer_token(()) is None
    assert auth.bearer_token((("x-other", "v"),)) is None
    assert auth.bearer_token((("authorization", "Bearer abc"),)) == b"abc"
    assert auth.bearer_token((("authorization", "Bearer"),)) == b""
    assert auth.bearer_token((("authorization", "Token abc"),)) == b""


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:7400", True),
        ("127.1.2.3:0", True),
        ("localhost:7400", True),
        ("[::1]:7400", True),
        ("0.0.0.0:7400", False),
        ("[::]:7400", False),
        ("10.0.0.5:7400", False),
        ("example.com:7400", False),
        (":7400", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert auth.is_loopback(listen) is loopback


def _settings(**kw: object) -> Settings:
    return Settings(**kw)


@pytest.fixture(autouse=True)
def _no_muster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MUSTER_"):
            monkeypatch.delenv(name)


def test_loopback_without_tokens_runs_open_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    sec = auth.load_security(_settings(listen="127.0.0.1:0"))
    assert sec.open and sec.interceptors() == [] and sec.server_credentials() is None
    sec.announce()
    err = capsys.readouterr().err
    assert "running without authentication: anyone on this machine can manage the cluster" in err
    assert "MUSTER_NODE_TOKEN and MUSTER_ADMIN_TOKEN" in err


def test_a_public_address_without_tokens_or_mtls_is_refused() -> None:
    with pytest.raises(auth.AuthConfigError, match="refusing to serve 0.0.0.0:7400 without authentication"):
        auth.load_security(_settings(listen="0.0.0.0:7400"))
    assert auth.load_security(_settings(listen="0.0.0.0:7400", allow_unauthenticated=True)).open
    sec = auth.load_security(_settings(listen="0.0.0.0:7400", node_token=NODE, admin_token=ADMIN))
    assert not sec.open and len(sec.interceptors()) == 1
    assert sec.call_metadata() == [("authorization", f"Bearer {ADMIN}")]
    assert NODE not in repr(sec) and ADMIN not in repr(sec)


def test_bad_token_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(auth.AuthConfigError, match="shorter than 16"):
        auth.load_security(_settings(node_token="short"))
    with pytest.raises(auth.AuthConfigError, match="must differ"):
        auth.load_security(_settings(node_token=NODE, admin_token=NODE))
    f = tmp_path / "node.token"
    f.write_text(NODE + "\n")
    f.chmod(0o600)
    with pytest.raises(auth.AuthConfigError, match="not both"):
        auth.load_security(_settings(node_token=NODE, node_token_file=f))


def test_token_files_must_be_private(tmp_path: Path) -> None:
    f = tmp_path / "node.token"
    f.write_text(f"  {NODE}  \nsecond line ignored\n")
    f.chmod(0o644)
    with pytest.raises(auth.AuthConfigError, match=r"accessible by group or others \(mode 0644\); run: chmod 600"):
        auth.load_security(_settings(node_token_file=f))
    f.chmod(0o600)
    assert auth.read_token_file(f, "node_token_file") == NODE
    sec = auth.load_security(_settings(node_token_file=f, listen="0.0.0.0:0"))
    assert sec.node_digest == hashlib.sha256(NODE.encode()).digest()
    with pytest.raises(auth.AuthConfigError, match="cannot read node_token_file"):
        auth.load_security(_settings(node_token_file=tmp_path / "missing"))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(auth.AuthConfigError, match="is empty"):
        auth.load_security(_settings(node_token_file=empty))


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(auth.AuthConfigError, match="both MUSTER_TLS_CERT_FILE and MUSTER_TLS_KEY_FILE"):
        auth.load_security(_settings(tls_cert_file=pem))
    with pytest.raises(auth.AuthConfigError, match="mTLS"):
        auth.load_security(_settings(tls_client_ca_file=pem))
    # mTLS alone is enough authentication for a public address.
    sec = auth.load_security(_settings(listen="0.0.0.0:0", tls_cert_file=pem, tls_key_file=pem, tls_client_ca_file=pem))
    assert sec.mtls and not sec.open and sec.describe() == "mTLS"


def test_the_client_reads_its_token_and_tls_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert ClientConfig().token is None and ClientConfig().tls is False
    monkeypatch.setenv("MUSTER_NODE_TOKEN", NODE)
    assert ClientConfig().token == NODE
    monkeypatch.setenv("MUSTER_ADMIN_TOKEN", ADMIN)
    assert ClientConfig().token == ADMIN
    monkeypatch.setenv("MUSTER_TOKEN", "explicit-token-0123456789")
    assert ClientConfig().token == "explicit-token-0123456789"
    assert ClientConfig(token=None).token is None
    assert "explicit-token" not in repr(ClientConfig())
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"CA")
    monkeypatch.setenv("MUSTER_TLS_CA_FILE", str(ca))
    cfg = ClientConfig()
    assert cfg.tls and cfg.root_certificates == b"CA"
    monkeypatch.setenv("MUSTER_TLS", "false")
    assert ClientConfig().tls is False
    with pytest.raises(ValueError, match="both client_certificate and client_key"):
        ClientConfig(tls=True, client_certificate=b"C")
