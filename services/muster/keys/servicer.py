"""KeysService: validates input, calls the store, turns results into protos.

Nothing here logs a request: requests carry key material (UploadKeys, EncryptSecret) and responses
carry it (FetchKeys). Errors name fingerprints, versions and lengths only.
"""

from __future__ import annotations

import re

import grpc

from muster.api.keys.v1 import key_pb2, keys_service_pb2_grpc
from muster.api.keys.v1 import keys_service_pb2 as pb
from muster.core import telemetry, validate
from muster.core.errors import InvalidArgumentError, translate_errors
from muster.keys import crypto
from muster.keys.errors import LauncherKeyUnreadableError
from muster.keys.models import Fingerprints
from muster.keys.store import KeyStore, version_to_proto

_PURPOSE = re.compile(r"^[a-z0-9-]{1,64}$")
MAX_SECRET_CHARS = 4096
MAX_VERSION = 2**31 - 1


def fingerprints(field: str, msg: key_pb2.KeyFingerprints) -> Fingerprints:
    """Fingerprints as sent: each empty or 16 lowercase hex digits."""
    return Fingerprints(
        validate.fingerprint(f"{field}.secure_cookie_key", msg.secure_cookie_key),
        validate.fingerprint(f"{field}.launcher_key", msg.launcher_key),
    )


def cookie_key(field: str, value: bytes) -> bytes:
    """A secure cookie key: 16 bytes at least (32 random bytes recommended), at most 4 KiB."""
    if len(value) < crypto.MIN_COOKIE_KEY_BYTES:
        raise InvalidArgumentError(
            field,
            f"is {len(value)} bytes; a secure cookie key needs at least {crypto.MIN_COOKIE_KEY_BYTES} bytes of "
            f"random data: {crypto.GENERATE_HINT}",
            length=len(value),
            minimum=crypto.MIN_COOKIE_KEY_BYTES,
            fix=crypto.GENERATE_HINT,
        )
    if len(value) > crypto.MAX_COOKIE_KEY_BYTES:
        raise InvalidArgumentError(field, f"is longer than {crypto.MAX_COOKIE_KEY_BYTES} bytes", length=len(value))
    return value


def launcher_pair(private_field: str, private_pem: str, public_pem: str) -> crypto.LauncherKeyPair:
    """A readable launcher key pair (ERROR_READING_LAUNCHER_KEY otherwise)."""
    try:
        return crypto.load_launcher_pair(private_pem, public_pem)
    except crypto.LauncherKeyError as exc:
        raise LauncherKeyUnreadableError(private_field, str(exc), fix="muster keys generate") from None


def _version(field: str, value: int, *, allow_zero: bool) -> int:
    if allow_zero and value == 0:
        return 0
    return validate.integer(field, value, low=1, high=MAX_VERSION)


def _node(field: str, value: int, *, allow_zero: bool) -> int:
    if allow_zero and value == 0:
        return 0
    return validate.positive_id(field, value)


class KeysServicer(keys_service_pb2_grpc.KeysServiceServicer):
    """The keys service's RPCs."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store

    async def _revision(self, append_id: int, wanted: bool) -> int:
        return await self._store.revision_of(append_id) if wanted and append_id else 0

    @translate_errors
    async def VerifyKeys(
        self, request: pb.VerifyKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.VerifyKeysResponse:
        node_id = _node("node_id", request.node_id, allow_zero=True)
        held = fingerprints("fingerprints", request.fingerprints)
        result = await self._store.verify(node_id, held)
        return pb.VerifyKeysResponse(
            outcome=int(result.outcome),
            matched_version=result.matched_version,
            versions=[version_to_proto(v) for v in result.versions],
            defined=result.defined,
            revision=await self._revision(result.append_id, request.wait_for_revision),
        )

    @translate_errors
    async def UploadKeys(
        self, request: pb.UploadKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.UploadKeysResponse:
        node_id = _node("node_id", request.node_id, allow_zero=True)
        cookie = cookie_key("secure_cookie_key", request.secure_cookie_key) if request.secure_cookie_key else None
        if request.launcher_public_key_pem and not request.launcher_private_key_pem:
            raise InvalidArgumentError("launcher_private_key_pem", "is required when launcher_public_key_pem is given")
        pair = (
            launcher_pair("launcher_private_key_pem", request.launcher_private_key_pem, request.launcher_public_key_pem)
            if request.launcher_private_key_pem
            else None
        )
        if cookie is None and pair is None:
            raise InvalidArgumentError(
                "secure_cookie_key", "upload at least one key; a node without keys calls VerifyKeys instead"
            )
        result = await self._store.upload(node_id, cookie, pair)
        return pb.UploadKeysResponse(
            defined=result.defined,
            version=version_to_proto(result.version),
            revision=await self._revision(result.append_id, request.wait_for_revision),
        )

    @translate_errors
    async def FetchKeys(self, request: pb.FetchKeysRequest, context: grpc.aio.ServicerContext) -> pb.FetchKeysResponse:
        node_id = _node("node_id", request.node_id, allow_zero=False)
        version = _version("version", request.version, allow_zero=True)
        telemetry.annotate(node_id=node_id, key_version=version)
        m = await self._store.fetch(node_id, version, context.peer() or "")
        return pb.FetchKeysResponse(
            keys=key_pb2.KeyMaterial(
                version=m.version,
                state=int(m.state),
                secure_cookie_key=m.cookie_key,
                launcher_private_key_pem=m.launcher_private_pem,
                launcher_public_key_pem=m.launcher_public_pem,
                fingerprints=key_pb2.KeyFingerprints(
                    secure_cookie_key=m.fingerprints.cookie, launcher_key=m.fingerprints.launcher
                ),
            )
        )

    @translate_errors
    async def AckKeyVersion(
        self, request: pb.AckKeyVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.AckKeyVersionResponse:
        node_id = _node("node_id", request.node_id, allow_zero=False)
        version = _version("version", request.version, allow_zero=False)
        held = fingerprints("fingerprints", request.fingerprints)
        if not held.cookie:
            raise InvalidArgumentError(
                "fingerprints.secure_cookie_key", "is required: acknowledge the version by the key you hold"
            )
        result = await self._store.ack(node_id, version, held)
        return pb.AckKeyVersionResponse(
            version=version_to_proto(result.version),
            promoted=result.promoted,
            revision=await self._revision(result.append_id, request.wait_for_revision),
        )

    @translate_errors
    async def RotateKeys(
        self, request: pb.RotateKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateKeysResponse:
        version, append_id = await self._store.rotate()
        return pb.RotateKeysResponse(
            version=version_to_proto(version), revision=await self._revision(append_id, request.wait_for_revision)
        )

    @translate_errors
    async def GetKeyStatus(
        self, request: pb.GetKeyStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetKeyStatusResponse:
        s = await self._store.status()
        resp = pb.GetKeyStatusResponse(defined=s.defined, versions=[version_to_proto(v) for v in s.versions])
        for n in s.nodes:
            msg = resp.nodes.add(node_id=n.node_id, live=n.live, acknowledged_versions=list(n.acknowledged_versions))
            if n.last_fetch_time is not None:
                msg.last_fetch_time.FromDatetime(n.last_fetch_time)
        for f in s.recent_fetches:
            msg = resp.recent_fetches.add(node_id=f.node_id, version=f.version, peer=f.peer)
            msg.fetch_time.FromDatetime(f.fetch_time)
        resp.grace_period.FromTimedelta(s.grace_period)
        resp.server_time.FromDatetime(s.server_time)
        return resp

    @translate_errors
    async def ResetKeys(self, request: pb.ResetKeysRequest, context: grpc.aio.ServicerContext) -> pb.ResetKeysResponse:
        removed, append_id = await self._store.reset()
        return pb.ResetKeysResponse(
            removed_versions=removed, revision=await self._revision(append_id, request.wait_for_revision)
        )

    @translate_errors
    async def DeriveKeys(
        self, request: pb.DeriveKeysRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeriveKeysResponse:
        purpose = request.purpose
        if not _PURPOSE.match(purpose):
            raise InvalidArgumentError("purpose", "must be 1-64 characters of a-z, 0-9 and -")
        keys = await self._store.derived(purpose)
        return pb.DeriveKeysResponse(
            keys=[pb.DerivedKey(version=info.version, state=int(info.state), key=key) for info, key in keys]
        )

    @translate_errors
    async def EncryptSecret(
        self, request: pb.EncryptSecretRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncryptSecretResponse:
        if not request.plaintext:
            raise InvalidArgumentError("plaintext", "is required")
        if len(request.plaintext) > MAX_SECRET_CHARS:
            raise InvalidArgumentError("plaintext", f"is longer than {MAX_SECRET_CHARS} characters")
        key, fingerprint = await self._store.active_cookie_key()
        return pb.EncryptSecretResponse(
            ciphertext=crypto.encrypt_password(request.plaintext, key), key_fingerprint=fingerprint
        )
