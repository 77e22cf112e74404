"""The keys service's calls: ``cluster.verify_keys(...)``, ``cluster.fetch_keys(...)``, ``cluster.rotate_keys()``…

Results are frozen dataclasses; key material is hidden from their ``repr``. :meth:`KeysApi.ensure_keys`
is a node's whole start-up flow over local key files (check, verify, upload or fetch, write).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from muster.api.keys.v1 import key_pb2
from muster.api.keys.v1 import keys_service_pb2 as pb
from muster.client import keyfiles
from muster.client._channel import Endpoint
from muster.client.errors import LocalKeyFileError


def _ts(ts: Any) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


@dataclass(frozen=True, slots=True)
class KeyFingerprints:
    """Fingerprints of a secure cookie key and a launcher key ("" for a key not held)."""

    secure_cookie_key: str = ""
    launcher_key: str = ""

    def to_proto(self) -> key_pb2.KeyFingerprints:
        """The message."""
        return key_pb2.KeyFingerprints(secure_cookie_key=self.secure_cookie_key, launcher_key=self.launcher_key)

    @classmethod
    def from_proto(cls, msg: key_pb2.KeyFingerprints) -> KeyFingerprints:
        """From the message."""
        return cls(msg.secure_cookie_key, msg.launcher_key)


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """A key version: ``state`` is PENDING, ACTIVE, RETIRING or RETIRED."""

    version: int
    state: str
    fingerprints: KeyFingerprints
    create_time: datetime | None
    promote_time: datetime | None
    retire_time: datetime | None
    master_key_id: str

    @classmethod
    def from_proto(cls, msg: key_pb2.KeyVersion) -> KeyVersion:
        """From the message."""
        return cls(
            msg.version,
            key_pb2.KeyVersion.State.Name(msg.state).removeprefix("STATE_"),
            KeyFingerprints.from_proto(msg.fingerprints),
            _ts(msg.create_time),
            _ts(msg.promote_time),
            _ts(msg.retire_time),
            msg.master_key_id,
        )


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """A verification: ``outcome`` is MATCHED, FETCH_REQUIRED or UPLOAD_REQUIRED."""

    outcome: str
    matched_version: int
    versions: tuple[KeyVersion, ...]
    defined: bool
    revision: int

    @property
    def active(self) -> KeyVersion | None:
        """The ACTIVE version among the accepted ones."""
        return next((v for v in self.versions if v.state == "ACTIVE"), None)


@dataclass(frozen=True, slots=True)
class UploadResult:
    """An upload: ``defined`` when it defined the cluster; ``version`` is the ACTIVE one."""

    defined: bool
    version: KeyVersion
    revision: int


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """A version's keys as fetched. The key bytes are not in the ``repr``."""

    version: int
    state: str
    secure_cookie_key: bytes = field(repr=False)
    launcher_private_key_pem: str = field(repr=False)
    launcher_public_key_pem: str
    fingerprints: KeyFingerprints


@dataclass(frozen=True, slots=True)
class AckResult:
    """An acknowledgement: the version's state after it, and whether it promoted the version."""

    version: KeyVersion
    promoted: bool
    revision: int


@dataclass(frozen=True, slots=True)
class NodeKeyStatus:
    """A node as the keys service knows it."""

    node_id: int
    live: bool
    acknowledged_versions: tuple[int, ...]
    last_fetch_time: datetime | None


@dataclass(frozen=True, slots=True)
class KeyFetch:
    """One audited key fetch."""

    node_id: int
    version: int
    fetch_time: datetime | None
    peer: str


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """``muster keys status``: versions (newest first), nodes and their acknowledgements, recent fetches."""

    defined: bool
    versions: tuple[KeyVersion, ...]
    nodes: tuple[NodeKeyStatus, ...]
    recent_fetches: tuple[KeyFetch, ...]
    grace_period: timedelta
    server_time: datetime | None

    @property
    def active(self) -> KeyVersion | None:
        """The ACTIVE version."""
        return next((v for v in self.versions if v.state == "ACTIVE"), None)

    @property
    def pending(self) -> KeyVersion | None:
        """The PENDING version, if a rotation is under way."""
        return next((v for v in self.versions if v.state == "PENDING"), None)


@dataclass(frozen=True, slots=True)
class NodeKeysResult:
    """What :meth:`KeysApi.ensure_keys` did: ``action`` is matched, uploaded, defined or fetched;
    ``versions`` are the cluster's accepted versions (PENDING, ACTIVE, RETIRING) as it saw them."""

    action: str
    version: int
    fingerprints: KeyFingerprints
    versions: tuple[KeyVersion, ...] = ()


@dataclass(frozen=True, slots=True)
class KeySync:
    """What :meth:`KeysApi.sync_keys` did to a node's key files."""

    action: str  # of ensure_keys: matched, uploaded, defined, fetched
    active_version: int
    installed: tuple[int, ...] = ()  # PENDING versions written beside the files and acknowledged
    promoted: int = 0  # the version the files were replaced with (0: none)
    retired: tuple[int, ...] = ()  # versions whose copies were removed

    @property
    def changed(self) -> bool:
        """Whether any file was written or removed."""
        return bool(self.installed or self.promoted or self.retired or self.action in ("fetched", "defined"))


class KeysApi:
    """The keys service's calls (mixed into :class:`muster.client.Cluster`)."""

    _keys: Endpoint

    async def _keys_call(self, method: str, request: Any, *, retry: bool = True) -> Any:
        return await self._call(self._keys, method, request, retry=retry)  # type: ignore[attr-defined]

    async def verify_keys(
        self, node_id: int, fingerprints: KeyFingerprints | None = None, *, wait_for_revision: bool = False
    ) -> VerifyResult:
        """Checks a node's key fingerprints; defines the cluster (generated keys) if neither has keys.

        Retried safely: a retried definition finds the cluster defined.

        Raises:
            InvalidSecureCookieKeyError, InvalidLauncherKeyError: a key differs from the cluster's
                (``metadata`` has ``node_fingerprint`` and ``cluster_fingerprint``).
        """
        req = pb.VerifyKeysRequest(
            node_id=node_id,
            fingerprints=(fingerprints or KeyFingerprints()).to_proto(),
            wait_for_revision=wait_for_revision,
        )
        resp = await self._keys_call("VerifyKeys", req)
        return VerifyResult(
            pb.VerifyKeysResponse.Outcome.Name(resp.outcome).removeprefix("OUTCOME_"),
            resp.matched_version,
            tuple(KeyVersion.from_proto(v) for v in resp.versions),
            resp.defined,
            resp.revision,
        )

    async def upload_keys(
        self,
        node_id: int,
        *,
        secure_cookie_key: bytes = b"",
        launcher_private_key_pem: str = "",
        launcher_public_key_pem: str = "",
        wait_for_revision: bool = False,
    ) -> UploadResult:
        """Defines the cluster with this node's keys, once, while it has none (a missing piece is generated).

        Raises:
            InvalidArgumentError: a cookie key under 16 bytes.
            LauncherKeyUnreadableError: the launcher key is not a readable PEM private key.
            InvalidSecureCookieKeyError, InvalidLauncherKeyError: the cluster was defined with other keys.
        """
        req = pb.UploadKeysRequest(
            node_id=node_id,
            secure_cookie_key=secure_cookie_key,
            launcher_private_key_pem=launcher_private_key_pem,
            launcher_public_key_pem=launcher_public_key_pem,
            wait_for_revision=wait_for_revision,
        )
        resp = await self._keys_call("UploadKeys", req)
        return UploadResult(resp.defined, KeyVersion.from_proto(resp.version), resp.revision)

    async def fetch_keys(self, node_id: int, *, version: int = 0) -> KeyMaterial:
        """The cluster's keys of ``version`` (0: the ACTIVE one); the fetch is audited for ``node_id``.

        Raises:
            KeysNotDefinedError: no keys yet.
            KeyVersionNotFoundError: no such version, or it is retired.
        """
        resp = await self._keys_call("FetchKeys", pb.FetchKeysRequest(node_id=node_id, version=version))
        k = resp.keys
        return KeyMaterial(
            k.version,
            key_pb2.KeyVersion.State.Name(k.state).removeprefix("STATE_"),
            k.secure_cookie_key,
            k.launcher_private_key_pem,
            k.launcher_public_key_pem,
            KeyFingerprints.from_proto(k.fingerprints),
        )

    async def ack_key_version(
        self, node_id: int, version: int, fingerprints: KeyFingerprints, *, wait_for_revision: bool = False
    ) -> AckResult:
        """Acknowledges that a node holds ``version`` (its fingerprints must be the version's).

        Raises:
            KeyVersionNotFoundError: no such version, or it is retired.
            InvalidSecureCookieKeyError, InvalidLauncherKeyError: the fingerprints are not the version's.
        """
        req = pb.AckKeyVersionRequest(
            node_id=node_id, version=version, fingerprints=fingerprints.to_proto(), wait_for_revision=wait_for_revision
        )
        resp = await self._keys_call("AckKeyVersion", req)
        return AckResult(KeyVersion.from_proto(resp.version), resp.promoted, resp.revision)

    async def rotate_keys(self, *, wait_for_revision: bool = False) -> tuple[KeyVersion, int]:
        """Makes a new PENDING key version (admin). Not retried. Returns it and its revision if asked.

        Raises:
            KeyRotationPendingError: a rotation is still under way.
            KeysNotDefinedError: no keys to rotate.
        """
        resp = await self._keys_call(
            "RotateKeys", pb.RotateKeysRequest(wait_for_revision=wait_for_revision), retry=False
        )
        return KeyVersion.from_proto(resp.version), resp.revision

    async def key_status(self) -> KeyStatus:
        """Versions, their states and fingerprints, nodes and their acknowledgements, recent fetches."""
        resp = await self._keys_call("GetKeyStatus", pb.GetKeyStatusRequest())
        return KeyStatus(
            resp.defined,
            tuple(KeyVersion.from_proto(v) for v in resp.versions),
            tuple(
                NodeKeyStatus(n.node_id, n.live, tuple(n.acknowledged_versions), _ts(n.last_fetch_time))
                for n in resp.nodes
            ),
            tuple(KeyFetch(f.node_id, f.version, _ts(f.fetch_time), f.peer) for f in resp.recent_fetches),
            resp.grace_period.ToTimedelta(),
            _ts(resp.server_time),
        )

    async def reset_keys(self, *, wait_for_revision: bool = False) -> tuple[int, int]:
        """Removes every key version (admin; reset-cluster). Not retried. Returns (removed, revision)."""
        resp = await self._keys_call("ResetKeys", pb.ResetKeysRequest(wait_for_revision=wait_for_revision), retry=False)
        return resp.removed_versions, resp.revision

    async def derive_keys(self, purpose: str) -> list[tuple[int, str, bytes]]:
        """Keys derived for ``purpose`` from each accepted version: (version, state, 32-byte key), newest first.

        Defines the cluster's keys (generated) if it has none. Used by servers (the balancer signs
        session routes with its ``session-routes`` key); the cookie keys themselves never leave.
        """
        resp = await self._keys_call("DeriveKeys", pb.DeriveKeysRequest(purpose=purpose))
        return [(k.version, key_pb2.KeyVersion.State.Name(k.state).removeprefix("STATE_"), k.key) for k in resp.keys]

    async def encrypt_secret(self, plaintext: str) -> str:
        """Encrypts a secret under the ACTIVE cookie key (encrypt-password, done by the server)."""
        resp = await self._keys_call("EncryptSecret", pb.EncryptSecretRequest(plaintext=plaintext))
        return str(resp.ciphertext)

    async def ensure_keys(self, node_id: int, paths: keyfiles.KeyPaths) -> NodeKeysResult:
        """A node's start-up over its key files: check them, verify, upload or fetch, write what is missing.

        A node with no files receives the cluster's (defining it with generated keys if it has none),
        written atomically with mode 0600. The first node holding files uploads them.

        Raises:
            LocalKeyFileError: a local problem (``reason``: INVALID_KEY_PERMISSIONS,
                INVALID_SECURE_COOKIE_KEY, ERROR_READING_LAUNCHER_KEY, INVALID_LAUNCHER_KEY).
            InvalidSecureCookieKeyError, InvalidLauncherKeyError: the files differ from the cluster's.
        """
        local = keyfiles.check(paths)
        if local.problems:
            p = local.problems[0]
            raise LocalKeyFileError(
                p.message,
                reason=p.reason,
                metadata={"path": str(p.path), **({"mode": f"{p.mode:04o}"} if p.mode is not None else {})},
            )
        held = KeyFingerprints(local.cookie_fingerprint, local.launcher_fingerprint)
        result = await self.verify_keys(node_id, held)
        action = "defined" if result.defined else "matched"
        if result.outcome == "UPLOAD_REQUIRED":
            up = await self.upload_keys(
                node_id,
                secure_cookie_key=local.cookie_key,
                launcher_private_key_pem=local.launcher_private_pem,
                launcher_public_key_pem=local.launcher_public_pem,
            )
            action = "uploaded" if up.defined else "matched"
            result = await self.verify_keys(node_id, held)
        if result.outcome == "FETCH_REQUIRED":
            keys = await self.fetch_keys(node_id)
            if local.cookie_fingerprint or local.launcher_fingerprint:
                # Holds one key, lacks the other: write only what is missing.
                if not local.cookie_fingerprint:
                    keyfiles.write_key_file(paths.secure_cookie_key, keys.secure_cookie_key)
                if not local.launcher_fingerprint:
                    keyfiles.write_key_file(paths.launcher_key, keys.launcher_private_key_pem.encode("ascii"))
                    keyfiles.write_key_file(paths.launcher_pub, keys.launcher_public_key_pem.encode("ascii"))
            else:
                keyfiles.install_keys(
                    paths,
                    version=keys.version,
                    secure_cookie_key=keys.secure_cookie_key,
                    launcher_private_pem=keys.launcher_private_key_pem,
                    launcher_public_pem=keys.launcher_public_key_pem,
                    promote=True,
                )
            await self.ack_key_version(node_id, keys.version, keys.fingerprints)
            return NodeKeysResult(
                "defined" if action == "defined" else "fetched", keys.version, keys.fingerprints, result.versions
            )
        return NodeKeysResult(action, result.matched_version, held, result.versions)

    async def sync_keys(self, node_id: int, paths: keyfiles.KeyPaths) -> KeySync:
        """Brings a node's key files in line with the cluster's versions (the agent calls it at start,
        on every key event and after a resync).

        :meth:`ensure_keys` first (check, verify, upload or fetch); then each PENDING version not
        yet held is fetched, written as ``<file>.d/<version>`` and acknowledged; when the ACTIVE
        version is not the one in the files, the files are replaced with it; copies of versions no
        longer accepted (retired) are removed.

        Raises:
            LocalKeyFileError, InvalidSecureCookieKeyError, InvalidLauncherKeyError: as ensure_keys.
        """
        import asyncio

        base = await self.ensure_keys(node_id, paths)
        installed: list[int] = []
        promoted = 0
        accepted = {v.version for v in base.versions}
        for v in sorted(base.versions, key=lambda v: v.version):
            held_copy = keyfiles.version_path(paths.secure_cookie_key, v.version).exists()
            if v.state == "PENDING":
                if not held_copy:
                    await self._install(node_id, paths, v.version, promote=False)
                    installed.append(v.version)
                await self.ack_key_version(node_id, v.version, v.fingerprints)
            elif v.state == "ACTIVE":
                current = await asyncio.to_thread(keyfiles.check, paths)
                if current.cookie_fingerprint == v.fingerprints.secure_cookie_key:
                    continue
                if held_copy:
                    await asyncio.to_thread(keyfiles.promote_version, paths, v.version)
                else:
                    await self._install(node_id, paths, v.version, promote=True)
                promoted = v.version
                await self.ack_key_version(node_id, v.version, v.fingerprints)
        retired = [n for n in keyfiles.held_versions(paths) if n not in accepted]
        for n in retired:
            await asyncio.to_thread(keyfiles.retire_version, paths, n)
        active = next((v.version for v in base.versions if v.state == "ACTIVE"), base.version)
        return KeySync(base.action, active, tuple(installed), promoted, tuple(retired))

    async def _install(self, node_id: int, paths: keyfiles.KeyPaths, version: int, *, promote: bool) -> None:
        """Fetches a version and writes it beside the files (and over them when ``promote``)."""
        import asyncio

        m = await self.fetch_keys(node_id, version=version)
        await asyncio.to_thread(
            keyfiles.install_keys,
            paths,
            version=m.version,
            secure_cookie_key=m.secure_cookie_key,
            launcher_private_pem=m.launcher_private_key_pem,
            launcher_public_pem=m.launcher_public_key_pem,
            promote=promote,
        )
