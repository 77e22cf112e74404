"""A run's record on disk, and the database's final state.

``<workdir>/history/<client>.jsonl``: every client operation (see workload.py);
``<workdir>/history/nemesis.jsonl``: every fault; ``<workdir>/run.json``: the run's parameters;
``<workdir>/final.json``: the database at the end (see :func:`snapshot`). The checkers read only
these files (and the agents' key directories and the logs), so a kept run can be checked again:
``python -m tests.chaos --check DIR``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# Every payload kind in the event log, by full name.
_PAYLOADS: dict[str, Any] = {}


def _payload_classes() -> dict[str, Any]:
    if not _PAYLOADS:
        from muster.api.balancer.v1 import balancer_pb2
        from muster.api.events.v1 import event_pb2
        from muster.api.keys.v1 import key_pb2
        from muster.api.locks.v1 import lock_pb2
        from muster.api.registry.v1 import node_pb2

        for module in (balancer_pb2, event_pb2, key_pb2, lock_pb2, node_pb2):
            for d in module.DESCRIPTOR.message_types_by_name.values():
                _PAYLOADS[d.full_name] = getattr(module, d.name)
    return _PAYLOADS


def decode(kind: str, payload_hex: str) -> Any:
    """The payload message of an event as stored in core.events (None for an unknown kind)."""
    cls = _payload_classes().get(kind)
    if cls is None:
        return None
    msg = cls()
    msg.ParseFromString(bytes.fromhex(payload_hex))
    return msg


@dataclass
class Run:
    """Everything a run left behind."""

    workdir: Path
    params: dict[str, Any]
    clients: dict[str, list[dict[str, Any]]]
    faults: list[dict[str, Any]]
    final: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, workdir: Path) -> Run:
        params = json.loads((workdir / "run.json").read_text())
        clients: dict[str, list[dict[str, Any]]] = {}
        faults: list[dict[str, Any]] = []
        for path in sorted((workdir / "history").glob("*.jsonl")):
            records = read_jsonl(path)
            if path.stem == "nemesis":
                faults = records
            else:
                clients[path.stem] = records
        final_path = workdir / "final.json"
        final = json.loads(final_path.read_text()) if final_path.exists() else {}
        return cls(workdir, params, clients, faults, final)

    def role(self, role: str) -> dict[str, list[dict[str, Any]]]:
        """The histories of the clients of one role."""
        names = {c["name"] for c in self.params["clients"] if c["role"] == role}
        return {n: recs for n, recs in self.clients.items() if n in names}

    def client(self, name: str) -> dict[str, Any]:
        return next(c for c in self.params["clients"] if c["name"] == name)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"op": "torn", "line": line[:200]})  # a process killed mid-line
    return out


# -- the database's state ------------------------------------------------------------------------

SNAPSHOT = {
    "head": "SELECT revision, compacted_revision FROM core.head",
    "unnumbered": "SELECT count(*) AS n FROM core.events WHERE revision IS NULL",
    "events": (
        "SELECT revision, kind, node_id, encode(payload, 'hex') AS payload, extract(epoch FROM time) AS time "
        "FROM core.events WHERE revision IS NOT NULL ORDER BY revision"
    ),
    "nodes": (
        "SELECT id, address, host, state, state_reason, mode, health, lease_id, "
        "extract(epoch FROM last_seen_time) AS last_seen FROM registry.nodes ORDER BY id"
    ),
    "sessions": "SELECT id, node_id, user_name, state, moved_from FROM balancer.sessions ORDER BY id",
    "moves": "SELECT old_id, new_id FROM balancer.moves ORDER BY old_id",
    "holds": "SELECT lease_id, name, token, holder FROM locks.holds ORDER BY lease_id",
    "locks": "SELECT name, fence FROM locks.locks ORDER BY name",
    "firings": (
        "SELECT job, scheduled_time::text AS slot, extract(epoch FROM scheduled_time) AS at, holder, token, state, "
        "attempt FROM locks.firings ORDER BY job, scheduled_time"
    ),
    "sections": ("SELECT id, token, phase, worker, extract(epoch FROM at) AS at FROM chaos.sections ORDER BY id"),
    "key_versions": (
        "SELECT version, state, cookie_fingerprint, launcher_fingerprint FROM keys.versions ORDER BY version"
    ),
    "key_nodes": (
        "SELECT n.node_id, n.live, array_remove(array_agg(a.version ORDER BY a.version), NULL) AS acked "
        "FROM keys.nodes n LEFT JOIN keys.node_acks a USING (node_id) GROUP BY n.node_id, n.live"
    ),
    "now": "SELECT extract(epoch FROM clock_timestamp()) AS now",
    # One row per epoch (per timeline the database wrote on): its floor and what survived of the one before.
    "epochs": "SELECT timeline, floor, survived_revision FROM core.epochs ORDER BY floor",
}


def snapshot(url: str, parts: tuple[str, ...] = tuple(SNAPSHOT)) -> dict[str, Any]:
    """A consistent picture of the database: one REPEATABLE READ transaction that first locks the
    event head (as Muster's own snapshots do), so no numbering pass runs meanwhile; ``consistent``
    is False when the snapshot saw a committed change whose event is not numbered yet."""
    import asyncpg

    async def go() -> dict[str, Any]:
        con = await asyncpg.connect(url, timeout=5)
        try:
            async with con.transaction(isolation="repeatable_read"):
                await con.execute("LOCK TABLE core.head IN EXCLUSIVE MODE")
                out: dict[str, Any] = {}
                for name in parts:
                    out[name] = [_plain(dict(r)) for r in await con.fetch(SNAPSHOT[name])]
            head = out["head"][0]["revision"] if "head" in out else None
            out["consistent"] = out.get("unnumbered", [{"n": 0}])[0]["n"] == 0
            out["head_revision"] = head
            return out
        finally:
            await con.close()

    return asyncio.run(go())


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in row.items():
        if isinstance(v, datetime):
            v = v.timestamp()
        elif hasattr(v, "is_finite"):  # Decimal
            v = float(v)
        elif isinstance(v, list | tuple):
            v = list(v)
        out[k] = v
    return out
