"""Fencing for the resources a lock holder writes to.

A lock's token strictly increases per lock name. A resource that remembers the highest token it
has accepted refuses a stale holder — one that lost its lease (frozen, partitioned, broken) and
writes anyway. For PostgreSQL-backed resources, keep a ``fence`` column on the guarded row and make
every write conditional on it::

    ok = await fenced_update(con, "app.jobs", key={"id": 7}, values={"state": "done"}, token=lease.token)
    if not ok:
        raise RuntimeError("a newer holder wrote this row: stop")

which runs ``UPDATE app.jobs SET state = $1, fence = $3 WHERE id = $2 AND fence <= $3``. Works
with any asyncpg-compatible connection (the client itself does not depend on asyncpg).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _quote(name: str) -> str:
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(p) for p in parts):
        raise ValueError(f"{name!r} is not a plain SQL identifier (schema.table or column)")
    return ".".join(f'"{p}"' for p in parts)


def fenced_update_sql(table: str, columns: list[str], keys: list[str], fence_column: str = "fence") -> str:
    """The conditional UPDATE for ``table``: ``$1..$n`` the values, then the keys, then the token.

    Identifiers are checked and quoted; values are always parameters.
    """
    if not keys:
        raise ValueError("at least one key column is required")
    n = len(columns)
    sets = [f"{_quote(c)} = ${i + 1}" for i, c in enumerate(columns)]
    token = f"${n + len(keys) + 1}"
    sets.append(f"{_quote(fence_column)} = {token}")
    where = [f"{_quote(k)} = ${n + i + 1}" for i, k in enumerate(keys)]
    where.append(f"{_quote(fence_column)} <= {token}")
    return f"UPDATE {_quote(table)} SET {', '.join(sets)} WHERE {' AND '.join(where)}"


async def fenced_update(
    con: Any, table: str, *, key: Mapping[str, Any], values: Mapping[str, Any], token: int, fence_column: str = "fence"
) -> bool:
    """Writes ``values`` to the row(s) at ``key`` only if ``token`` is at least the row's fence.

    Returns:
        True if the write was accepted; False if a newer token has written (or no row matched).
    """
    sql = fenced_update_sql(table, list(values), list(key), fence_column)
    status = await con.execute(sql, *values.values(), *key.values(), token)
    return not str(status).endswith(" 0")
