"""How the registry has a joining node's keys checked: by the keys service, over gRPC or in-process.

A join carries a :class:`NodeKeyCheck`: the fingerprints of the key files the agent holds, or a
problem it found before it could read them. A problem refuses the node by itself (its state, file,
mode and fix come from the agent: only it can see the files). Fingerprints are checked by the keys
service's ``VerifyKeys``: in this process when the keys service runs here (``muster up``), else at
``keys_address``. The registry never reads the keys schema, and key bytes never travel with a join.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import grpc
from opentelemetry import propagate

from muster.api.keys.v1 import key_pb2, keys_service_pb2, keys_service_pb2_grpc
from muster.api.registry.v1 import node_pb2
from muster.client.errors import from_rpc_error
from muster.core import validate
from muster.core.errors import InvalidArgumentError, KeysUnavailableError
from muster.registry.models import KEY_REFUSAL_STATES, Refusal, State

log = logging.getLogger(__name__)

MAX_PROBLEM_MESSAGE = 1024
MAX_PATH = 4096
_REFUSAL_STATES = {int(s): s for s in KEY_REFUSAL_STATES}
_MISMATCH_REASONS = {"INVALID_SECURE_COOKIE_KEY", "INVALID_LAUNCHER_KEY"}
FIXES = {
    State.INVALID_KEY_PERMISSIONS: "chmod 600 {path}",
    State.INVALID_SECURE_COOKIE_KEY: "head -c 32 /dev/urandom > {path} && chmod 600 {path}  (or remove it to "
    "receive the cluster's)",
    State.ERROR_READING_LAUNCHER_KEY: "muster keys generate  (or remove the launcher key files to receive the "
    "cluster's)",
    State.INVALID_LAUNCHER_KEY: "remove the launcher key files to receive the cluster's",
}


class KeyChecker(Protocol):
    """Checks fingerprints against the cluster's accepted key versions."""

    async def check(self, node_id: int, cookie: str, launcher: str) -> Refusal | None:
        """None when the keys match (or the cluster has none yet); the refusal otherwise."""
        ...

    async def active_version(self) -> int:
        """The cluster's ACTIVE key version (0: none, or the keys service cannot say right now)."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


def validate_key_check(field: str, msg: node_pb2.NodeKeyCheck) -> tuple[str, str, Refusal | None]:
    """The fingerprints a join carries, and the refusal its reported problem amounts to (if any)."""
    cookie = validate.fingerprint(f"{field}.secure_cookie_key_fingerprint", msg.secure_cookie_key_fingerprint)
    launcher = validate.fingerprint(f"{field}.launcher_key_fingerprint", msg.launcher_key_fingerprint)
    if not msg.HasField("problem"):
        return cookie, launcher, None
    p = msg.problem
    state = _REFUSAL_STATES.get(p.state)
    if state is None:
        names = ", ".join(s.name for s in KEY_REFUSAL_STATES)
        raise InvalidArgumentError(f"{field}.problem.state", f"must be one of {names}")
    if not p.path or len(p.path) > MAX_PATH or "\x00" in p.path:
        raise InvalidArgumentError(f"{field}.problem.path", f"is required, up to {MAX_PATH} characters")
    if p.mode > 0o7777:
        raise InvalidArgumentError(f"{field}.problem.mode", "must be permission bits (at most 07777)")
    if not p.message or len(p.message) > MAX_PROBLEM_MESSAGE:
        raise InvalidArgumentError(f"{field}.problem.message", f"is required, up to {MAX_PROBLEM_MESSAGE} characters")
    details = {"path": p.path, "fix": FIXES[state].format(path=p.path)}
    if p.mode:
        details["mode"] = f"{p.mode:04o}"
    return cookie, launcher, Refusal(state, p.message, details)


def refusal_from_reason(reason: str, message: str, metadata: dict[str, str]) -> Refusal:
    """A keys-service mismatch error as the refusal committed with the node."""
    keep = ("node_fingerprint", "cluster_fingerprint", "node_version", "node_version_state", "fix")
    return Refusal(State[reason], message, {k: metadata[k] for k in keep if k in metadata})


class LocalKeyChecker:
    """The keys service in this process (``muster up``): its store is asked directly."""

    def __init__(self, keys_component: Any) -> None:
        self._keys = keys_component

    async def check(self, node_id: int, cookie: str, launcher: str) -> Refusal | None:
        found = await self._keys.check_fingerprints(node_id, cookie, launcher)
        return None if found is None else refusal_from_reason(*found)

    async def active_version(self) -> int:
        return int(await self._keys.active_version())

    async def close(self) -> None:
        return None


def outbound_channel(
    address: str, *, ca_file: Path | None, cert_chain: bytes | None, private_key: bytes | None
) -> grpc.aio.Channel:
    """A channel from this server to another service: TLS (with its client certificate) when a CA is set."""
    if ca_file is None:
        return grpc.aio.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(), private_key=private_key, certificate_chain=cert_chain
    )
    return grpc.aio.secure_channel(address, creds)


class RemoteKeyChecker:
    """The keys service at ``address``, called with this server's outbound token (and TLS if configured)."""

    def __init__(
        self,
        address: str,
        *,
        metadata: list[tuple[str, str]],
        ca_file: Path | None = None,
        cert_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.address = address
        self._channel = outbound_channel(address, ca_file=ca_file, cert_chain=cert_chain, private_key=private_key)
        self._stub = keys_service_pb2_grpc.KeysServiceStub(self._channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout

    async def check(self, node_id: int, cookie: str, launcher: str) -> Refusal | None:
        req = keys_service_pb2.VerifyKeysRequest(
            node_id=node_id, fingerprints=key_pb2.KeyFingerprints(secure_cookie_key=cookie, launcher_key=launcher)
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # the join's trace continues in the keys service
        try:
            await self._stub.VerifyKeys(req, metadata=(*self._metadata, *carrier.items()), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            answer = from_rpc_error(err)
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION and answer.reason in _MISMATCH_REASONS:
                return refusal_from_reason(answer.reason, err.details() or "", dict(answer.metadata))
            log.warning(
                "keys service at %s answered %s to a key check",
                self.address,
                err.code().name,
                extra={"event": "key_check_failed", "code": err.code().name},
            )
            raise KeysUnavailableError(
                f"the keys service at {self.address} cannot check the node's keys ({err.code().name}); "
                "retry shortly, or check the registry's keys_address"
            ) from None
        return None

    async def active_version(self) -> int:
        try:
            status = await self._stub.GetKeyStatus(
                keys_service_pb2.GetKeyStatusRequest(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return 0
        return next((v.version for v in status.versions if v.state == key_pb2.KeyVersion.STATE_ACTIVE), 0)

    async def close(self) -> None:
        await self._channel.close()
