"""Rules of the contract that are code, not messages: written once here, beside the generated code.

Both sides import this module — the client library and the command (``muster.client``,
``muster.cli``) and the services (``muster.<service>``, ``muster.core``) — so a rule cannot drift
between them, and no server reaches into a private client module for one. It is hand-written (the
generator writes only ``*_pb2*.py(i)`` files and leaves it alone) and, like the generated code, it
imports nothing of ours outside ``muster.api``. It needs only the base install: ``cryptography`` is
imported inside the functions that use it.

- **Event kinds**: an event's kind is its payload's full message name, taken from the proto
  descriptors (:func:`kind_of`), never typed by hand; the lists the client follows are below.
- **Route names**: a node's route is ``n<id>`` (:func:`route_of`, :func:`node_of_route`), the suffix
  of its session ids.
- **Key fingerprints**: the first 16 hex digits of a SHA-256 over the secure cookie key's bytes, and
  over the launcher public key's DER SubjectPublicKeyInfo (so a private key and its public key have
  the same fingerprint). Keys are compared by these, never by sending them.
- **Key files during a rotation**: a version's copy lives beside the file, ``<file>.d/<version>``.
- **encrypt-password**: HKDF-SHA256 over the cookie key (info ``muster encrypt-password v1``) gives an
  AES-256-GCM key; the ciphertext is ``muster:v1:<cookie fingerprint>:<base64 of nonce and
  ciphertext>``, the prefix and fingerprint bound as associated data.
- **Tracing**: a process traces when the standard ``OTEL_*`` variables ask for it.

Nothing here logs, and no error message carries key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from muster.api.balancer.v1 import balancer_pb2
from muster.api.events.v1 import event_pb2
from muster.api.keys.v1 import key_pb2
from muster.api.locks.v1 import lock_pb2
from muster.api.registry.v1 import node_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALL_EVENT_PAYLOADS",
    "COOKIE_KEY_BYTES",
    "GENERATE_HINT",
    "KEY_EVENT_KINDS",
    "MIN_COOKIE_KEY_BYTES",
    "NODE_EVENT_KINDS",
    "PASSWORD_INFO",
    "PASSWORD_NONCE_BYTES",
    "PASSWORD_PREFIX",
    "PAYLOAD_BY_KIND",
    "ROUTE_EVENT_KINDS",
    "SESSION_MOVED_KINDS",
    "cookie_fingerprint",
    "cookie_key_candidates",
    "decrypt_password",
    "encrypt_password",
    "fingerprint_bytes",
    "is_encrypted_password",
    "kind_of",
    "kinds_of",
    "node_of_route",
    "public_key_fingerprint",
    "route_of",
    "tracing_requested",
    "version_dir",
]

# -- event kinds -------------------------------------------------------------------------------


def kind_of(payload: Message | type[Message]) -> str:
    """The event kind of a payload (a message or its class): its full message name."""
    return str(payload.DESCRIPTOR.full_name)


def kinds_of(*payloads: type[Message]) -> tuple[str, ...]:
    """The event kinds of payload classes, in order."""
    return tuple(kind_of(p) for p in payloads)


# Every service's event payloads (each its own messages; events.v1 holds only the core's own).
REGISTRY_EVENT_PAYLOADS: tuple[type[Message], ...] = (
    node_pb2.NodeJoined,
    node_pb2.NodeStateChanged,
    node_pb2.NodeModeChanged,
    node_pb2.NodeSuspected,
    node_pb2.NodeRecovered,
    node_pb2.NodeDeleted,
    node_pb2.ClusterReset,
)
KEY_EVENT_PAYLOADS: tuple[type[Message], ...] = (
    key_pb2.KeysDefined,
    key_pb2.KeyVersionAdded,
    key_pb2.KeyVersionPromoted,
    key_pb2.KeyVersionRetired,
    key_pb2.KeysReset,
)
BALANCER_EVENT_PAYLOADS: tuple[type[Message], ...] = (
    balancer_pb2.SessionPlaced,
    balancer_pb2.SessionStarted,
    balancer_pb2.SessionEnded,
    balancer_pb2.SessionMoved,
    balancer_pb2.StrategyChanged,
)
LOCK_EVENT_PAYLOADS: tuple[type[Message], ...] = (
    lock_pb2.LockGranted,
    lock_pb2.LockReleased,
    lock_pb2.LockBroken,
    lock_pb2.FiringChanged,
)
CORE_EVENT_PAYLOADS: tuple[type[Message], ...] = (event_pb2.OutageCredited,)
ALL_EVENT_PAYLOADS = (
    *REGISTRY_EVENT_PAYLOADS,
    *KEY_EVENT_PAYLOADS,
    *BALANCER_EVENT_PAYLOADS,
    *LOCK_EVENT_PAYLOADS,
    *CORE_EVENT_PAYLOADS,
)
PAYLOAD_BY_KIND: dict[str, type[Message]] = {kind_of(p): p for p in ALL_EVENT_PAYLOADS}

# What changes the nodes a local view holds (not the locks', sessions' or keys' events).
NODE_EVENT_KINDS = kinds_of(*REGISTRY_EVENT_PAYLOADS)
# What changes a node's key files.
KEY_EVENT_KINDS = kinds_of(*KEY_EVENT_PAYLOADS)
# A session moved onto another node (its node failed).
SESSION_MOVED_KINDS = kinds_of(balancer_pb2.SessionMoved)
# What changes the edge balancer's route map: nodes arriving, changing state or leaving, sessions moved.
ROUTE_EVENT_KINDS = kinds_of(
    node_pb2.NodeJoined,
    node_pb2.NodeStateChanged,
    node_pb2.NodeDeleted,
    node_pb2.ClusterReset,
    balancer_pb2.SessionMoved,
)

# -- route names -------------------------------------------------------------------------------


def route_of(node_id: int) -> str:
    """A node's route name: ``n<id>``, stable for the node's life (the suffix of its session ids)."""
    return f"n{node_id}"


def node_of_route(route: str) -> int | None:
    """The node id a route name stands for (None if it is not one)."""
    if route.startswith("n") and route[1:].isdigit() and len(route) < 21:
        return int(route[1:])
    return None


# -- key fingerprints and files ------------------------------------------------------------------

MIN_COOKIE_KEY_BYTES = 16
COOKIE_KEY_BYTES = 32
GENERATE_HINT = "generate one with `head -c 32 /dev/urandom > secure-cookie-key` or `muster keys generate`"


def fingerprint_bytes(data: bytes) -> str:
    """The first 16 hex digits of SHA-256 over ``data``."""
    return hashlib.sha256(data).hexdigest()[:16]


def cookie_fingerprint(key: bytes) -> str:
    """The fingerprint of a secure cookie key."""
    return fingerprint_bytes(key)


def public_key_fingerprint(public_key: object) -> str:
    """The fingerprint of a public key: SHA-256 over its DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return fingerprint_bytes(der)


def version_dir(path: Path) -> Path:
    """Where the versions of a key file are kept during a rotation: ``<file>.d/``."""
    path = Path(path)
    return path.parent / (path.name + ".d")


def cookie_key_candidates(path: Path) -> list[bytes]:
    """The cookie key file's bytes and those of its ``<file>.d/<version>`` copies (unreadable ones skipped)."""
    path = Path(path)
    out: list[bytes] = []
    for p in [path, *sorted(version_dir(path).glob("*"))]:
        try:
            if p.is_file():
                out.append(p.read_bytes())
        except OSError:
            continue
    return out


# -- encrypt-password --------------------------------------------------------------------------

PASSWORD_PREFIX = "muster:v1:"
PASSWORD_INFO = b"muster encrypt-password v1"
PASSWORD_NONCE_BYTES = 12


def _password_aead(cookie_key: bytes) -> AESGCM:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PASSWORD_INFO)
    return AESGCM(hkdf.derive(cookie_key))


def encrypt_password(plaintext: str, cookie_key: bytes) -> str:
    """Encrypts a password with a key derived (HKDF-SHA256) from the cookie key.

    Returns:
        ``muster:v1:<cookie key fingerprint>:<base64 of nonce and AES-GCM ciphertext>``.
    """
    fp = cookie_fingerprint(cookie_key)
    nonce = os.urandom(PASSWORD_NONCE_BYTES)
    ct = _password_aead(cookie_key).encrypt(nonce, plaintext.encode("utf-8"), (PASSWORD_PREFIX + fp).encode())
    return f"{PASSWORD_PREFIX}{fp}:{base64.b64encode(nonce + ct).decode('ascii')}"


def is_encrypted_password(value: str) -> bool:
    """Whether ``value`` looks like an encrypt-password ciphertext."""
    return value.startswith(PASSWORD_PREFIX)


def decrypt_password(ciphertext: str, cookie_keys: Iterable[bytes]) -> str:
    """Decrypts what :func:`encrypt_password` made, with whichever of ``cookie_keys`` it names.

    Args:
        ciphertext: what :func:`encrypt_password` (or ``muster encrypt-password``) made.
        cookie_keys: the candidate cookie keys (a key file and its ``<file>.d/<version>`` copies);
            read lazily, up to the first whose fingerprint the ciphertext names.

    Raises:
        ValueError: not such a ciphertext, no candidate has its fingerprint, or it does not decrypt.
    """
    if not ciphertext.startswith(PASSWORD_PREFIX):
        raise ValueError("not an encrypted password (expected muster:v1:<fingerprint>:<data>)")
    fp, sep, data = ciphertext[len(PASSWORD_PREFIX) :].partition(":")
    if not sep or len(fp) != 16:
        raise ValueError("malformed encrypted password (expected muster:v1:<fingerprint>:<data>)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed encrypted password: its data is not base64") from None
    from cryptography.exceptions import InvalidTag

    for key in cookie_keys:
        if cookie_fingerprint(key) != fp:
            continue
        try:
            plain = _password_aead(key).decrypt(
                raw[:PASSWORD_NONCE_BYTES], raw[PASSWORD_NONCE_BYTES:], (PASSWORD_PREFIX + fp).encode()
            )
        except (InvalidTag, ValueError):
            raise ValueError(f"the encrypted password does not decrypt with cookie key {fp}") from None
        return plain.decode("utf-8")
    raise ValueError(
        f"no secure cookie key with fingerprint {fp} is available; the password was encrypted with "
        "another key version (encrypt it again with `muster encrypt-password`)"
    )


# -- tracing -----------------------------------------------------------------------------------


def tracing_requested() -> bool:
    """Whether ``OTEL_TRACES_EXPORTER`` or an OTLP endpoint asks for traces (and the SDK is not disabled)."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        exporter
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
