"""Channels to the replicas of a service, with keepalive, TLS, a bearer token and failover."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
from opentelemetry import propagate

from muster.client import _retry
from muster.client._config import ClientConfig


class _Stub:
    """A stub whose every call carries ``authorization: Bearer <token>`` (TLS or not) and the
    caller's W3C trace context (``traceparent``), so that a trace continues on the server.

    Passed as call metadata rather than by a client interceptor: grpc.aio (1.85) drops the metadata
    an interceptor adds to response-streaming calls (WatchEvents, KeepAlive, Session went out
    without the token).
    """

    def __init__(self, stub: Any, token: str | None) -> None:
        self._stub = stub
        self._headers: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        headers = self._headers

        def call(*args: Any, metadata: Any = None, **kwargs: Any) -> Any:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # nothing unless a span is current
            return method(*args, metadata=(*(metadata or ()), *headers, *carrier.items()), **kwargs)

        return call


def _options(config: ClientConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive.total_seconds() * 1000)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ("grpc.enable_retries", 0),  # retries are ours: idempotent calls only
    ]


def open_channel(address: str, config: ClientConfig) -> grpc.aio.Channel:
    """A channel to one replica."""
    if config.tls:
        creds = grpc.ssl_channel_credentials(
            root_certificates=config.root_certificates,
            private_key=config.client_key,
            certificate_chain=config.client_certificate,
        )
        return grpc.aio.secure_channel(address, creds, options=_options(config))
    return grpc.aio.insecure_channel(address, options=_options(config))


class Endpoint:
    """The replicas of one service: one channel each, a current one, and a move on failure.

    Args:
        addresses: the replicas.
        config: the client configuration.
        stub_factory: builds the service stub for a channel.
    """

    def __init__(self, addresses: tuple[str, ...], config: ClientConfig, stub_factory: Callable[[Any], Any]) -> None:
        self.addresses = addresses
        self._config = config
        self._factory = stub_factory
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self._current = random.randrange(len(addresses))  # spread clients over replicas

    @property
    def address(self) -> str:
        """The replica in use."""
        return self.addresses[self._current]

    def stub(self) -> Any:
        """The stub of the replica in use (its channel opened lazily)."""
        address = self.address
        if address not in self._stubs:
            self._channels[address] = open_channel(address, self._config)
            self._stubs[address] = _Stub(self._factory(self._channels[address]), self._config.token)
        return self._stubs[address]

    def fail_over(self) -> None:
        """Moves to the next replica (after a transport failure or a replica shutting down)."""
        self._current = (self._current + 1) % len(self.addresses)

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def backoff(attempt: int, config: ClientConfig, hint: timedelta | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``: :func:`muster.client._retry.backoff` with the
    configured ``backoff_initial`` and ``backoff_max``, honouring the server's hint."""
    return _retry.backoff(attempt, initial=config.backoff_initial, maximum=config.backoff_max, hint=hint)
