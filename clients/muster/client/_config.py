"""Client configuration: a frozen dataclass, durations as timedelta."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

DEFAULT_ADDRESS = "127.0.0.1:7400"
SERVICES = ("registry", "keys", "balancer", "locks")


def default_address() -> str:
    """``MUSTER_ADDRESS`` or 127.0.0.1:7400."""
    return os.environ.get("MUSTER_ADDRESS") or DEFAULT_ADDRESS


def default_service_addresses() -> dict[str, tuple[str, ...]]:
    """Per-service replicas from ``MUSTER_REGISTRY_ADDRESS``, ``MUSTER_KEYS_ADDRESS``, ``MUSTER_BALANCER_ADDRESS``
    and ``MUSTER_LOCKS_ADDRESS`` (each ``host:port``, comma-separated for replicas)."""
    out = {}
    for name in SERVICES:
        value = os.environ.get(f"MUSTER_{name.upper()}_ADDRESS", "").strip()
        if value:
            out[name] = split_addresses(value)
    return out


def default_token() -> str | None:
    """The token to send: ``MUSTER_TOKEN``, else ``MUSTER_ADMIN_TOKEN``, else ``MUSTER_NODE_TOKEN``, else None.

    The server accepts the admin token wherever it accepts the node token, so an operator's shell
    with the admin token set can run every command; give an agent only the node token.
    """
    for name in ("MUSTER_TOKEN", "MUSTER_ADMIN_TOKEN", "MUSTER_NODE_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _env_file(name: str) -> bytes | None:
    path = os.environ.get(name)
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {name}={path}: {exc.strerror}") from None


def default_tls() -> bool:
    """TLS when ``MUSTER_TLS`` is true, or a CA or client certificate is given by environment."""
    flag = os.environ.get("MUSTER_TLS", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    return any(os.environ.get(n) for n in ("MUSTER_TLS_CA_FILE", "MUSTER_TLS_CLIENT_CERT_FILE"))


def default_root_certificates() -> bytes | None:
    """The PEM CA bundle named by ``MUSTER_TLS_CA_FILE`` (None: the system's roots)."""
    return _env_file("MUSTER_TLS_CA_FILE")


def default_client_certificate() -> bytes | None:
    """The PEM client certificate chain named by ``MUSTER_TLS_CLIENT_CERT_FILE`` (for mTLS)."""
    return _env_file("MUSTER_TLS_CLIENT_CERT_FILE")


def default_client_key() -> bytes | None:
    """The PEM private key named by ``MUSTER_TLS_CLIENT_KEY_FILE`` (for mTLS)."""
    return _env_file("MUSTER_TLS_CLIENT_KEY_FILE")


@dataclass(frozen=True)
class ClientConfig:
    """How the client reaches the control plane.

    Attributes:
        addresses: the replicas of every service (``host:port``), tried in turn on failure.
        service_addresses: per-service replicas overriding ``addresses`` (keys ``registry``, …; default
            from ``MUSTER_REGISTRY_ADDRESS``, ``MUSTER_KEYS_ADDRESS``, … when set).
        deadline: per-call deadline (default 10 s, the reference timeout).
        max_attempts: attempts for a retryable call (idempotent calls only).
        backoff_initial, backoff_max: jittered exponential backoff between attempts and reconnects.
        keepalive: how often idle connections are pinged.
        token: a bearer token sent as ``authorization`` metadata (default :func:`default_token`:
            ``MUSTER_TOKEN``, ``MUSTER_ADMIN_TOKEN`` or ``MUSTER_NODE_TOKEN``).
        tls: use TLS (default: ``MUSTER_TLS``, or true when ``MUSTER_TLS_CA_FILE`` or
            ``MUSTER_TLS_CLIENT_CERT_FILE`` is set); ``root_certificates`` (PEM, default the file
            ``MUSTER_TLS_CA_FILE``) to trust a private CA.
        client_certificate, client_key: PEM certificate chain and private key for mTLS (default the
            files ``MUSTER_TLS_CLIENT_CERT_FILE`` and ``MUSTER_TLS_CLIENT_KEY_FILE``).
    """

    addresses: tuple[str, ...] = (DEFAULT_ADDRESS,)
    service_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=default_service_addresses)
    deadline: timedelta = timedelta(seconds=10)
    max_attempts: int = 5
    backoff_initial: timedelta = timedelta(milliseconds=100)
    backoff_max: timedelta = timedelta(seconds=5)
    keepalive: timedelta = timedelta(seconds=30)
    token: str | None = field(default_factory=default_token, repr=False)
    tls: bool = field(default_factory=default_tls)
    root_certificates: bytes | None = field(default_factory=default_root_certificates, repr=False)
    client_certificate: bytes | None = field(default_factory=default_client_certificate, repr=False)
    client_key: bytes | None = field(default_factory=default_client_key, repr=False)

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("at least one address is required")
        for name in self.service_addresses:
            if name not in SERVICES:
                raise ValueError(f"unknown service {name!r}; use one of {', '.join(SERVICES)}")
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("mTLS needs both client_certificate and client_key")
        if self.client_certificate is not None and not self.tls:
            raise ValueError("a client certificate needs tls=True")

    def for_service(self, name: str) -> tuple[str, ...]:
        """The replicas to use for a service."""
        return tuple(self.service_addresses.get(name) or self.addresses)


def split_addresses(address: str | Sequence[str]) -> tuple[str, ...]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` → ``("a:1", "b:2")``."""
    items = address.split(",") if isinstance(address, str) else list(address)
    out = tuple(a.strip() for a in items if a.strip())
    if not out:
        raise ValueError("at least one address is required")
    return out
