"""The balancer's calls: ``cluster.place_session(user)``, ``cluster.route_session(id)``, ``cluster.status()``…"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from muster.api.balancer.v1 import balancer_pb2
from muster.api.balancer.v1 import balancer_service_pb2 as pb
from muster.client._channel import Endpoint


def _ts(ts: Any) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if ts.seconds or ts.nanos else None


@dataclass(frozen=True, slots=True)
class Session:
    """A user's session: ``id`` is ``<base>.<route>``; ``state`` is PLACED or STARTED."""

    id: str
    node_id: int
    node_address: str
    route: str
    user: str
    kind: str
    state: str
    pid: int
    place_time: datetime | None
    start_time: datetime | None
    moved_from: str = ""

    @classmethod
    def from_proto(cls, msg: balancer_pb2.Session) -> Session:
        """From the message."""
        return cls(
            msg.id,
            msg.node_id,
            msg.node_address,
            msg.route,
            msg.user,
            msg.kind,
            balancer_pb2.Session.State.Name(msg.state).removeprefix("STATE_"),
            msg.pid,
            _ts(msg.place_time),
            _ts(msg.start_time),
            msg.moved_from,
        )


@dataclass(frozen=True, slots=True)
class Candidate:
    """A candidate node of a placement and its score (lower wins; ``chosen`` marks the winner)."""

    node_id: int
    address: str
    score: float
    sessions: int
    load1: float
    cpu_count: int
    chosen: bool


@dataclass(frozen=True, slots=True)
class Excluded:
    """A node that could not take the session: ``reason`` is draining, missed_check_in, offline or labels."""

    node_id: int
    address: str
    reason: str


@dataclass(frozen=True, slots=True)
class Placement:
    """A placement and its explanation."""

    session: Session
    strategy: str
    candidates: tuple[Candidate, ...]
    excluded: tuple[Excluded, ...]
    fallback: str = ""
    revision: int = 0
    candidate_count: int = 0

    @property
    def node_id(self) -> int:
        """The chosen node."""
        return self.session.node_id


@dataclass(frozen=True, slots=True)
class NodeSessions:
    """A node in the status view, with its sessions."""

    node_id: int
    address: str
    route: str
    state: str
    unreachable: bool
    draining: bool
    offline: bool
    load1: float
    load5: float
    load15: float
    cpu_count: int
    sessions: tuple[Session, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """The cluster status view."""

    nodes: tuple[NodeSessions, ...]
    strategy: str
    server_time: datetime | None


class BalancerApi:
    """The balancer's calls (mixed into :class:`muster.client.Cluster`)."""

    _balancer: Endpoint

    async def _balancer_call(self, method: str, request: Any, *, retry: bool = True) -> Any:
        return await self._call(self._balancer, method, request, retry=retry)  # type: ignore[attr-defined]

    async def place_session(
        self,
        user: str,
        *,
        kind: str = "",
        labels: dict[str, str] | None = None,
        dry_run: bool = False,
        request_id: str | None = None,
        wait_for_revision: bool = False,
        all_candidates: bool = False,
    ) -> Placement:
        """Places a new session by the cluster's strategy (a reservation unless ``dry_run``).

        The answer explains the decision: the ten best candidates with their scores (every one with
        ``all_candidates``; ``candidate_count`` says how many there were) and the excluded nodes.

        Retried safely: the request carries an id the server deduplicates.

        Raises:
            NoEligibleNodeError: no node can take it (``metadata["excluded"]`` says why, node by node).
            InvalidArgumentError: a bad user, kind or label.
        """
        req = pb.PlaceSessionRequest(
            user=user,
            kind=kind,
            labels=labels or {},
            dry_run=dry_run,
            request_id="" if dry_run else (request_id or uuid.uuid4().hex),
            wait_for_revision=wait_for_revision,
            all_candidates=all_candidates,
        )
        resp = await self._balancer_call("PlaceSession", req)
        return Placement(
            Session.from_proto(resp.session),
            resp.strategy,
            tuple(
                Candidate(c.node_id, c.address, c.score, c.sessions, c.load1, c.cpu_count, c.chosen)
                for c in resp.candidates
            ),
            tuple(Excluded(e.node_id, e.address, e.reason) for e in resp.excluded),
            resp.fallback,
            resp.revision,
            resp.candidate_count,
        )

    async def report_session_started(
        self, node_id: int, session_id: str, *, pid: int = 0, user: str = "", kind: str = ""
    ) -> Session:
        """A node reports a session started (a placed one, or one started without placement)."""
        req = pb.ReportSessionRequest(
            node_id=node_id,
            session_id=session_id,
            kind=pb.ReportSessionRequest.KIND_STARTED,
            pid=pid,
            user=user,
            session_kind=kind,
        )
        return Session.from_proto((await self._balancer_call("ReportSession", req)).session)

    async def report_session_ended(self, node_id: int, session_id: str) -> None:
        """A node reports a session ended (reporting twice is harmless)."""
        req = pb.ReportSessionRequest(node_id=node_id, session_id=session_id, kind=pb.ReportSessionRequest.KIND_ENDED)
        await self._balancer_call("ReportSession", req)

    async def list_sessions(self, *, node_id: int = 0, page_size: int = 1000) -> list[Session]:
        """Every session (all pages), by node then oldest first; one node's with ``node_id``."""
        out: list[Session] = []
        token = ""
        while True:
            resp = await self._balancer_call(
                "ListSessions", pb.ListSessionsRequest(node_id=node_id, page_size=page_size, page_token=token)
            )
            out += [Session.from_proto(s) for s in resp.sessions]
            token = resp.next_page_token
            if not token:
                return out

    async def route_session(self, session_id: str) -> tuple[Session, bool]:
        """The session's node now (following moves) and whether it moved.

        Raises:
            ForgedSessionIdError: the id's route signature does not verify.
            SessionNotFoundError: it ended.
        """
        resp = await self._balancer_call("RouteSession", pb.RouteSessionRequest(session_id=session_id))
        return Session.from_proto(resp.session), resp.moved

    async def status(self) -> ClusterStatus:
        """The cluster status view: every node, whether unreachable, draining or offline, its load and sessions."""
        resp = await self._balancer_call("GetStatus", pb.GetStatusRequest())
        return ClusterStatus(
            tuple(
                NodeSessions(
                    n.node_id,
                    n.address,
                    n.route,
                    n.state,
                    n.unreachable,
                    n.draining,
                    n.offline,
                    n.load1,
                    n.load5,
                    n.load15,
                    n.cpu_count,
                    tuple(Session.from_proto(s) for s in n.sessions),
                )
                for n in resp.nodes
            ),
            resp.strategy,
            _ts(resp.server_time),
        )

    async def set_strategy(self, strategy: str) -> str:
        """Sets the placement strategy (admin); returns the previous one. Not retried."""
        resp = await self._balancer_call("SetStrategy", pb.SetStrategyRequest(strategy=strategy), retry=False)
        return str(resp.previous)
