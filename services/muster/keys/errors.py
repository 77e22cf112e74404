"""The keys service's domain errors. Messages name fingerprints and versions, never key bytes."""

from __future__ import annotations

from typing import Any

from muster.core.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

DOMAIN = "muster.keys"
FIX_MISMATCH = "remove the node's key files so that it receives the cluster's, or copy the cluster's key files to it"


def _who(node_id: int) -> str:
    return f"node {node_id}" if node_id else "the node"


class CookieKeyMismatchError(FailedPreconditionError):
    """The node's secure cookie key is not an accepted version of the cluster's."""

    reason = "INVALID_SECURE_COOKIE_KEY"

    def __init__(self, node_id: int, node_fingerprint: str, cluster_fingerprint: str, **metadata: Any) -> None:
        retired = metadata.get("node_version_state") == "RETIRED"
        held = f"retired version {metadata.get('node_version')}" if retired else "a key"
        super().__init__(
            f"{_who(node_id)} holds {held} as its secure cookie key (fingerprint {node_fingerprint}); "
            f"the cluster expects fingerprint {cluster_fingerprint}: {FIX_MISMATCH}",
            domain=DOMAIN,
            node=node_id,
            node_fingerprint=node_fingerprint,
            cluster_fingerprint=cluster_fingerprint,
            fix=FIX_MISMATCH,
            **metadata,
        )


class LauncherKeyMismatchError(FailedPreconditionError):
    """The node's launcher key is not an accepted version of the cluster's."""

    reason = "INVALID_LAUNCHER_KEY"

    def __init__(self, node_id: int, node_fingerprint: str, cluster_fingerprint: str, **metadata: Any) -> None:
        retired = metadata.get("node_version_state") == "RETIRED"
        held = f"retired version {metadata.get('node_version')}" if retired else "a key"
        super().__init__(
            f"{_who(node_id)} holds {held} as its launcher key (fingerprint {node_fingerprint}); "
            f"the cluster expects fingerprint {cluster_fingerprint}: {FIX_MISMATCH}",
            domain=DOMAIN,
            node=node_id,
            node_fingerprint=node_fingerprint,
            cluster_fingerprint=cluster_fingerprint,
            fix=FIX_MISMATCH,
            **metadata,
        )


class LauncherKeyUnreadableError(InvalidArgumentError):
    """An uploaded launcher key is not a readable PEM private key (or its public key does not match)."""

    reason = "ERROR_READING_LAUNCHER_KEY"
    domain = DOMAIN


class KeysNotDefinedError(FailedPreconditionError):
    """The cluster's keys are not defined yet."""

    reason = "KEYS_NOT_DEFINED"

    def __init__(self) -> None:
        super().__init__(
            "the cluster's keys are not defined yet; the first node to start defines them (VerifyKeys)",
            domain=DOMAIN,
        )


class KeyVersionNotFoundError(NotFoundError):
    """No such version, or it is retired."""

    reason = "KEY_VERSION_NOT_FOUND"

    def __init__(self, version: int, state: str = "") -> None:
        what = f"key version {version} is retired" if state == "RETIRED" else f"there is no key version {version}"
        super().__init__(
            f"{what}; see `muster keys status`", domain=DOMAIN, version=version, **({"state": state} if state else {})
        )


class KeyRotationPendingError(FailedPreconditionError):
    """A rotation is under way."""

    reason = "KEY_ROTATION_PENDING"

    def __init__(self, version: int, missing: int) -> None:
        super().__init__(
            f"key version {version} is still pending ({missing} live node(s) have not acknowledged it); "
            "rotate again after it is promoted (see `muster keys status`)",
            domain=DOMAIN,
            version=version,
            missing=missing,
        )


class MasterKeyMismatchError(FailedPreconditionError):
    """The stored keys were sealed under another master key."""

    reason = "MASTER_KEY_MISMATCH"

    def __init__(self, version: int, master_key_id: str, stored_master_key_id: str) -> None:
        super().__init__(
            f"key version {version} was sealed under master key {stored_master_key_id}, this server has "
            f"{master_key_id}: give every keys replica the same MUSTER_MASTER_KEY or master_key_file",
            domain=DOMAIN,
            version=version,
            master_key_id=master_key_id,
            stored_master_key_id=stored_master_key_id,
        )
