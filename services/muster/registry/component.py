"""Mounts the registry in a server process: servicer, heartbeat batcher, node view, reaper."""

from __future__ import annotations

import logging

import grpc

from muster.api.registry.v1 import registry_service_pb2, registry_service_pb2_grpc
from muster.core import metrics, periodic, watch
from muster.core.server import Runtime
from muster.core.watch import WatchLimits
from muster.registry import keycheck, sessions
from muster.registry.heartbeats import HeartbeatBatcher
from muster.registry.servicer import RegistryServicer
from muster.registry.store import RegistryStore, Timing
from muster.registry.view import NodeView

log = logging.getLogger(__name__)

SERVICE_NAME = registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


class RegistryComponent:
    """The registry service and its background work (the reaper)."""

    service_name = SERVICE_NAME

    def __init__(self, runtime: Runtime) -> None:
        s = runtime.settings
        self._runtime = runtime
        self.store = RegistryStore(
            runtime.pool,
            runtime.bus.numberer,
            Timing(s.heartbeat_interval, s.window, s.lease_ttl, s.max_nodes),
        )
        self.view = NodeView(self.store, runtime.bus)
        # Group commit without a window: heartbeat_batch_window is no longer used.
        self.batcher = HeartbeatBatcher(self.store, self.view.observe)
        limits = WatchLimits(s.progress_interval, s.stream_max_lag, s.stream_write_timeout)
        self.servicer = RegistryServicer(self.store, self.batcher, runtime.bus, limits, runtime.streams, self.view)

    def mount(self, server: grpc.aio.Server) -> list[str]:
        registry_service_pb2_grpc.add_RegistryServiceServicer_to_server(self.servicer, server)
        # WatchEvents writes pre-encoded messages (serialized once for every stream that needs them):
        # its own registered handler, which takes precedence over the generated one, passes bytes through.
        server.add_registered_method_handlers(
            SERVICE_NAME, {"WatchEvents": watch.method_handler(self.servicer.WatchEvents)}
        )
        return [SERVICE_NAME]

    async def start(self) -> None:
        self.servicer.key_checker = self._key_checker()
        self.servicer.sessions = self.view.sessions = self._sessions()
        metrics.observe(
            "muster.node.sessions",
            "The nodes' sessions (the balancer's, not ended), by state: placed or started",
            self.view.session_totals,
        )
        await self.view.start()
        self._runtime.spawn(self._reap(), "muster-reaper")

    async def stop(self) -> None:
        await self.batcher.close()
        await self.view.stop()
        if self.servicer.key_checker is not None:
            await self.servicer.key_checker.close()
        if self.servicer.sessions is not None:
            await self.servicer.sessions.close()

    def _key_checker(self) -> keycheck.KeyChecker | None:
        """The keys service in this process, else at ``keys_address``, else none (and a warning)."""
        rt, s = self._runtime, self._runtime.settings
        keys = rt.components.get("keys")
        if keys is not None:
            return keycheck.LocalKeyChecker(keys)
        if s.keys_address:
            sec = rt.security
            mtls = sec is not None and sec.tls and s.keys_tls_ca_file is not None
            return keycheck.RemoteKeyChecker(
                s.keys_address,
                metadata=sec.call_metadata() if sec else [],
                ca_file=s.keys_tls_ca_file,
                cert_chain=sec.cert_chain if mtls and sec else None,
                private_key=sec.private_key if mtls and sec else None,
            )
        log.warning(
            "joining nodes' key fingerprints are not checked: the keys service does not run in this process; "
            "set MUSTER_KEYS_ADDRESS",
            extra={"event": "key_check_off"},
        )
        return None

    def _sessions(self) -> sessions.SessionSource | None:
        """The balancer in this process, else at ``balancer_address``, else none (counts from events alone)."""
        rt, s = self._runtime, self._runtime.settings
        balancer = rt.components.get("balancer")
        if balancer is not None:
            return sessions.LocalSessions(balancer)
        if s.balancer_address:
            sec = rt.security
            mtls = sec is not None and sec.tls and s.balancer_tls_ca_file is not None
            return sessions.RemoteSessions(
                s.balancer_address,
                metadata=sec.call_metadata() if sec else [],
                ca_file=s.balancer_tls_ca_file,
                cert_chain=sec.cert_chain if mtls and sec else None,
                private_key=sec.private_key if mtls and sec else None,
            )
        log.warning(
            "nodes' sessions are counted from the balancer's events alone (the balancer does not run in this "
            "process); set MUSTER_BALANCER_ADDRESS",
            extra={"event": "session_counts_from_events"},
        )
        return None

    async def _reap(self) -> None:
        s = self._runtime.settings
        every = min(s.reap_interval.total_seconds(), s.heartbeat_interval.total_seconds() / 2)
        await periodic.every(
            every,
            lambda: self.store.sweep(outage_threshold=s.outage_threshold, max_credit=s.max_outage_credit),
            name="reaper pass",
        )
