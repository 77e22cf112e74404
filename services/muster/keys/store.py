"""Every SQL statement of the keys service, behind named async methods.

**Definition.** The cluster's keys are defined by inserting the one row of ``keys.cluster``
(``ON CONFLICT DO NOTHING``) in the transaction that stores version 1 and appends ``KeysDefined``.
Concurrent definers conflict on its primary key: the loser's insert waits for the winner's commit
and then inserts nothing, and its next statement (READ COMMITTED: a new snapshot) reads the
winner's version 1. So ten nodes starting at once against an empty database produce exactly one
key set, and every one of them is answered with it.

**Rotation and promotion.** ``rotate`` adds version N+1 as PENDING. A PENDING version is promoted
to ACTIVE, and the ACTIVE one demoted to RETIRING with ``retire_time = now() + grace``, in the
transaction that finds every *live* node acknowledged it. Every change of the ingredients
(an acknowledgement, a node becoming not live, a rotation) tries promotion, and the sweep tries it
too; each try locks the ``keys.cluster`` row first, so promotions, rotations and resets serialize
across replicas. The sweep also retires RETIRING versions whose time has come, wiping their sealed
material.

**Live nodes.** A service writes only its own schema and reads no other's, so the keys service
keeps its own list (``keys.nodes``): a node becomes known and live when it calls this service
(verify, upload, fetch, ack), and the registry's events, followed on this process's event bus
(see ``component.py``), set it live when ONLINE and not live otherwise, or remove it when
deleted. Each event is applied only if newer than the last applied to that node (its revision),
so replicas following the same events in any interleaving agree.

Key material is stored only sealed under the master key (``crypto.MasterKey``); it is passed to
SQL as parameters (never literals), so neither statements nor spans carry it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import asyncpg

from muster.api.keys.v1 import key_pb2
from muster.core import events
from muster.core.db import retry_serialization
from muster.keys import crypto
from muster.keys.errors import (
    CookieKeyMismatchError,
    KeyRotationPendingError,
    KeysNotDefinedError,
    KeyVersionNotFoundError,
    LauncherKeyMismatchError,
    MasterKeyMismatchError,
)
from muster.keys.models import (
    Acked,
    Fetch,
    Fingerprints,
    KeyStatus,
    Material,
    NewKeys,
    NodeKeys,
    Outcome,
    Source,
    Uploaded,
    Verified,
    VersionInfo,
    VersionState,
)

log = logging.getLogger(__name__)

IS_DEFINED = "SELECT EXISTS (SELECT 1 FROM keys.cluster)"
DEFINE = """
INSERT INTO keys.cluster (id, source, defined_by) VALUES (1, $1, $2)
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
LOCK_CLUSTER = "SELECT source FROM keys.cluster WHERE id = 1 FOR UPDATE"
INSERT_VERSION = """
INSERT INTO keys.versions (version, state, cookie_fingerprint, launcher_fingerprint, cookie_sealed, launcher_sealed,
                           master_key_id, promote_time)
VALUES ($1, $2::smallint, $3, $4, $5, $6, $7, CASE WHEN $2::smallint = 2 THEN now() END)
RETURNING *
"""
NEXT_VERSION = "SELECT coalesce(max(version), 0) + 1 FROM keys.versions"
ALL_VERSIONS = "SELECT * FROM keys.versions ORDER BY version DESC"
VERSION = "SELECT * FROM keys.versions WHERE version = $1"
ACTIVE_VERSION = "SELECT * FROM keys.versions WHERE state = 2"
PENDING_VERSION = "SELECT * FROM keys.versions WHERE state = 1"
HAS_PENDING = "SELECT EXISTS (SELECT 1 FROM keys.versions WHERE state = 1)"
# A node's own call: it is known and live (a registry event may say otherwise later).
SEEN_NODE = """
INSERT INTO keys.nodes (node_id, live) VALUES ($1, true)
ON CONFLICT (node_id) DO UPDATE SET live = true, update_time = now()
"""
ACK = """
INSERT INTO keys.node_acks (node_id, version) VALUES ($1, $2)
ON CONFLICT (node_id, version) DO NOTHING
"""
MISSING_ACKS = """
SELECT count(*) FROM keys.nodes n
WHERE n.live AND NOT EXISTS (SELECT 1 FROM keys.node_acks a WHERE a.node_id = n.node_id AND a.version = $1)
"""
DEMOTE_ACTIVE = """
UPDATE keys.versions SET state = 3, retire_time = now() + $1::interval
WHERE state = 2
RETURNING *
"""
PROMOTE = "UPDATE keys.versions SET state = 2, promote_time = now() WHERE version = $1 RETURNING *"
RETIRE_DUE = """
UPDATE keys.versions SET state = 4, cookie_sealed = NULL, launcher_sealed = NULL
WHERE state = 3 AND retire_time <= now()
RETURNING *
"""
AUDIT_FETCH = "INSERT INTO keys.fetches (node_id, version, peer) VALUES ($1, $2, $3)"
# A registry event about a node: applied only if newer than the last one applied to it.
NODE_EVENT = """
INSERT INTO keys.nodes (node_id, live, revision) VALUES ($1, $2, $3)
ON CONFLICT (node_id) DO UPDATE SET live = EXCLUDED.live, revision = EXCLUDED.revision, update_time = now()
WHERE keys.nodes.revision < EXCLUDED.revision
RETURNING live
"""
DELETE_NODE = "DELETE FROM keys.nodes WHERE node_id = $1 RETURNING node_id"
RESET_ACKS = "DELETE FROM keys.node_acks"
RESET_VERSIONS = "DELETE FROM keys.versions RETURNING version"
RESET_NODES = "DELETE FROM keys.nodes"
RESET_CLUSTER = "DELETE FROM keys.cluster"
STATUS_NODES = """
SELECT n.node_id, n.live,
       coalesce((SELECT array_agg(a.version ORDER BY a.version) FROM keys.node_acks a WHERE a.node_id = n.node_id),
                '{}') AS versions,
       (SELECT max(f.fetch_time) FROM keys.fetches f WHERE f.node_id = n.node_id) AS last_fetch_time
FROM keys.nodes n ORDER BY n.node_id
"""
RECENT_FETCHES = "SELECT * FROM keys.fetches ORDER BY fetch_id DESC LIMIT $1"
NOW = "SELECT now()"


def version_to_proto(v: VersionInfo) -> key_pb2.KeyVersion:
    """A KeyVersion message (fingerprints only)."""
    msg = key_pb2.KeyVersion(
        version=v.version,
        state=int(v.state),
        fingerprints=key_pb2.KeyFingerprints(
            secure_cookie_key=v.fingerprints.cookie, launcher_key=v.fingerprints.launcher
        ),
        master_key_id=v.master_key_id,
    )
    msg.create_time.FromDatetime(v.create_time)
    if v.promote_time is not None:
        msg.promote_time.FromDatetime(v.promote_time)
    if v.retire_time is not None:
        msg.retire_time.FromDatetime(v.retire_time)
    return msg


def _contexts(version: int) -> tuple[str, str]:
    return f"v{version}/cookie", f"v{version}/launcher"


def new_keys(cookie_key: bytes | None, launcher: crypto.LauncherKeyPair | None) -> NewKeys:
    """Key material to store: the given pieces, and generated ones for what is missing."""
    cookie = cookie_key if cookie_key else crypto.generate_cookie_key()
    pair = launcher or crypto.generate_launcher_pair()
    return NewKeys(cookie, pair.private_pem, Fingerprints(crypto.cookie_fingerprint(cookie), pair.fingerprint))


class KeyStore:
    """The keys service's tables.

    Args:
        pool: the shared pool.
        numberer: this process's numbering passes (kicked after every commit that appended events).
        master_key: seals and opens key material.
        grace_period: how long a replaced version stays accepted after the new one's promotion.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        numberer: events.Numberer,
        master_key: crypto.MasterKey,
        *,
        grace_period: timedelta,
    ) -> None:
        self._pool = pool
        self._numberer = numberer
        self._master = master_key
        self.grace_period = grace_period

    def _committed(self) -> None:
        self._numberer.kick()

    async def revision_of(self, append_id: int) -> int:
        """Waits until the event appended as ``append_id`` is numbered; returns its revision."""
        return await self._numberer.revision_of(append_id)

    # -- helpers --------------------------------------------------------------------------------

    async def _insert_version(
        self, con: asyncpg.Connection, version: int, state: VersionState, keys: NewKeys
    ) -> VersionInfo:
        cookie_ctx, launcher_ctx = _contexts(version)
        row = await con.fetchrow(
            INSERT_VERSION,
            version,
            int(state),
            keys.fingerprints.cookie,
            keys.fingerprints.launcher,
            self._master.seal(keys.cookie_key, cookie_ctx),
            self._master.seal(keys.launcher_private_pem.encode("ascii"), launcher_ctx),
            self._master.id,
        )
        return VersionInfo.from_row(row)

    async def _define(
        self, con: asyncpg.Connection, keys: NewKeys, source: Source, node_id: int
    ) -> tuple[VersionInfo, int] | None:
        """Defines the cluster in ``con``'s transaction; None when another definer won."""
        if await con.fetchval(DEFINE, int(source), node_id) is None:
            return None
        version = await self._insert_version(con, 1, VersionState.ACTIVE, keys)
        if node_id > 0:
            await con.execute(SEEN_NODE, node_id)
            await con.execute(ACK, node_id, 1)
        append_id = await events.append(
            con,
            key_pb2.KeysDefined(version=version_to_proto(version), node_id=node_id, source=int(source)),
            node_id=node_id,
        )
        return version, append_id

    @staticmethod
    def _match(node_id: int, held: Fingerprints, versions: list[VersionInfo]) -> int:
        """The version the held keys match (0 if none held); raises a mismatch error otherwise."""
        accepted = [v for v in versions if v.state.accepted]
        active = next((v for v in versions if v.state is VersionState.ACTIVE), accepted[0] if accepted else None)
        expected = active.fingerprints if active else Fingerprints()
        matched = 0
        for which, fp in (("cookie", held.cookie), ("launcher", held.launcher)):
            if not fp:
                continue
            hit = next((v for v in accepted if getattr(v.fingerprints, which) == fp), None)
            if hit is None:
                old = next((v for v in versions if getattr(v.fingerprints, which) == fp), None)
                extra = {"node_version": old.version, "node_version_state": old.state.name} if old else {}
                cls = CookieKeyMismatchError if which == "cookie" else LauncherKeyMismatchError
                raise cls(node_id, fp, getattr(expected, which), **extra)
            matched = matched or hit.version
        return matched

    async def _versions(self, con: asyncpg.Connection) -> list[VersionInfo]:
        return [VersionInfo.from_row(r) for r in await con.fetch(ALL_VERSIONS)]

    async def _try_promote(self, con: asyncpg.Connection) -> tuple[VersionInfo, int] | None:
        """Promotes the PENDING version if every live node acknowledged it. The caller holds the cluster row."""
        pending = await con.fetchrow(PENDING_VERSION)
        if pending is None:
            return None
        if await con.fetchval(MISSING_ACKS, pending["version"]):
            return None
        previous = await con.fetchrow(DEMOTE_ACTIVE, self.grace_period)
        promoted = VersionInfo.from_row(await con.fetchrow(PROMOTE, pending["version"]))
        payload = key_pb2.KeyVersionPromoted(version=version_to_proto(promoted))
        if previous is not None:
            payload.previous.CopyFrom(version_to_proto(VersionInfo.from_row(previous)))
        append_id = await events.append(con, payload)
        log.info(
            "key version %s promoted to active",
            promoted.version,
            extra={"event": "key_version_promoted", "version": promoted.version},
        )
        return promoted, append_id

    # -- definition and verification -------------------------------------------------------------

    async def active_version(self) -> int:
        """The ACTIVE version's number (0: none)."""
        async with self._pool.acquire() as con:
            return int(await con.fetchval("SELECT coalesce(max(version), 0) FROM keys.versions WHERE state = 2"))

    async def is_defined(self) -> bool:
        """Whether the cluster's keys are defined."""
        async with self._pool.acquire() as con:
            return bool(await con.fetchval(IS_DEFINED))

    async def verify(self, node_id: int, held: Fingerprints) -> Verified:
        """Checks a node's fingerprints; defines the cluster with generated keys if neither has keys.

        Raises:
            CookieKeyMismatchError, LauncherKeyMismatchError: a held key is not an accepted version
                (nothing is changed).
        """
        generated: NewKeys | None = None
        if held.empty and not await self.is_defined():
            generated = await asyncio.to_thread(new_keys, None, None)  # RSA generation: off the loop

        async def attempt() -> Verified:
            async with self._pool.acquire() as con, con.transaction():
                defined, append_id = False, 0
                if generated is not None:
                    won = await self._define(con, generated, Source.GENERATED, node_id)
                    if won is not None:
                        defined, append_id = True, won[1]
                versions = await self._versions(con)
                if not versions:
                    if held.empty:  # defined and reset between our looks: the caller verifies again
                        raise KeysNotDefinedError()
                    return Verified(Outcome.UPLOAD_REQUIRED, 0, ())
                matched = self._match(node_id, held, versions)
                if node_id > 0:
                    await con.execute(SEEN_NODE, node_id)
                    if matched and held.cookie and held.launcher:
                        await con.execute(ACK, node_id, matched)
                outcome = Outcome.MATCHED if held.cookie and held.launcher else Outcome.FETCH_REQUIRED
                accepted = tuple(v for v in versions if v.state.accepted)
                return Verified(outcome, matched, accepted, defined, append_id)

        result = await retry_serialization(attempt)
        if result.defined:
            self._committed()
            log.info(
                "cluster keys defined (generated) by node %s",
                node_id,
                extra={"event": "keys_defined", "node": node_id, "source": "generated"},
            )
        return result

    async def upload(self, node_id: int, cookie_key: bytes | None, launcher: crypto.LauncherKeyPair | None) -> Uploaded:
        """Defines the cluster with a node's own keys if it has none; else checks them like :meth:`verify`.

        Raises:
            CookieKeyMismatchError, LauncherKeyMismatchError: the cluster is defined with other keys.
        """
        keys = await asyncio.to_thread(new_keys, cookie_key, launcher)
        held = Fingerprints(
            keys.fingerprints.cookie if cookie_key else "", keys.fingerprints.launcher if launcher else ""
        )

        async def attempt() -> Uploaded:
            async with self._pool.acquire() as con, con.transaction():
                won = await self._define(con, keys, Source.UPLOADED, node_id)
                if won is not None:
                    return Uploaded(True, won[0], won[1])
                versions = await self._versions(con)
                self._match(node_id, held, versions)
                if node_id > 0:
                    await con.execute(SEEN_NODE, node_id)
                active = next(v for v in versions if v.state is VersionState.ACTIVE)
                return Uploaded(False, active)

        result = await retry_serialization(attempt)
        if result.defined:
            self._committed()
            log.info(
                "cluster keys defined (uploaded) by node %s",
                node_id,
                extra={"event": "keys_defined", "node": node_id, "source": "uploaded"},
            )
        return result

    # -- distribution --------------------------------------------------------------------------

    async def fetch(self, node_id: int, version: int, peer: str) -> Material:
        """A version's key material (0: the ACTIVE one), audited in the same transaction.

        Raises:
            KeysNotDefinedError: no keys yet.
            KeyVersionNotFoundError: no such version, or it is retired.
            MasterKeyMismatchError: it was sealed under another master key.
        """
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(VERSION, version) if version else await con.fetchrow(ACTIVE_VERSION)
            if row is None:
                if not await con.fetchval(IS_DEFINED):
                    raise KeysNotDefinedError()
                raise KeyVersionNotFoundError(version)
            info = VersionInfo.from_row(row)
            if not info.state.accepted:
                raise KeyVersionNotFoundError(info.version, info.state.name)
            if info.master_key_id != self._master.id:
                raise MasterKeyMismatchError(info.version, self._master.id, info.master_key_id)
            cookie_ctx, launcher_ctx = _contexts(info.version)
            cookie = self._master.open(row["cookie_sealed"], cookie_ctx)
            private_pem = self._master.open(row["launcher_sealed"], launcher_ctx).decode("ascii")
            await con.execute(AUDIT_FETCH, node_id, info.version, peer[:200])
            await con.execute(SEEN_NODE, node_id)
        pair = crypto.load_launcher_pair(private_pem)
        log.info(
            "node %s fetched key version %s",
            node_id,
            info.version,
            extra={"event": "keys_fetched", "node": node_id, "version": info.version},
        )
        return Material(info.version, info.state, cookie, private_pem, pair.public_pem, info.fingerprints)

    async def active_cookie_key(self) -> tuple[bytes, str]:
        """The ACTIVE version's cookie key and its fingerprint (for EncryptSecret; not audited as a fetch)."""
        async with self._pool.acquire() as con:
            row = await con.fetchrow(ACTIVE_VERSION)
        if row is None:
            raise KeysNotDefinedError()
        if row["master_key_id"] != self._master.id:
            raise MasterKeyMismatchError(row["version"], self._master.id, row["master_key_id"])
        return self._master.open(row["cookie_sealed"], _contexts(row["version"])[0]), row["cookie_fingerprint"]

    async def derived(self, purpose: str) -> list[tuple[VersionInfo, bytes]]:
        """HKDF-SHA256 keys for ``purpose`` from each accepted version's cookie key, newest first;
        defines the cluster's keys (generated) when it has none."""
        for _ in range(3):
            async with self._pool.acquire() as con:
                rows = [r for r in await con.fetch(ALL_VERSIONS) if VersionState(r["state"]).accepted]
            if rows:
                break
            await self.verify(0, Fingerprints())  # none yet: define (generated), then look again
        out = []
        for row in rows:
            info = VersionInfo.from_row(row)
            if info.master_key_id != self._master.id:
                raise MasterKeyMismatchError(info.version, self._master.id, info.master_key_id)
            cookie = self._master.open(row["cookie_sealed"], _contexts(info.version)[0])
            out.append((info, crypto.derive_key(cookie, purpose)))
        return out

    async def ack(self, node_id: int, version: int, held: Fingerprints) -> Acked:
        """Records that a node holds a version; promotes a PENDING version once every live node has.

        Raises:
            KeyVersionNotFoundError: no such version, or it is retired.
            CookieKeyMismatchError, LauncherKeyMismatchError: the fingerprints are not the version's.
        """

        async def attempt() -> Acked:
            async with self._pool.acquire() as con, con.transaction():
                if await con.fetchval(LOCK_CLUSTER) is None:
                    raise KeysNotDefinedError()
                row = await con.fetchrow(VERSION, version)
                if row is None:
                    raise KeyVersionNotFoundError(version)
                info = VersionInfo.from_row(row)
                if not info.state.accepted:
                    raise KeyVersionNotFoundError(version, info.state.name)
                if held.cookie and held.cookie != info.fingerprints.cookie:
                    raise CookieKeyMismatchError(node_id, held.cookie, info.fingerprints.cookie, version=version)
                if held.launcher and held.launcher != info.fingerprints.launcher:
                    raise LauncherKeyMismatchError(node_id, held.launcher, info.fingerprints.launcher, version=version)
                await con.execute(SEEN_NODE, node_id)
                await con.execute(ACK, node_id, version)
                promoted = await self._try_promote(con) if info.state is VersionState.PENDING else None
                if promoted is not None:
                    return Acked(promoted[0], True, promoted[1])
                return Acked(info, False)

        result = await retry_serialization(attempt)
        if result.promoted:
            self._committed()
        return result

    # -- rotation --------------------------------------------------------------------------------

    async def rotate(self) -> tuple[VersionInfo, int]:
        """Adds a PENDING version (promoted at once when no node is live); returns it and its event's append id.

        Raises:
            KeysNotDefinedError: no keys to rotate.
            KeyRotationPendingError: a PENDING version exists.
        """
        keys = await asyncio.to_thread(new_keys, None, None)
        async with self._pool.acquire() as con, con.transaction():
            if await con.fetchval(LOCK_CLUSTER) is None:
                raise KeysNotDefinedError()
            pending = await con.fetchrow(PENDING_VERSION)
            if pending is not None:
                raise KeyRotationPendingError(pending["version"], await con.fetchval(MISSING_ACKS, pending["version"]))
            number = await con.fetchval(NEXT_VERSION)
            added = await self._insert_version(con, number, VersionState.PENDING, keys)
            append_id = await events.append(con, key_pb2.KeyVersionAdded(version=version_to_proto(added)))
            promoted = await self._try_promote(con)
        self._committed()
        log.info("key version %s added", number, extra={"event": "key_version_added", "version": number})
        return (promoted[0] if promoted else added), append_id

    async def sweep(self) -> int:
        """Retires RETIRING versions whose grace ended and promotes a fully acknowledged PENDING one.

        Returns:
            How many versions changed state.
        """
        changed = 0
        async with self._pool.acquire() as con:
            async with con.transaction():
                retired = [VersionInfo.from_row(r) for r in await con.fetch(RETIRE_DUE)]
                for v in retired:
                    await events.append(con, key_pb2.KeyVersionRetired(version=version_to_proto(v)))
            changed += len(retired)
            for v in retired:
                log.info(
                    "key version %s retired", v.version, extra={"event": "key_version_retired", "version": v.version}
                )
            if await con.fetchval(HAS_PENDING):
                async with con.transaction():
                    if await con.fetchval(LOCK_CLUSTER) is not None and await self._try_promote(con) is not None:
                        changed += 1
        if changed:
            self._committed()
        return changed

    # -- nodes, from the registry's events ----------------------------------------------------------

    async def node_changed(self, node_id: int, live: bool, revision: int) -> bool:
        """Applies a registry event about a node (if newer than the last applied); True if it was applied."""
        async with self._pool.acquire() as con:
            applied = await con.fetchval(NODE_EVENT, node_id, live, revision)
        return applied is not None

    async def node_deleted(self, node_id: int) -> bool:
        """Forgets a deleted node and its acknowledgements."""
        async with self._pool.acquire() as con:
            return await con.fetchval(DELETE_NODE, node_id) is not None

    # -- admin -------------------------------------------------------------------------------------

    async def reset(self) -> tuple[int, int]:
        """Removes every version, acknowledgement, known node and the definition (the fetch audit stays).

        Returns:
            How many versions were removed, and the reset event's append id.
        """
        async with self._pool.acquire() as con, con.transaction():
            await con.fetchval(LOCK_CLUSTER)
            await con.execute(RESET_ACKS)
            removed = len(await con.fetch(RESET_VERSIONS))
            await con.execute(RESET_NODES)
            await con.execute(RESET_CLUSTER)
            append_id = await events.append(con, key_pb2.KeysReset(removed_versions=removed))
        self._committed()
        log.info("cluster keys reset (%s versions removed)", removed, extra={"event": "keys_reset", "removed": removed})
        return removed, append_id

    async def status(self, *, fetch_limit: int = 100) -> KeyStatus:
        """Versions (newest first), known nodes with their acknowledgements, the newest fetches."""
        async with self._pool.acquire() as con, con.transaction(isolation="repeatable_read", readonly=True):
            defined = bool(await con.fetchval(IS_DEFINED))
            versions = tuple(await self._versions(con))
            nodes = tuple(
                NodeKeys(r["node_id"], r["live"], tuple(r["versions"]), r["last_fetch_time"])
                for r in await con.fetch(STATUS_NODES)
            )
            fetches = tuple(
                Fetch(r["node_id"], r["version"], r["fetch_time"], r["peer"])
                for r in await con.fetch(RECENT_FETCHES, fetch_limit)
            )
            now = await con.fetchval(NOW)
        return KeyStatus(defined, versions, nodes, fetches, self.grace_period, now)
