"""BalancerService: validates input, decides with the component's view, reserves through the store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from muster.api.balancer.v1 import balancer_pb2, balancer_service_pb2_grpc
from muster.api.balancer.v1 import balancer_service_pb2 as pb
from muster.balancer.errors import (
    ForgedSessionIdError,
    NoEligibleNodeError,
    SessionNotFoundError,
    StrategyUnavailableError,
    ViewNotReadyError,
)
from muster.balancer.models import (
    BRIEF_CANDIDATES,
    STRATEGIES,
    Counts,
    Decision,
    NodeInfo,
    Session,
    SessionState,
    new_session_id,
    node_of_route,
    rank,
    route_of,
    verify_session_id,
)
from muster.balancer.store import Ask, session_to_proto
from muster.core import metrics, telemetry, validate
from muster.core.errors import InvalidArgumentError, translate_errors

if TYPE_CHECKING:
    from muster.balancer.component import BalancerComponent

MAX_USER = 256
MAX_KIND = 64
MAX_SESSION_ID = 200


def _text(field: str, value: str, *, maximum: int, required: bool) -> str:
    if required and not value:
        raise InvalidArgumentError(field, "is required")
    if len(value) > maximum:
        raise InvalidArgumentError(field, f"is longer than {maximum} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgumentError(field, "must not contain control characters")
    return value


def _session_id(field: str, value: str) -> str:
    _text(field, value, maximum=MAX_SESSION_ID, required=True)
    if any(c.isspace() for c in value):
        raise InvalidArgumentError(field, "must not contain spaces")
    return value


def _candidates(decision: Decision, everyone: bool) -> list[balancer_pb2.Candidate]:
    scored = decision.scored
    if not everyone and len(scored) > BRIEF_CANDIDATES:
        best = list(scored[:BRIEF_CANDIDATES])
        if all(s.node.id != decision.winner.id for s in best):  # a custom choice further down
            best[-1] = next(s for s in scored if s.node.id == decision.winner.id)
        scored = tuple(best)
    return [
        balancer_pb2.Candidate(
            node_id=s.node.id,
            address=s.node.address,
            score=s.score,
            sessions=s.counts.sessions,
            load1=s.node.load1,
            cpu_count=s.node.cpu_count,
            chosen=s.node.id == decision.winner.id,
        )
        for s in scored
    ]


class BalancerServicer(balancer_service_pb2_grpc.BalancerServiceServicer):
    """The balancer's RPCs."""

    def __init__(self, component: BalancerComponent) -> None:
        self._c = component

    def _nodes(self) -> list[NodeInfo]:
        if not self._c.ready:
            raise ViewNotReadyError()
        return self._c.nodes()

    @translate_errors
    async def PlaceSession(
        self, request: pb.PlaceSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PlaceSessionResponse:
        user = _text("user", request.user, maximum=MAX_USER, required=True)
        kind = _text("kind", request.kind, maximum=MAX_KIND, required=False)
        labels = validate.labels("labels", request.labels)
        request_id = validate.request_id("request_id", request.request_id)
        c = self._c
        strategy = await c.strategy()
        if strategy == "system-load":
            await c.fresh_loads(wait=False)
        if not c.ready:
            raise ViewNotReadyError()
        candidates, excluded = await c.current_split(labels)
        if not candidates:
            raise NoEligibleNodeError([(n.id, n.address, r) for n, r in excluded], labels)
        await c.route_keys()
        forced, fallback = None, ""
        if strategy == "custom":
            if c.custom is None:
                fallback = "the custom strategy is not configured on this replica (balancer_custom)"
            else:
                counts = await c.store.counts([n.id for n in candidates])
                forced, fallback = await c.custom.choose(user, kind, labels, candidates, counts)
        if request.dry_run:
            counts = await c.store.counts([n.id for n in candidates])
            full = [(n, "full") for n in candidates if not n.has_room(counts.get(n.id, Counts()))]
            if full:
                excluded = sorted([*excluded, *full], key=lambda e: e[0].id)
                candidates = [n for n in candidates if n.has_room(counts.get(n.id, Counts()))]
                if not candidates:
                    raise NoEligibleNodeError([(n.id, n.address, r) for n, r in excluded], labels)
                if forced is not None and forced not in candidates:
                    forced, fallback = None, f"the custom strategy chose node {forced.id}, which is full"
            used = strategy if strategy != "custom" else "sessions"
            ranked = rank(used, user, candidates, counts)
            winner = forced or ranked[0].node
            name = strategy if strategy != "custom" or forced is not None else "sessions"
            decision = Decision(winner, tuple(ranked), tuple(excluded), name, fallback)
            session = Session(
                new_session_id(c.signing_key(), winner.route),
                winner.id,
                winner.address,
                winner.route,
                user,
                kind,
                SessionState.PLACED,
                0,
                datetime.now().astimezone(),
                None,
            )
            append_id = 0
        else:
            everyone = request.all_candidates or c.diagnostics is not None
            placed = await c.placer.place(
                Ask(user, kind, request_id, candidates, excluded, forced, fallback, everyone=everyone, labels=labels)
            )
            session, append_id = placed.session, placed.append_id
            assert session is not None  # a refusal was raised by the placer
            if placed.decision is not None:
                metrics.placements.add(1, {"strategy": placed.decision.strategy})
            decision = placed.decision or Decision(
                next((n for n in candidates if n.id == session.node_id), candidates[0]), (), (), strategy
            )
        telemetry.annotate(strategy=decision.strategy, node_id=session.node_id, candidates=decision.candidates)
        if c.diagnostics is not None and placed_decision(decision):
            c.diagnostics.record(user, kind, labels, decision, session.id, request.dry_run)
        return pb.PlaceSessionResponse(
            session=session_to_proto(session),
            strategy=decision.strategy,
            candidates=_candidates(decision, request.all_candidates),
            candidate_count=decision.candidates,
            excluded=[balancer_pb2.Excluded(node_id=n.id, address=n.address, reason=r) for n, r in decision.excluded],
            fallback=decision.fallback,
            revision=await c.store.revision_of(append_id) if request.wait_for_revision and append_id else 0,
        )

    @translate_errors
    async def ReportSession(
        self, request: pb.ReportSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportSessionResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        session_id = _session_id("session_id", request.session_id)
        if request.kind == pb.ReportSessionRequest.KIND_ENDED:
            await self._c.store.ended(node_id, session_id)
            return pb.ReportSessionResponse()
        if request.kind != pb.ReportSessionRequest.KIND_STARTED:
            raise InvalidArgumentError("kind", "must be KIND_STARTED or KIND_ENDED")
        pid = validate.integer("pid", request.pid, low=0, high=2**31 - 1)
        user = _text("user", request.user, maximum=MAX_USER, required=False)
        kind = _text("session_kind", request.session_kind, maximum=MAX_KIND, required=False)
        node = next((n for n in self._nodes() if n.id == node_id), None)
        if node is None:
            node = NodeInfo(node_id, "", "ONLINE")  # joined a moment ago: the view will catch up
        session = await self._c.store.started(node, session_id, pid, user, kind)
        return pb.ReportSessionResponse(session=session_to_proto(session))

    @translate_errors
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionsResponse:
        node_id = validate.positive_id("node_id", request.node_id) if request.node_id else 0
        size = validate.page_size("page_size", request.page_size)
        token = validate.decode_token("page_token", request.page_token, ("node", "t"))
        after = None
        if token:
            last_id = _token_id(request.page_token)
            after = (token["node"], datetime.fromtimestamp(token["t"] / 1e6, UTC), last_id)
        sessions, now = await self._c.store.list_sessions(node_id, after, size + 1)
        resp = pb.ListSessionsResponse(sessions=[session_to_proto(s) for s in sessions[:size]])
        if len(sessions) > size:
            last = sessions[size - 1]
            resp.next_page_token = validate.encode_token(
                {"node": last.node_id, "t": int(last.place_time.timestamp() * 1e6), "id": last.id}
            )
        resp.server_time.FromDatetime(now)
        return resp

    @translate_errors
    async def RouteSession(
        self, request: pb.RouteSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteSessionResponse:
        session_id = _session_id("session_id", request.session_id)
        found = await self._c.store.route(session_id)
        if found is not None and not found[1] and node_of_route(session_id.rpartition(".")[2]) is None:
            # A session its node reported under the application's own id (no route to check).
            return pb.RouteSessionResponse(session=session_to_proto(found[0]), moved=False)
        keys = [k for _, _, k in await self._c.route_keys()]
        if not verify_session_id(keys, session_id):
            keys = [k for _, _, k in await self._c.route_keys(refresh=True)]
            if not verify_session_id(keys, session_id):
                raise ForgedSessionIdError(session_id)
        if found is None:
            raise SessionNotFoundError(session_id)
        session, moved = found
        return pb.RouteSessionResponse(session=session_to_proto(session), moved=moved)

    @translate_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        await self._c.fresh_loads(wait=True)
        nodes = self._nodes()
        sessions, now = await self._c.store.all_sessions()
        by_node: dict[int, list[Session]] = {}
        for s in sessions:
            by_node.setdefault(s.node_id, []).append(s)
        resp = pb.GetStatusResponse(strategy=await self._c.strategy())
        for n in sorted(nodes, key=lambda n: (n.state != "ONLINE", n.id)):
            resp.nodes.add(
                node_id=n.id,
                address=n.address,
                route=route_of(n.id),
                state=n.state,
                unreachable=n.state == "ONLINE" and n.missed_check_in,
                draining=n.draining,
                offline=n.state != "ONLINE",
                load1=n.load1,
                load5=n.load5,
                load15=n.load15,
                cpu_count=n.cpu_count,
                sessions=[session_to_proto(s) for s in sorted(by_node.get(n.id, []), key=lambda s: s.place_time)],
            )
        resp.server_time.FromDatetime(now)
        return resp

    @translate_errors
    async def SetStrategy(
        self, request: pb.SetStrategyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetStrategyResponse:
        name = request.strategy
        if name not in STRATEGIES:
            raise InvalidArgumentError("strategy", f"must be one of {', '.join(STRATEGIES)}")
        if name == "custom" and self._c.custom is None:
            raise StrategyUnavailableError()
        previous, append_id = await self._c.store.set_strategy(name)
        return pb.SetStrategyResponse(previous=previous, revision=await self._c.store.revision_of(append_id))


def _token_id(token: str) -> str:
    import base64
    import json

    value = json.loads(base64.urlsafe_b64decode(token.encode())).get("id")
    if not isinstance(value, str) or len(value) > MAX_SESSION_ID:
        raise InvalidArgumentError("page_token", "is not a token from a previous response")
    return value


def placed_decision(decision: Decision) -> bool:
    """Whether the answer carries a real decision (not a deduplicated retry)."""
    return bool(decision.scored)
