"""BalancerService: validates input, decides from the node view, reserves through the placement batcher."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import grpc

from muster.api.balancer.v1 import balancer_pb2, balancer_service_pb2_grpc
from muster.api.balancer.v1 import balancer_service_pb2 as pb
from muster.balancer.decide import Split, decide
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
    Decision,
    NodeInfo,
    Session,
    SessionState,
    new_session_id,
    node_of_route,
    route_of,
    verify_session_id,
)
from muster.balancer.store import Ask, Placed, session_to_proto
from muster.core import metrics, telemetry, validate
from muster.core.errors import InvalidArgumentError, translate_errors

if TYPE_CHECKING:
    from muster.balancer.custom import CustomStrategy, Diagnostics
    from muster.balancer.store import BalancerStore
    from muster.balancer.view import NodeView, RouteKeys, StrategyCache

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


def _with_excluded(split: Split, decision: Decision) -> pb.PlaceSessionResponse:
    """A response holding the decision's excluded nodes. Those of the split (no node found full) are
    built once per split and copied: with 10,000 nodes, a label requirement excludes thousands."""
    resp = pb.PlaceSessionResponse()
    if decision.excluded and len(decision.excluded) == len(split.excluded):
        template = split.memo.get("excluded")
        if template is None:
            template = split.memo["excluded"] = pb.PlaceSessionResponse(excluded=_excluded(split.excluded))
        resp.CopyFrom(template)
    elif decision.excluded:
        resp.excluded.extend(_excluded(decision.excluded))
    return resp


def _excluded(excluded: Sequence[tuple[NodeInfo, str]]) -> list[balancer_pb2.Excluded]:
    return [balancer_pb2.Excluded(node_id=n.id, address=n.address, reason=r) for n, r in excluded]


class BalancerServicer(balancer_service_pb2_grpc.BalancerServiceServicer):
    """The balancer's RPCs.

    Args:
        store: the balancer's tables.
        view: the live node view.
        strategy: the cached strategy.
        keys: the route-signing keys.
        place: the batcher of reserving placements (``store.reserve`` behind a ``GroupCommit``).
        custom: the custom strategy, if configured.
        diagnostics: the decisions log, if configured.
    """

    def __init__(
        self,
        store: BalancerStore,
        view: NodeView,
        strategy: StrategyCache,
        keys: RouteKeys,
        place: Callable[[Ask], Awaitable[Placed]],
        *,
        custom: CustomStrategy | None = None,
        diagnostics: Diagnostics | None = None,
    ) -> None:
        self._store = store
        self._view = view
        self._strategy = strategy
        self._keys = keys
        self._place = place
        self._custom = custom
        self._diagnostics = diagnostics

    @translate_errors
    async def PlaceSession(
        self, request: pb.PlaceSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.PlaceSessionResponse:
        user = _text("user", request.user, maximum=MAX_USER, required=True)
        kind = _text("kind", request.kind, maximum=MAX_KIND, required=False)
        labels = validate.labels("labels", request.labels)
        request_id = validate.request_id("request_id", request.request_id)
        strategy = await self._strategy.get()
        if strategy == "system-load":
            await self._view.fresh_loads(wait=False)
        if not self._view.ready:
            raise ViewNotReadyError()
        split = await self._view.current_split(labels)
        if not split.candidates:
            raise NoEligibleNodeError([(n.id, n.address, r) for n, r in split.excluded], labels)
        await self._keys.get()
        forced, fallback = None, ""
        if strategy == "custom":
            if self._custom is None:
                fallback = "the custom strategy is not configured on this replica (balancer_custom)"
            else:
                counts = await self._store.counts([n.id for n in split.candidates])
                forced, fallback = await self._custom.choose(user, kind, labels, split.candidates, counts)
        everyone = request.all_candidates or self._diagnostics is not None
        append_id = 0
        if request.dry_run:
            # The same decision a reservation makes, on counts read without the lock.
            counts = await self._store.counts([n.id for n in split.candidates])
            decision = decide(
                strategy,
                user,
                split.candidates,
                counts,
                excluded=split.excluded,
                forced=forced,
                fallback=fallback,
                limit=None if everyone else BRIEF_CANDIDATES,
                capped=split.capped,
                labels=labels,
            )
            winner = decision.winner
            session = session_to_proto(
                Session(
                    new_session_id(self._keys.signing_key(), winner.route),
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
            )
        else:
            placed = await self._place(
                Ask(user, kind, request_id, split, forced, fallback, everyone=everyone, labels=labels)
            )
            session, append_id = placed.message, placed.append_id
            if placed.decision is not None:
                metrics.placements.add(1, {"strategy": placed.decision.strategy})
            decision = placed.decision or Decision(
                next((n for n in split.candidates if n.id == session.node_id), split.candidates[0]), (), (), strategy
            )
        telemetry.annotate(strategy=decision.strategy, node_id=session.node_id, candidates=decision.candidates)
        if self._diagnostics is not None and placed_decision(decision):
            self._diagnostics.record(user, kind, labels, decision, session.id, request.dry_run)
        resp = _with_excluded(split, decision)
        resp.session.CopyFrom(session)
        resp.strategy = decision.strategy
        resp.candidates.extend(_candidates(decision, request.all_candidates))
        resp.candidate_count = decision.candidates
        resp.fallback = decision.fallback
        if request.wait_for_revision and append_id:
            resp.revision = await self._store.revision_of(append_id)
        return resp

    @translate_errors
    async def ReportSession(
        self, request: pb.ReportSessionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportSessionResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        session_id = _session_id("session_id", request.session_id)
        if request.kind == pb.ReportSessionRequest.KIND_ENDED:
            await self._store.ended(node_id, session_id)
            return pb.ReportSessionResponse()
        if request.kind != pb.ReportSessionRequest.KIND_STARTED:
            raise InvalidArgumentError("kind", "must be KIND_STARTED or KIND_ENDED")
        pid = validate.integer("pid", request.pid, low=0, high=2**31 - 1)
        user = _text("user", request.user, maximum=MAX_USER, required=False)
        kind = _text("session_kind", request.session_kind, maximum=MAX_KIND, required=False)
        node = next((n for n in self._view.nodes() if n.id == node_id), None)
        if node is None:
            node = NodeInfo(node_id, "", "ONLINE")  # joined a moment ago: the view will catch up
        session = await self._store.started(node, session_id, pid, user, kind)
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
        sessions, now = await self._store.list_sessions(node_id, after, size + 1)
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
        found = await self._store.route(session_id)
        if found is not None and not found[1] and node_of_route(session_id.rpartition(".")[2]) is None:
            # A session its node reported under the application's own id (no route to check).
            return pb.RouteSessionResponse(session=session_to_proto(found[0]), moved=False)
        keys = [k for _, _, k in await self._keys.get()]
        if not verify_session_id(keys, session_id):
            keys = [k for _, _, k in await self._keys.get(refresh=True)]
            if not verify_session_id(keys, session_id):
                raise ForgedSessionIdError(session_id)
        if found is None:
            raise SessionNotFoundError(session_id)
        session, moved = found
        return pb.RouteSessionResponse(session=session_to_proto(session), moved=moved)

    @translate_errors
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.GetStatusResponse:
        await self._view.fresh_loads(wait=True)
        nodes = self._view.nodes()
        sessions, now = await self._store.all_sessions()
        by_node: dict[int, list[Session]] = {}
        for s in sessions:
            by_node.setdefault(s.node_id, []).append(s)
        resp = pb.GetStatusResponse(strategy=await self._strategy.get())
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
        if name == "custom" and self._custom is None:
            raise StrategyUnavailableError()
        previous, append_id = await self._store.set_strategy(name)
        return pb.SetStrategyResponse(previous=previous, revision=await self._store.revision_of(append_id))

    @translate_errors
    async def CountSessions(
        self, request: pb.CountSessionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CountSessionsResponse:
        counts, revision = await self._store.session_counts()
        resp = pb.CountSessionsResponse(revision=revision)
        for node_id, n, placed in counts:
            resp.counts.add(node_id=node_id, sessions=n, placed=placed)
        return resp

    @translate_errors
    async def EvacuateNode(
        self, request: pb.EvacuateNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvacuateNodeResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        moved, ended = await self.evacuate(node_id, end_stranded=request.end_stranded)
        return pb.EvacuateNodeResponse(moved=moved, ended=ended)

    async def evacuate(self, node_id: int, *, end_stranded: bool) -> tuple[int, int]:
        """Moves a node's sessions to the other candidates (never onto itself), ending the stranded ones.

        Only from a view known to be current (else UNAVAILABLE, before anything moves or ends): a
        view that has not loaded, or stalled, would see no candidate and end sessions that could move."""
        await self._view.current_nodes()
        await self._keys.get()
        return await self._store.evacuate(
            node_id, self._view.candidates, self._keys.signing_key(), end_stranded=end_stranded
        )


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
