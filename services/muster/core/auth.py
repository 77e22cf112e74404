"""Authentication and TLS for every service: bearer tokens, server TLS, and mTLS.

Callers present ``authorization: Bearer <token>`` metadata. A table decides which role each RPC
needs:

- ``OPEN``: gRPC health checking and server reflection (probes and tooling need no secret);
- ``ADMIN``: the operator's destructive or cluster-wide calls (:data:`ADMIN_METHODS`) — the admin
  token only;
- ``NODE``: everything else, including RPCs this table does not know yet — the node token or the
  admin token.

Tokens are compared in constant time (``hmac.compare_digest`` on SHA-256 digests, so the length
of the expected token does not leak either) and are never logged or echoed in an error.

Under mTLS (``tls_client_ca_file``) the TLS handshake refuses any client without a certificate
signed by that CA, so every call that reaches the interceptor comes from a verified certificate
and is a ``NODE`` caller even without a token. Admin RPCs still need the admin token: a
certificate alone never grants ``ADMIN`` (no subject/OU convention), so a stolen node
certificate cannot delete or reset the cluster.

Without any token or mTLS configured, a server whose listen address is loopback runs open for
development and says so loudly at start; on any other address it refuses to start unless
``allow_unauthenticated`` is set (a mesh in front authenticates callers).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import hmac
import ipaddress
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from muster.core.config import Settings
from muster.core.errors import MusterError, abort_with

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
FIRST_MESSAGE_WAIT = 1.0  # seconds a refused stream's first message is waited for
GENERATE_HINT = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class Role(enum.Enum):
    """What a caller must prove for an RPC."""

    OPEN = "open"
    NODE = "node"
    ADMIN = "admin"


# Services anyone may call: native health checks (Kubernetes probes, balancers) and reflection.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

# RPCs that need the admin token. Every other RPC needs the node token (or the admin token).
ADMIN_METHODS = frozenset(
    {
        "/muster.api.registry.v1.RegistryService/DeleteNode",
        "/muster.api.registry.v1.RegistryService/ResetCluster",
        "/muster.api.registry.v1.RegistryService/SetNodeMode",
        "/muster.api.keys.v1.KeysService/RotateKeys",
        "/muster.api.keys.v1.KeysService/ResetKeys",
        "/muster.api.balancer.v1.BalancerService/SetStrategy",
        "/muster.api.balancer.v1.BalancerService/EvacuateNode",
        "/muster.api.locks.v1.LocksService/BreakLock",
    }
)


def required_role(method: str) -> Role:
    """The role an RPC needs.

    Args:
        method: the full method name, ``/package.Service/Method``.

    Returns:
        ``OPEN`` for health and reflection, ``ADMIN`` for :data:`ADMIN_METHODS`, else ``NODE``
        (an RPC unknown to the table is never open).
    """
    service = method.lstrip("/").partition("/")[0]
    if service in OPEN_SERVICES:
        return Role.OPEN
    if method in ADMIN_METHODS:
        return Role.ADMIN
    return Role.NODE


class MissingTokenError(MusterError):
    """The call carries no bearer token and the server requires one."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "MISSING_TOKEN"

    def __init__(self) -> None:
        super().__init__(
            "this server requires a token: send 'authorization: Bearer <token>' "
            "(the muster command reads MUSTER_TOKEN, MUSTER_ADMIN_TOKEN or MUSTER_NODE_TOKEN)"
        )


class BadTokenError(MusterError):
    """The bearer token is not one this server accepts."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "BAD_TOKEN"

    def __init__(self) -> None:
        super().__init__("the token is not valid for this cluster; check MUSTER_TOKEN or MUSTER_NODE_TOKEN")


class AdminRequiredError(MusterError):
    """An admin RPC called without the admin token."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "ADMIN_REQUIRED"

    def __init__(self, method: str) -> None:
        super().__init__(
            f"{method} needs the admin token; set MUSTER_ADMIN_TOKEN (or MUSTER_TOKEN) to it", method=method
        )


class AuthConfigError(RuntimeError):
    """The server's authentication or TLS settings are unusable; the message says what to set."""


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def token_matches(presented: bytes, expected_digest: bytes | None) -> bool:
    """Whether a presented token is the expected one, in constant time.

    Args:
        presented: the SHA-256 digest of the token the caller sent.
        expected_digest: the SHA-256 digest of the configured token, or None when none is configured.

    Returns:
        True only if a token is configured and the digests are equal (``hmac.compare_digest``).
    """
    if expected_digest is None:
        hmac.compare_digest(presented, presented)  # same work either way
        return False
    return hmac.compare_digest(presented, expected_digest)


def bearer_token(metadata: Sequence[Any] | None) -> bytes | None:
    """The token of the first ``authorization: Bearer <token>`` header, or None if there is none.

    A header with another scheme, or an empty token, counts as a bad token (``b""``).
    """
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != "authorization":
            continue
        raw = value.encode() if isinstance(value, str) else bytes(value)
        scheme, _, token = raw.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return b""
        return token.strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every RPC's bearer token against the method table before its handler runs.

    A refused call is answered by a handler of the same shape (unary or stream, either side) that
    aborts with the rich status at once, without reading or parsing the request.

    Args:
        node_digest: SHA-256 of the node token, or None.
        admin_digest: SHA-256 of the admin token, or None.
        certificate_is_node: the server requires client certificates (mTLS), so a call without a
            token is a verified NODE caller.
    """

    def __init__(self, node_digest: bytes | None, admin_digest: bytes | None, *, certificate_is_node: bool) -> None:
        self._node = node_digest
        self._admin = admin_digest
        self._certificate_is_node = certificate_is_node

    def check(self, method: str, metadata: Sequence[Any] | None) -> MusterError | None:
        """The error to refuse a call with, or None to let it through.

        Args:
            method: the full method name.
            metadata: the call's invocation metadata.
        """
        role = required_role(method)
        if role is Role.OPEN:
            return None
        token = bearer_token(metadata)
        if token is None:
            if not self._certificate_is_node:
                return MissingTokenError()
            # Under mTLS the handshake verified a client certificate: a node, never an admin.
            return AdminRequiredError(method) if role is Role.ADMIN else None
        presented = _digest(token)
        # Both comparisons always run: the time taken does not tell which token matched.
        is_admin = token_matches(presented, self._admin)
        is_node = token_matches(presented, self._node)
        if not (is_admin or is_node):
            return BadTokenError()
        if role is Role.ADMIN and not is_admin:
            return AdminRequiredError(method)
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Passes an allowed call on; answers a refused one with an aborting handler."""
        method = handler_call_details.method
        error = self.check(method, handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if error is None or handler is None:
            return handler
        return _refusing(handler, method, error)


def _refusing(handler: grpc.RpcMethodHandler, method: str, error: MusterError) -> grpc.RpcMethodHandler:
    """A handler shaped like ``handler`` that ends the call with ``error``."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> Any:
        log.warning(
            "refused %s from %s: %s",
            method,
            context.peer(),
            error.reason,
            extra={"event": "auth_refused", "method": method, "reason": error.reason},
        )
        await abort_with(context, error)

    async def refuse_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        # Take the client's first message (raw bytes, bounded in time) before ending the call: a
        # grpc.aio client whose first write races the status reports INTERNAL instead of it.
        with contextlib.suppress(TimeoutError, StopAsyncIteration, grpc.RpcError):
            async with asyncio.timeout(FIRST_MESSAGE_WAIT):
                await anext(aiter(request_iterator))
        await refuse(None, context)

    # No request deserializer: a refused call's payload is never parsed.
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse_stream, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, None, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, serializer)


def read_token_file(path: Path, what: str) -> str:
    """The first line of a token file, whitespace stripped.

    Args:
        path: the file.
        what: the setting's name, for messages (``node_token_file``).

    Raises:
        AuthConfigError: the file cannot be read, is accessible by group or others, or its first
            line is empty.
    """
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            raise AuthConfigError(
                f"{what} {path} is accessible by group or others (mode {mode:04o}); run: chmod 600 {path}"
            )
        with open(path, encoding="utf-8") as f:
            first = f.readline().strip()
    except OSError as exc:
        raise AuthConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AuthConfigError(f"{what} {path} is not text; {GENERATE_HINT}") from None
    if not first:
        raise AuthConfigError(f"{what} {path} is empty; {GENERATE_HINT}")
    return first


def _token(value: Any, path: Path | None, name: str) -> str | None:
    env = "MUSTER_" + name.upper()
    if value is not None and path is not None:
        raise AuthConfigError(f"set either {env} or {env}_FILE, not both")
    token = read_token_file(path, name + "_file") if path is not None else None
    if value is not None:
        token = value.get_secret_value().strip()
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise AuthConfigError(f"{env} is shorter than {MIN_TOKEN_LENGTH} characters; {GENERATE_HINT}")
    return token


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def is_loopback(listen: str) -> bool:
    """Whether a ``host:port`` listen address accepts connections only from this machine.

    ``127.0.0.0/8``, ``::1`` and ``localhost`` are loopback; ``0.0.0.0``, ``[::]``, an empty host
    and every other name are not.
    """
    host = listen.rpartition(":")[0] if ":" in listen else listen
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """How a server authenticates callers: token digests, TLS material, and whether it runs open.

    Build it with :func:`load_security`. Incoming tokens are checked against digests only; the
    one raw token kept (``outbound_token``, for this server's own calls) and the key material are
    left out of ``repr``.
    """

    listen: str
    node_digest: bytes | None = field(default=None, repr=False)
    admin_digest: bytes | None = field(default=None, repr=False)
    cert_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    client_ca: bytes | None = field(default=None, repr=False)
    open: bool = False
    outbound_token: str | None = field(default=None, repr=False)

    @property
    def mtls(self) -> bool:
        """Client certificates are required."""
        return self.client_ca is not None

    @property
    def tls(self) -> bool:
        """The server speaks TLS."""
        return self.cert_chain is not None

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server interceptors to install (none when running open)."""
        if self.open:
            return []
        return [AuthInterceptor(self.node_digest, self.admin_digest, certificate_is_node=self.mtls)]

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for ``add_secure_port``, or None for a plain-text port."""
        if self.cert_chain is None or self.private_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def call_metadata(self) -> list[tuple[str, str]]:
        """Metadata for this server's own calls to other services (the admin token, else the node token)."""
        return [("authorization", "Bearer " + self.outbound_token)] if self.outbound_token else []

    def describe(self) -> str:
        """A short phrase for the start-up log: ``tokens, TLS``, ``mTLS``, ``open``."""
        parts = []
        if self.node_digest or self.admin_digest:
            parts.append("tokens")
        parts.append("mTLS" if self.mtls else "TLS" if self.tls else "plain text")
        if self.open:
            parts.append("NO AUTHENTICATION")
        return ", ".join(parts)

    def announce(self) -> None:
        """Warns loudly (log and stderr) when running open, and when admin RPCs cannot be called."""
        if self.open:
            who = "anyone on this machine" if is_loopback(self.listen) else "anyone who can reach " + self.listen
            template = "running without authentication: %s can manage the cluster; %s"
            fix = "set MUSTER_NODE_TOKEN and MUSTER_ADMIN_TOKEN"
            log.warning(template, who, fix, extra={"event": "auth_open"})
            print("muster: WARNING: " + template % (who, fix), file=sys.stderr, flush=True)
        elif self.admin_digest is None:
            log.warning(
                "no admin token configured: admin RPCs (delete, reset, drain, rotate, break lock) are refused; "
                "set MUSTER_ADMIN_TOKEN",
                extra={"event": "auth_no_admin"},
            )


def load_security(settings: Settings) -> Security:
    """Reads the tokens and TLS files the settings name and applies the open-mode rule.

    Args:
        settings: the server settings (``node_token``/``node_token_file``, ``admin_token``/
            ``admin_token_file``, ``tls_cert_file``, ``tls_key_file``, ``tls_client_ca_file``,
            ``allow_unauthenticated``, ``listen``).

    Returns:
        The server's :class:`Security`.

    Raises:
        AuthConfigError: a token file is unreadable or too open, a token is too short, the two
            tokens are equal, TLS files are missing or incomplete, or the listen address is not
            loopback and neither tokens nor mTLS are configured. The message is one line saying
            what to set.
    """
    s = settings
    node = _token(s.node_token, s.node_token_file, "node_token")
    admin = _token(s.admin_token, s.admin_token_file, "admin_token")
    if node is not None and node == admin:
        raise AuthConfigError("MUSTER_NODE_TOKEN and MUSTER_ADMIN_TOKEN must differ (a node must not be an admin)")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise AuthConfigError("TLS needs both MUSTER_TLS_CERT_FILE and MUSTER_TLS_KEY_FILE")
    if s.tls_client_ca_file is not None and s.tls_cert_file is None:
        raise AuthConfigError("mTLS (MUSTER_TLS_CLIENT_CA_FILE) needs MUSTER_TLS_CERT_FILE and MUSTER_TLS_KEY_FILE")
    cert = _read(s.tls_cert_file, "tls_cert_file") if s.tls_cert_file else None
    key = _read(s.tls_key_file, "tls_key_file") if s.tls_key_file else None
    client_ca = _read(s.tls_client_ca_file, "tls_client_ca_file") if s.tls_client_ca_file else None
    authenticated = node is not None or admin is not None or client_ca is not None
    if not authenticated and not is_loopback(s.listen) and not s.allow_unauthenticated:
        raise AuthConfigError(
            f"refusing to serve {s.listen} without authentication: set MUSTER_NODE_TOKEN and "
            "MUSTER_ADMIN_TOKEN (or their _FILE variants), or mTLS with MUSTER_TLS_CERT_FILE, "
            "MUSTER_TLS_KEY_FILE and MUSTER_TLS_CLIENT_CA_FILE; or listen on 127.0.0.1"
        )
    return Security(
        listen=s.listen,
        node_digest=_digest(node) if node is not None else None,
        admin_digest=_digest(admin) if admin is not None else None,
        cert_chain=cert,
        private_key=key,
        client_ca=client_ca,
        open=not authenticated,
        outbound_token=admin or node,
    )
