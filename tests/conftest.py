"""Fixtures: one PostgreSQL for the run (embedded unless MUSTER_TEST_DATABASE_URL), a migrated
template database, and a fresh database per test created from it."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

# The fault-injection run (tests/chaos, `make chaos`) is not collected by the default suite: CI runs
# it once as its own step (`python -m tests.chaos --seconds 60 --seed …` in .ci/run), not once per
# database the suite runs against. MUSTER_CHAOS=1 pytest tests/chaos runs it as a test.
collect_ignore_glob = [] if os.environ.get("MUSTER_CHAOS") else ["chaos/*"]

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

TEMPLATE = "muster_template"
_counter = itertools.count()


def pytest_asyncio_loop_factories(config, item):  # noqa: ANN001, ANN201
    """One loop implementation per run: uvloop by default, MUSTER_TEST_LOOP=asyncio for the smoke run."""
    if os.environ.get("MUSTER_TEST_LOOP", "uvloop") == "asyncio":
        return {"asyncio": asyncio.new_event_loop}
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL server URL whose user may create databases."""
    external = os.environ.get("MUSTER_TEST_DATABASE_URL")
    if external:
        yield external
        return
    from muster.core.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="muster-test-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", fsync=False)
        pg.start()
        try:
            yield pg.url
        finally:
            pg.stop()


async def _admin(url: str):  # noqa: ANN202
    import asyncpg

    return await asyncpg.connect(_with_database(url, "postgres"))


@pytest.fixture(scope="session")
async def template_url(pg_url: str) -> str:
    """A database migrated once, copied for each test."""
    from muster.core.server import run_migrations

    con = await _admin(pg_url)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await con.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await con.close()
    url = _with_database(pg_url, TEMPLATE)
    await run_migrations(url, ["registry", "locks", "keys"], wait=30)
    return url


@pytest.fixture
async def database_url(pg_url: str, template_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"muster_test_{os.getpid()}_{next(_counter)}"
    con = await _admin(pg_url)
    try:
        await con.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    finally:
        await con.close()
    url = _with_database(pg_url, name)
    import asyncpg

    con = await asyncpg.connect(url)
    try:
        # The template's clock last ticked when it was migrated; a fresh database has had no outage.
        await con.execute("UPDATE core.clock SET last_tick = now()")
    finally:
        await con.close()
    yield url
    con = await _admin(pg_url)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture
def own_pg() -> Iterator[object]:
    """A PostgreSQL of this test's own, for tests that stop or restart the database.

    Its directory is under the system temp dir: pytest's own tmp tree is 0700 at every level,
    which the unprivileged PostgreSQL user (when tests run as root) cannot traverse.
    """
    import socket

    from muster.core.embedded import EmbeddedPostgres

    with socket.socket() as sock:  # a fixed port, so that stop() then start() keeps it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="muster-own-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data", port=port, fsync=False)
        pg.start()
        try:
            yield pg
        finally:
            pg.stop("immediate")


@pytest.fixture
def registry_server(database_url: str) -> Iterator[object]:
    """One registry replica (its own process) on a fresh database."""
    from harness import ServerProcess

    server = ServerProcess(database_url).start()
    try:
        yield server
    finally:
        server.stop()
