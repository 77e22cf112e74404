"""How the registry learns a node's sessions: from the balancer, which owns them.

A node's sessions are the balancer's sessions on it that have not ended, placed and started alike
(an agent's heartbeat count is only what it reports). The registry never reads the balancer's
schema and never imports it: its node view starts from the balancer's ``CountSessions`` (the counts
and the exact revision they reflect) and then follows the balancer's ``SessionPlaced``,
``SessionStarted``, ``SessionMoved`` and ``SessionEnded`` events on the event log, as it follows the
registry's own. A forced ``DeleteNode`` asks the balancer's ``EvacuateNode`` to move the node's
sessions as a failover does (ending those no node can take). The balancer is called in this process
when it runs here (``muster up``), else at ``balancer_address``; with neither, the counts come from
the events alone (a registry started after sessions were placed shows them once they change).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import grpc

from muster.api.balancer.v1 import balancer_service_pb2, balancer_service_pb2_grpc
from muster.core.errors import StoreUnavailableError
from muster.registry.keycheck import outbound_channel

log = logging.getLogger(__name__)

Counts = list[tuple[int, int, int]]  # (node id, sessions, placed)


class SessionSource(Protocol):
    """The balancer, as the registry sees it."""

    async def counts(self) -> tuple[Counts, int]:
        """Every node's (id, sessions, placed) and the revision they reflect."""
        ...

    async def evacuate(self, node_id: int) -> tuple[int, int]:
        """Moves a node's sessions as a failover does, ending those no node can take: (moved, ended)."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


class LocalSessions:
    """The balancer in this process (``muster up``): its servicer's methods, without a network hop."""

    def __init__(self, balancer_component: Any) -> None:
        self._balancer = balancer_component

    async def counts(self) -> tuple[Counts, int]:
        result: tuple[Counts, int] = await self._balancer.store.session_counts()
        return result

    async def evacuate(self, node_id: int) -> tuple[int, int]:
        result: tuple[int, int] = await self._balancer.servicer.evacuate(node_id, end_stranded=True)
        return result

    async def close(self) -> None:
        return None


class RemoteSessions:
    """The balancer at ``address``, called with this server's outbound token (and TLS if configured)."""

    def __init__(
        self,
        address: str,
        *,
        metadata: list[tuple[str, str]],
        ca_file: Path | None = None,
        cert_chain: bytes | None = None,
        private_key: bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        self._channel = outbound_channel(address, ca_file=ca_file, cert_chain=cert_chain, private_key=private_key)
        self._stub = balancer_service_pb2_grpc.BalancerServiceStub(self._channel)
        self._metadata = tuple(metadata)
        self._timeout = timeout

    def _unavailable(self, err: grpc.aio.AioRpcError, what: str) -> StoreUnavailableError:
        log.warning(
            "balancer at %s answered %s to %s",
            self.address,
            err.code().name,
            what,
            extra={"event": "balancer_call_failed", "code": err.code().name},
        )
        return StoreUnavailableError(
            f"the balancer at {self.address} cannot say the node's sessions ({err.code().name}); "
            "retry shortly, or check the registry's balancer_address"
        )

    async def counts(self) -> tuple[Counts, int]:
        try:
            resp = await self._stub.CountSessions(
                balancer_service_pb2.CountSessionsRequest(), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            raise self._unavailable(err, "CountSessions") from None
        return [(c.node_id, c.sessions, c.placed) for c in resp.counts], resp.revision

    async def evacuate(self, node_id: int) -> tuple[int, int]:
        try:
            resp = await self._stub.EvacuateNode(
                balancer_service_pb2.EvacuateNodeRequest(node_id=node_id, end_stranded=True),
                metadata=self._metadata,
                timeout=self._timeout * 6,
            )
        except grpc.aio.AioRpcError as err:
            raise self._unavailable(err, "EvacuateNode") from None
        return resp.moved, resp.ended

    async def close(self) -> None:
        await self._channel.close()
