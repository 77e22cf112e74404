"""The keys service's domain: versions, their states, nodes' acknowledgements, fetches. No I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


class VersionState(enum.IntEnum):
    """Where a key version stands (KeyVersion.State numbers)."""

    PENDING = 1
    ACTIVE = 2
    RETIRING = 3
    RETIRED = 4

    @property
    def accepted(self) -> bool:
        """Whether a node holding this version is accepted."""
        return self is not VersionState.RETIRED


class Source(enum.IntEnum):
    """Where the cluster's first keys came from (KeysSource numbers)."""

    GENERATED = 1
    UPLOADED = 2


class Outcome(enum.IntEnum):
    """What a verified node does next (VerifyKeysResponse.Outcome numbers)."""

    MATCHED = 1
    FETCH_REQUIRED = 2
    UPLOAD_REQUIRED = 3


@dataclass(frozen=True, slots=True)
class Fingerprints:
    """A node's (or a version's) key fingerprints; an empty one means "holds no such key"."""

    cookie: str = ""
    launcher: str = ""

    @property
    def empty(self) -> bool:
        """Whether neither key is held."""
        return not self.cookie and not self.launcher


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """A key version as anyone may see it: fingerprints and times, never key bytes."""

    version: int
    state: VersionState
    fingerprints: Fingerprints
    master_key_id: str
    create_time: datetime
    promote_time: datetime | None
    retire_time: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> VersionInfo:
        """From a ``keys.versions`` row."""
        return cls(
            row["version"],
            VersionState(row["state"]),
            Fingerprints(row["cookie_fingerprint"], row["launcher_fingerprint"]),
            row["master_key_id"],
            row["create_time"],
            row["promote_time"],
            row["retire_time"],
        )


@dataclass(frozen=True, slots=True)
class NewKeys:
    """Key material about to be stored (its repr shows fingerprints only)."""

    cookie_key: bytes = field(repr=False)
    launcher_private_pem: str = field(repr=False)
    fingerprints: Fingerprints


@dataclass(frozen=True, slots=True)
class Material:
    """A version's key material, opened for a fetch (its repr shows fingerprints only)."""

    version: int
    state: VersionState
    cookie_key: bytes = field(repr=False)
    launcher_private_pem: str = field(repr=False)
    launcher_public_pem: str
    fingerprints: Fingerprints


@dataclass(frozen=True, slots=True)
class Verified:
    """A verification's result."""

    outcome: Outcome
    matched_version: int
    versions: tuple[VersionInfo, ...]
    defined: bool = False
    append_id: int = 0


@dataclass(frozen=True, slots=True)
class Uploaded:
    """An upload's result: whether it defined the cluster, and the ACTIVE version."""

    defined: bool
    version: VersionInfo
    append_id: int = 0


@dataclass(frozen=True, slots=True)
class Acked:
    """An acknowledgement's result."""

    version: VersionInfo
    promoted: bool
    append_id: int = 0


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """A node as the keys service knows it."""

    node_id: int
    live: bool
    acknowledged_versions: tuple[int, ...]
    last_fetch_time: datetime | None


@dataclass(frozen=True, slots=True)
class Fetch:
    """One audited key fetch."""

    node_id: int
    version: int
    fetch_time: datetime
    peer: str


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """The status view."""

    defined: bool
    versions: tuple[VersionInfo, ...]
    nodes: tuple[NodeKeys, ...]
    recent_fetches: tuple[Fetch, ...]
    grace_period: timedelta
    server_time: datetime
