"""Numbered SQL migrations, applied in order under an advisory lock.

Each component (``core``, ``registry``, …) keeps ``sql/NNNN_<what>.sql`` files. All pending
migrations are applied in one transaction that first takes a transaction-scoped advisory lock, so
any number of replicas (or ``muster migrate`` processes) may start at once: one applies, the others
wait and then find nothing to do.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import asyncpg

log = logging.getLogger(__name__)

_LOCK_KEY = 0x6D75737465720001  # "muster" + 1: the migration lock
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS core;
CREATE TABLE IF NOT EXISTS core.migrations (
    component text NOT NULL,
    version integer NOT NULL,
    name text NOT NULL,
    applied_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);
"""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file of a component."""

    component: str
    version: int
    name: str
    sql: str


def component_migrations(component: str, package: str) -> list[Migration]:
    """The migrations in ``<package>/sql``, in order."""
    out = []
    for entry in resources.files(package).joinpath("sql").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(component, int(m.group(1)), m.group(2), entry.read_text()))
    out.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in out]
    if versions != list(range(1, len(out) + 1)):
        raise RuntimeError(f"{component} migrations must be numbered 0001.. without gaps: {versions}")
    return out


def all_migrations(components: list[str]) -> list[Migration]:
    """The migrations of ``core`` and of the given service components, core first."""
    ordered = ["core", *[c for c in components if c != "core"]]
    return [m for c in ordered for m in component_migrations(c, f"muster.{c}")]


async def apply(con: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    """Applies the pending migrations; returns the ones this call applied (empty if up to date)."""
    async with con.transaction():
        await con.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await con.execute(_BOOTSTRAP)
        rows = await con.fetch("SELECT component, version FROM core.migrations")
        done = {(r["component"], r["version"]) for r in rows}
        applied = []
        for mig in migrations:
            if (mig.component, mig.version) in done:
                continue
            log.info(
                "applying migration %s %04d_%s",
                mig.component,
                mig.version,
                mig.name,
                extra={"event": "migration_applied"},
            )
            await con.execute(mig.sql)
            await con.execute(
                "INSERT INTO core.migrations (component, version, name) VALUES ($1, $2, $3)",
                mig.component,
                mig.version,
                mig.name,
            )
            applied.append(mig)
    return applied


def sql_dir(package_file: str) -> Path:
    """The ``sql`` directory beside a module file."""
    return Path(package_file).parent / "sql"
