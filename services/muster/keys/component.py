"""Mounts the keys service: servicer, the rotation sweep, and a follower of the registry's events.

Which nodes are *live* (and so must acknowledge a PENDING version before it is promoted) is decided
here without reading the registry's schema: the follower applies the registry's node events from
this process's event bus to the keys service's own ``keys.nodes`` — ONLINE is live, any other state
is not, a deleted node is forgotten — and a node that calls this service is live until an event
says otherwise. A node that stops being live may complete a rotation, so that tries promotion.
"""

from __future__ import annotations

import logging
import os

import grpc

from muster.api.keys.v1 import keys_service_pb2, keys_service_pb2_grpc
from muster.api.registry.v1 import node_pb2
from muster.core import events, periodic
from muster.core.server import Runtime
from muster.keys import crypto
from muster.keys.errors import CookieKeyMismatchError, LauncherKeyMismatchError
from muster.keys.models import Fingerprints
from muster.keys.servicer import KeysServicer
from muster.keys.store import KeyStore

log = logging.getLogger(__name__)

SERVICE_NAME = keys_service_pb2.DESCRIPTOR.services_by_name["KeysService"].full_name
SWEEP_INTERVAL = 0.5  # seconds; retirements are due at retire_time, promotions follow acks at once
_NODE_EVENTS = {
    node_pb2.NodeJoined.DESCRIPTOR.full_name: node_pb2.NodeJoined,
    node_pb2.NodeStateChanged.DESCRIPTOR.full_name: node_pb2.NodeStateChanged,
    node_pb2.NodeSuspected.DESCRIPTOR.full_name: node_pb2.NodeSuspected,
    node_pb2.NodeRecovered.DESCRIPTOR.full_name: node_pb2.NodeRecovered,
}
_NODE_DELETED = node_pb2.NodeDeleted.DESCRIPTOR.full_name
_ONLINE = node_pb2.Node.STATE_ONLINE


def master_key_from_settings(settings: object) -> crypto.MasterKey:
    """The master key from ``MUSTER_MASTER_KEY`` or ``master_key_file``.

    Raises:
        crypto.MasterKeyError: neither is set, or the key is malformed (a RuntimeError: the server
            does not start, and says how to fix it).
    """
    secret = getattr(settings, "master_key", None)
    key_file = getattr(settings, "master_key_file", None)
    master = crypto.load_master_key(key_b64=secret.get_secret_value() if secret else None, key_file=key_file)
    if not secret and key_file is not None:
        mode = crypto.master_key_file_mode(key_file)
        if mode is not None and mode & 0o077:
            log.warning(
                "master key file %s has mode %s; make it 0600 (chmod 600 %s)",
                key_file,
                oct(mode),
                key_file,
                extra={"event": "master_key_mode", "path": str(key_file), "mode": oct(mode)},
            )
    return master


class KeysComponent:
    """The keys service and its background work.

    Raises:
        crypto.MasterKeyError: on construction, when no usable master key is configured.
    """

    service_name = SERVICE_NAME

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        master = master_key_from_settings(runtime.settings)
        self.store = KeyStore(
            runtime.pool, runtime.bus.numberer, master, grace_period=runtime.settings.key_grace_period
        )
        self.servicer = KeysServicer(self.store)
        log.info(
            "keys sealed under master key %s",
            master.id,
            extra={"event": "master_key_loaded", "master_key_id": master.id, "pid": os.getpid()},
        )

    def mount(self, server: grpc.aio.Server) -> list[str]:
        """Adds the servicer; returns the service name."""
        keys_service_pb2_grpc.add_KeysServiceServicer_to_server(self.servicer, server)
        return [SERVICE_NAME]

    async def start(self) -> None:
        """Starts the sweep and the follower."""
        self._runtime.spawn(self._sweep(), "muster-keys-sweep")
        self._runtime.spawn(self._follow(), "muster-keys-follow")

    async def stop(self) -> None:
        """Nothing to stop beyond the runtime's tasks."""

    async def active_version(self) -> int:
        """The ACTIVE key version (0: none); for the registry's resync snapshots in this process."""
        try:
            return await self.store.active_version()
        except Exception:  # noqa: BLE001 - a snapshot must not fail for want of it
            return 0

    async def check_fingerprints(
        self, node_id: int, cookie: str, launcher: str
    ) -> tuple[str, str, dict[str, str]] | None:
        """The registry's in-process key check (``muster up``): VerifyKeys' verdict on a joining node.

        Returns None when the keys match an accepted version (or the cluster has none yet), else
        (reason, message, metadata) of the mismatch.
        """
        try:
            await self.store.verify(node_id, Fingerprints(cookie, launcher))
        except (CookieKeyMismatchError, LauncherKeyMismatchError) as exc:
            return exc.reason, str(exc), dict(exc.metadata)
        return None

    async def _sweep(self) -> None:
        await periodic.every(SWEEP_INTERVAL, self.store.sweep, name="keys sweep")

    async def _follow(self) -> None:
        """Applies the registry's node events to the keys service's list of live nodes."""
        await events.follow(self._runtime.bus, self._on_event, name="keys follower", after_batch=self._after_batch)

    async def _on_event(self, ev: events.StoredEvent) -> bool:
        """Returns whether a live node went away."""
        cls = _NODE_EVENTS.get(ev.kind)
        if cls is not None:
            msg = cls()
            ev.proto.payload.Unpack(msg)
            live = msg.node.state == _ONLINE
            return bool(await self.store.node_changed(msg.node.id, live, ev.revision)) and not live
        if ev.kind == _NODE_DELETED:
            deleted = node_pb2.NodeDeleted()
            ev.proto.payload.Unpack(deleted)
            return bool(await self.store.node_deleted(deleted.node_id or ev.node_id))
        return False

    async def _after_batch(self, lost_live: list[bool]) -> None:
        if any(lost_live):
            await self.store.sweep()  # a node that went away may complete a rotation
