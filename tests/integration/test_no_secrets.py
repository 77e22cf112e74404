"""A full run — define, join, refuse, rotate, fetch, acknowledge, encrypt — with logging at DEBUG and
tracing to an in-memory exporter: no key byte and no token appears in a log record, a span (name,
attributes, events, status), an event of the log, or an error message.

The registry and keys services run in this process (``serve``, the code path of every server
process), so that their spans and log records can be inspected directly.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from pathlib import Path

import asyncpg
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from muster.client import Agent, AgentConfig, Cluster, keyfiles
from muster.client import errors as E
from muster.core import server, telemetry
from muster.core.config import load_settings

MASTER = os.urandom(32)
NODE_TOKEN = "node-" + secrets.token_urlsafe(24)
ADMIN_TOKEN = "admin-" + secrets.token_urlsafe(24)


class _Records(logging.Handler):
    """Every record, formatted, with its extra fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{record.levelname} {record.name} {text} {record.__dict__!r}")


def _needles(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret[:24]).decode(),
        base64.urlsafe_b64encode(secret[:24]).decode(),
        secret[:16].decode("latin-1"),
    ]


def _span_text(span: object) -> str:
    parts = [span.name, repr(dict(span.attributes or {})), span.status.description or ""]  # type: ignore[attr-defined]
    for ev in span.events:  # type: ignore[attr-defined]
        parts += [ev.name, repr(dict(ev.attributes or {}))]
    return "\n".join(parts)


@pytest.fixture
def records():
    handler = _Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_no_key_or_token_reaches_logs_spans_events_or_errors(
    database_url: str, tmp_path: Path, records: _Records
) -> None:
    exporter = InMemorySpanExporter()
    tracing = telemetry.setup_tracing("muster-test", exporter=exporter)
    assert tracing is not None
    settings = load_settings(
        listen="127.0.0.1:0",
        master_key=base64.b64encode(MASTER).decode(),
        node_token=NODE_TOKEN,
        admin_token=ADMIN_TOKEN,
        key_grace_period="1s",
        log_level="DEBUG",
        heartbeat_interval="200ms",
        lease_ttl="3s",
    )
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        server.serve(
            settings, database_url, ["registry", "keys"], on_ready=ready.set_result, stop=stop, tracing=tracing
        )
    )
    found: list[bytes] = [MASTER, NODE_TOKEN.encode(), ADMIN_TOKEN.encode()]
    errors: list[str] = []
    try:
        address = await asyncio.wait_for(ready, 60)
        node_dir, other_dir = tmp_path / "node", tmp_path / "other"
        config = AgentConfig(
            addresses=(address,),
            host_name="n1.test",
            state_dir=tmp_path / "state",
            serve_socket=False,
            key_paths=keyfiles.KeyPaths.in_dir(node_dir),
        )
        async with (
            Cluster.connect(address, token=NODE_TOKEN) as node,
            Cluster.connect(address, token=ADMIN_TOKEN) as admin,
            Agent(node, config) as agent,
        ):
            paths = keyfiles.KeyPaths.in_dir(node_dir)

            async def wait_files(fingerprint: str = "") -> None:
                for _ in range(400):
                    local = keyfiles.check(paths)
                    if local.cookie_fingerprint and local.cookie_fingerprint != fingerprint:
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("the agent did not write the keys")

            await wait_files()  # the cluster's keys were generated and fetched by the agent
            v1 = keyfiles.check(paths)
            # A node with other keys is refused (the refusal names fingerprints only).
            other = keyfiles.generate_keys(other_dir)
            with pytest.raises(E.InvalidSecureCookieKeyError) as refused:
                await node.join_node("n2.test", 8787, keys=keyfiles.check(other))
            errors.append(str(refused.value) + repr(refused.value.metadata))
            # A wrong token and a node token on an admin call are refused.
            async with Cluster.connect(address, token="wrong-" + NODE_TOKEN[::-1]) as wrong:
                with pytest.raises(E.UnauthenticatedError) as bad:
                    await wrong.fetch_keys(agent.node_id or 1)
                errors.append(str(bad.value) + repr(bad.value.metadata))
            with pytest.raises(E.PermissionDeniedError) as denied:
                await node.rotate_keys()
            errors.append(str(denied.value) + repr(denied.value.metadata))
            # Rotation, followed by the agent: fetch, write beside, acknowledge, promote.
            await admin.rotate_keys()
            await wait_files(v1.cookie_fingerprint)
            for version in (1, 2):
                with_keys = await node.fetch_keys(agent.node_id or 1, version=version)
                body = "".join(with_keys.launcher_private_key_pem.strip().splitlines()[1:-1])
                found += [with_keys.secure_cookie_key, base64.b64decode(body)]
            encrypted = await node.encrypt_secret("database-password")
            assert "database-password" not in encrypted
        found += [(other_dir / keyfiles.COOKIE_FILE).read_bytes()]
        event_payloads = await _event_payloads(database_url)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        tracing.shutdown()

    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    # The run was really traced: RPC spans and SQL spans.
    assert {"muster.api.registry.v1.RegistryService/JoinNode", "muster.api.keys.v1.KeysService/FetchKeys"} <= names
    assert "muster.api.registry.v1.RegistryService/KeepAlive" in names  # a streaming call
    refused = [s for s in spans if s.attributes.get("rpc.grpc.status_code") == 16]  # UNAUTHENTICATED
    assert refused and all(s.status.description for s in refused)
    assert any("db.statement" in (s.attributes or {}) for s in spans)
    assert not any("grpc.health" in n for n in names)
    # Background SQL (reaper, clock, health) makes no one-span traces: SQL spans all have a parent.
    assert not [s.name for s in spans if s.parent is None and any(k.startswith("db.") for k in s.attributes or {})]
    span_text = "\n".join(_span_text(s) for s in spans)
    log_text = "\n".join(records.lines)
    assert "DEBUG" in log_text and len(records.lines) > 20  # logging really ran at DEBUG
    error_text = "\n".join(errors)
    for haystack, what in (
        (span_text, "spans"),
        (log_text, "logs"),
        (event_payloads, "events"),
        (error_text, "errors"),
    ):
        for secret in found:
            for needle in _needles(secret):
                assert needle not in haystack, f"a secret reached the {what}"
        assert "database-password" not in haystack


async def _event_payloads(url: str) -> str:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch("SELECT payload FROM core.events")
    finally:
        await con.close()
    raw = b"".join(bytes(r["payload"]) for r in rows)
    assert raw  # there were events
    return raw.decode("latin-1")
