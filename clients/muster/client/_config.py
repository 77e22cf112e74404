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


@dataclass(frozen=True)
class ClientConfig:
    """How the client reaches the control plane.

    Attributes:
        addresses: the replicas of every service (``host:port``), tried in turn on failure.
        service_addresses: per-service replicas overriding ``addresses`` (keys ``registry``, …).
        deadline: per-call deadline (default 10 s, the reference timeout).
        max_attempts: attempts for a retryable call (idempotent calls only).
        backoff_initial, backoff_max: jittered exponential backoff between attempts and reconnects.
        keepalive: how often idle connections are pinged.
        token: a bearer token sent as ``authorization`` metadata.
        tls: use TLS; ``root_certificates`` (PEM) to trust a private CA.
    """

    addresses: tuple[str, ...] = (DEFAULT_ADDRESS,)
    service_addresses: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    deadline: timedelta = timedelta(seconds=10)
    max_attempts: int = 5
    backoff_initial: timedelta = timedelta(milliseconds=100)
    backoff_max: timedelta = timedelta(seconds=5)
    keepalive: timedelta = timedelta(seconds=30)
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | None = None

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("at least one address is required")
        for name in self.service_addresses:
            if name not in SERVICES:
                raise ValueError(f"unknown service {name!r}; use one of {', '.join(SERVICES)}")

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
