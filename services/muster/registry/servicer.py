"""RegistryService: validates input, calls the store, turns results into protos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message

from muster.api.errors.v1 import error_reason_pb2
from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.core import telemetry, validate
from muster.core.errors import InvalidArgumentError, MusterError, abort_with, translate, translate_errors
from muster.core.events import EventBus
from muster.core.watch import Streams, WatchLimits, run_watch
from muster.registry import convert, keycheck, sessions
from muster.registry.errors import NodeHasSessionsError, NodeNotFoundError
from muster.registry.heartbeats import Beat, HeartbeatBatcher, Outcome
from muster.registry.models import HeartbeatResult, Load, Mode, format_address
from muster.registry.store import RegistryStore
from muster.registry.view import NodeView, raw_message, repeated, tag

_MODES = {int(m): m for m in Mode}
# KeepAlive messages a stream may have waiting for their group commit at once.
_KEEPALIVE_IN_FLIGHT = 256
# Heartbeats one KeepAlive message may carry.
_MAX_HEARTBEATS_PER_MESSAGE = 1_000
_NODE_TAG = tag(1)


def _heartbeat_error(index: int, exc: BaseException) -> pb.HeartbeatError:
    err = translate(exc)
    reason = "ERROR_REASON_" + err.reason
    return pb.HeartbeatError(
        index=index,
        code=err.code.value[0],
        reason=error_reason_pb2.ErrorReason.Value(reason) if reason in error_reason_pb2.ErrorReason.keys() else 0,
        message=str(err),
        metadata=err.metadata,
    )


def _load(field: str, msg: node_pb2.Load) -> Load:
    return Load(
        load1=validate.finite(f"{field}.load1", msg.load1, low=0, high=1e6),
        load5=validate.finite(f"{field}.load5", msg.load5, low=0, high=1e6),
        load15=validate.finite(f"{field}.load15", msg.load15, low=0, high=1e6),
        cpu_count=validate.integer(f"{field}.cpu_count", msg.cpu_count, low=0, high=65_536),
        session_count=validate.integer(f"{field}.session_count", msg.session_count, low=0, high=10_000_000),
    )


class RegistryServicer(registry_service_pb2_grpc.RegistryServiceServicer):
    """The registry's RPCs."""

    def __init__(
        self,
        store: RegistryStore,
        batcher: HeartbeatBatcher,
        bus: EventBus,
        limits: WatchLimits,
        streams: Streams,
        view: NodeView,
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._view = view
        self._bus = bus
        self._limits = limits
        self._streams = streams
        self.key_checker: keycheck.KeyChecker | None = None  # set by the component at start
        self.sessions: sessions.SessionSource | None = None  # the balancer (set by the component at start)

    async def _revision(self, append_id: int, wanted: bool, numbered: asyncio.Future[int] | None = None) -> int:
        return await self._store.revision_of(append_id, numbered) if wanted and append_id else 0

    def _timing(self, msg: pb.JoinNodeResponse | pb.HeartbeatResponse) -> None:
        msg.heartbeat_interval.FromTimedelta(self._store.timing.heartbeat_interval)

    @translate_errors
    async def JoinNode(self, request: pb.JoinNodeRequest, context: grpc.aio.ServicerContext) -> pb.JoinNodeResponse:
        host = validate.host("host", request.host)
        port = validate.port("port", request.port)
        refusal = None
        if request.HasField("key_check"):
            cookie, launcher, refusal = keycheck.validate_key_check("key_check", request.key_check)
            if refusal is None and (cookie or launcher) and self.key_checker is not None:
                refusal = await self.key_checker.check(0, cookie, launcher)
        written = await self._store.join(
            host=host,
            port=port,
            address=format_address(host, port),
            ipv4=validate.ipv4("ipv4", request.ipv4),
            labels=validate.labels("labels", request.labels),
            request_id=validate.request_id("request_id", request.request_id),
            load=_load("load", request.load),
            refusal=refusal,
        )
        assert written.node is not None
        telemetry.annotate(node_id=written.node.id, address=written.node.address)
        resp = pb.JoinNodeResponse(
            node=convert.node_to_proto(written.node),
            revision=await self._revision(written.append_id, request.wait_for_revision, written.numbered),
        )
        self._timing(resp)
        resp.lease_ttl.FromTimedelta(self._store.timing.lease_ttl)
        resp.server_time.FromDatetime(written.node.last_seen_time)
        return resp

    @staticmethod
    def _heartbeat_args(request: pb.HeartbeatRequest, field: str = "") -> tuple[int, int, Load]:
        """The validated (node id, lease id, load) of a heartbeat; raises naming the bad field."""
        node_id = validate.positive_id(field + "node_id", request.node_id)
        lease_id = validate.positive_id(field + "lease_id", request.lease_id)
        return node_id, lease_id, _load(field + "load", request.load)

    def _heartbeat_response(self, result: HeartbeatResult) -> pb.HeartbeatResponse:
        resp = pb.HeartbeatResponse()
        resp.lease_expire_time.FromDatetime(result.lease_expire_time)
        resp.server_time.FromDatetime(result.server_time)
        self._timing(resp)
        return resp

    async def _heartbeat(self, request: pb.HeartbeatRequest, field: str = "") -> pb.HeartbeatResponse:
        result = await self._batcher.heartbeat(*self._heartbeat_args(request, field))
        return self._heartbeat_response(result)

    @translate_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatResponse:
        return await self._heartbeat(request)

    def _keepalive_beats(self, req: pb.KeepAliveRequest) -> tuple[list[Beat], dict[int, Exception], list[int]]:
        """A message's several heartbeats: the valid ones, the invalid ones' errors by index, and
        each valid one's index in the message."""
        if req.HasField("heartbeat"):
            raise InvalidArgumentError("heartbeats", "set either heartbeat or heartbeats, not both")
        if len(req.heartbeats) > _MAX_HEARTBEATS_PER_MESSAGE:
            raise InvalidArgumentError("heartbeats", f"at most {_MAX_HEARTBEATS_PER_MESSAGE} heartbeats per message")
        beats: list[Beat] = []
        invalid: dict[int, Exception] = {}
        at: list[int] = []
        for i, hb in enumerate(req.heartbeats):
            try:
                beats.append(self._heartbeat_args(hb, f"heartbeats[{i}]."))
                at.append(i)
            except MusterError as exc:
                invalid[i] = exc
        return beats, invalid, at

    def _keepalive_answer(
        self, outcomes: list[Outcome], invalid: dict[int, Exception], at: list[int]
    ) -> pb.KeepAliveResponse:
        """The one answer to a message of several heartbeats: the commit's expiry, and errors by index."""
        resp = pb.KeepAliveResponse()
        errors = dict(invalid)
        renewed: HeartbeatResult | None = None
        for i, outcome in zip(at, outcomes, strict=True):
            if isinstance(outcome, Exception):
                errors[i] = outcome
            elif renewed is None:
                renewed = outcome  # one commit: every renewal of the message has the same expiry
        if renewed is not None:
            resp.heartbeat.CopyFrom(self._heartbeat_response(renewed))
        resp.errors.extend(_heartbeat_error(i, errors[i]) for i in sorted(errors))
        return resp

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """One response per request, in request order.

        A request carries one ``heartbeat`` (the first failing one ends the stream with its status)
        or several ``heartbeats``: those go into one group commit together and get one response,
        with the failed ones' errors by index (they do not end the stream).

        Pipelined: requests are read and their heartbeats started while earlier ones wait for their
        group commit (at most ``_KEEPALIVE_IN_FLIGHT`` requests per stream), so a stream carrying many nodes'
        heartbeats joins each batch with all of them instead of one per commit. Nothing outlives
        the stream: when it ends, fails or is cancelled, the reader and every heartbeat still in
        flight are cancelled (a heartbeat already queued in a batch still commits; nobody is told).
        """
        slots = asyncio.Semaphore(_KEEPALIVE_IN_FLIGHT)
        # Per request: its future, and for several heartbeats the invalid ones and the valid ones' indexes.
        Pending = tuple[asyncio.Future[list[Outcome]], dict[int, Exception] | None, list[int]]
        order: asyncio.Queue[Pending | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def failed(exc: Exception) -> asyncio.Future[list[Outcome]]:
            fut: asyncio.Future[list[Outcome]] = loop.create_future()
            fut.set_exception(exc)
            return fut

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    if not req.heartbeats:
                        try:
                            beat = self._batcher.submit([self._heartbeat_args(req.heartbeat, "heartbeat.")])
                        except Exception as exc:  # noqa: BLE001 - bad input: answered in its turn
                            beat = failed(exc)
                        order.put_nowait((beat, None, []))
                        continue
                    try:
                        beats, invalid, at = self._keepalive_beats(req)
                    except Exception as exc:  # noqa: BLE001 - a malformed message: answered in its turn
                        order.put_nowait((failed(exc), None, []))
                        continue
                    if beats:
                        beat = self._batcher.submit(beats)
                    else:
                        beat = loop.create_future()
                        beat.set_result([])
                    order.put_nowait((beat, invalid, at))
            except Exception as exc:  # noqa: BLE001 - the stream broke: its status, in order, like a heartbeat's
                order.put_nowait((failed(exc), None, []))
            order.put_nowait(None)

        reader = asyncio.ensure_future(read())
        item: Pending | None = None
        last: HeartbeatResult | None = None
        msg = pb.KeepAliveResponse()
        try:
            while (item := await order.get()) is not None:
                beat, invalid, at = item
                outcomes = await beat
                if invalid is None:
                    result = outcomes[0]
                    if isinstance(result, Exception):
                        raise result
                    if result != last:  # a batch's heartbeats share one answer (its commit's now())
                        msg, last = pb.KeepAliveResponse(heartbeat=self._heartbeat_response(result)), result
                    await context.write(msg)
                else:
                    await context.write(self._keepalive_answer(outcomes, invalid, at))
                slots.release()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped like every unary call
            await abort_with(context, translate(exc))
        finally:
            # Everything cancelled at once (before any await, so a second cancellation of this call
            # cannot leave one behind), then collected with its exception.
            reader.cancel()
            leftovers = [item[0]] if item is not None else []
            while not order.empty():
                if (queued := order.get_nowait()) is not None:
                    leftovers.append(queued[0])
            for fut in leftovers:
                fut.cancel()
            await asyncio.gather(reader, *leftovers, return_exceptions=True)

    @translate_errors
    async def LeaveNode(self, request: pb.LeaveNodeRequest, context: grpc.aio.ServicerContext) -> pb.LeaveNodeResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        lease_id = validate.positive_id("lease_id", request.lease_id)
        if request.delete_node:
            written = await self._store.delete(node_id, force=True, lease_id=lease_id)
        else:
            written = await self._store.leave(node_id, lease_id)
        return pb.LeaveNodeResponse(
            revision=await self._revision(written.append_id, request.wait_for_revision, written.numbered)
        )

    @translate_errors
    async def GetNode(self, request: pb.GetNodeRequest, context: grpc.aio.ServicerContext) -> pb.GetNodeResponse:
        node = await self._store.get(validate.positive_id("node_id", request.node_id))
        return pb.GetNodeResponse(node=convert.node_to_proto(node))

    @translate_errors
    async def ListNodes(self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext) -> Message:
        """A page from this replica's node view (see :mod:`muster.registry.view`), sent as the bytes
        the view keeps. The first page waits until the view has every change committed before the
        request (read-your-writes); a later page, until it has reached its token's revision."""
        size = validate.page_size("page_size", request.page_size)
        token = _decode_list_token(request.page_token)
        if token is None:
            await self._view.caught_up()
            after = (-1, 0)
        else:
            await self._view.at_least(token["revision"])
            after = (token["rank"], token["id"])
        page = self._view.page(after, size)  # no await since the wait: one revision
        tail = pb.ListNodesResponse(revision=page.revision)
        if page.next_key:
            tail.next_page_token = validate.encode_token(
                {"rank": page.next_key[0], "id": page.next_key[1], "revision": page.revision}
            )
        tail.server_time.FromDatetime(self._bus.db_now())
        return raw_message(repeated(1, page.parts) + tail.SerializeToString())

    @translate_errors
    async def DeleteNode(
        self, request: pb.DeleteNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteNodeResponse:
        """Refuses an ONLINE node with sessions (the balancer's, placed and started: see
        :mod:`muster.registry.sessions`) unless forced; a deletion that goes ahead first has the
        balancer move the node's sessions as a failover does, ending those no node can take, and
        answers how many of each. Sessions placed on it after that (a placement decided on a view
        that still showed it) are moved by the balancer's failover when the deletion's event reaches it."""
        node_id = validate.positive_id("node_id", request.node_id)
        await self._view.caught_up()
        node = self._view.node(node_id)
        if node is None:
            raise NodeNotFoundError(node_id)
        count = self._view.session_count(node_id)
        refusing = count
        if self.sessions is None:
            # No balancer to ask (none in this process, no balancer_address): what the node's agent
            # reports is then all this registry can know, and a node is never deleted under it.
            refusing = max(count, node.load.session_count)
        online = node.state == node_pb2.Node.STATE_ONLINE
        if online and refusing > 0 and not request.force:
            raise NodeHasSessionsError(node_id, refusing)
        moved = ended = 0
        if count > 0 and self.sessions is not None:
            moved, ended = await self.sessions.evacuate(node_id)
        written = await self._store.delete(node_id, force=True)
        return pb.DeleteNodeResponse(
            revision=await self._revision(written.append_id, request.wait_for_revision, written.numbered),
            sessions=count,
            moved_sessions=moved,
            ended_sessions=ended,
        )

    @translate_errors
    async def SetNodeMode(
        self, request: pb.SetNodeModeRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetNodeModeResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        mode = validate.enum_value("mode", request.mode, _MODES)
        written = await self._store.set_mode(node_id, mode)
        assert written.node is not None
        return pb.SetNodeModeResponse(
            node=convert.node_to_proto(written.node),
            revision=await self._revision(written.append_id, request.wait_for_revision, written.numbered),
        )

    @translate_errors
    async def ResetCluster(
        self, request: pb.ResetClusterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetClusterResponse:
        cluster, deleted, append_id = await self._store.reset()
        return pb.ResetClusterResponse(
            cluster=self._store.cluster_proto(cluster),
            deleted_nodes=deleted,
            revision=await self._revision(append_id, request.wait_for_revision),
        )

    @translate_errors
    async def GetCluster(
        self, request: pb.GetClusterRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetClusterResponse:
        cluster, head, now = await self._store.get_cluster()
        resp = pb.GetClusterResponse(cluster=self._store.cluster_proto(cluster), head_revision=head)
        resp.server_time.FromDatetime(now)
        return resp

    @translate_errors
    async def GetNodeStatus(self, request: pb.GetNodeStatusRequest, context: grpc.aio.ServicerContext) -> Message:
        """From this replica's node view, once it has every change committed before the request."""
        node_id = validate.positive_id("node_id", request.node_id)
        await self._view.caught_up()
        node, part = self._view.node(node_id), self._view.encoded(node_id)
        if node is None or part is None:
            raise NodeNotFoundError(node_id)
        online = self._view.parts(online_only=True)
        tail = pb.GetNodeStatusResponse(session_count=node.load.session_count, revision=self._view.revision)
        return raw_message(_NODE_TAG + part + repeated(2, online) + tail.SerializeToString())

    @translate_errors
    async def ListNodeLoads(
        self, request: pb.ListNodeLoadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodeLoadsResponse:
        size = validate.page_size("page_size", request.page_size)
        token = validate.decode_token("page_token", request.page_token, ("id",))
        page = await self._store.list_loads(token["id"] if token else 0, size)
        resp = pb.ListNodeLoadsResponse()
        for r in page.rows:
            item = resp.loads.add(
                node_id=r["id"],
                state=r["state"],
                mode=r["mode"],
                health=r["health"],
                load=node_pb2.Load(
                    load1=r["load1"],
                    load5=r["load5"],
                    load15=r["load15"],
                    cpu_count=r["cpu_count"],
                    session_count=r["session_count"],
                ),
            )
            item.last_seen_time.FromDatetime(r["last_seen_time"])
        if page.next_id:
            resp.next_page_token = validate.encode_token({"id": page.next_id})
        resp.server_time.FromDatetime(page.server_time)
        return resp

    @translate_errors
    async def WatchEvents(self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext) -> None:
        await run_watch(
            request, context, bus=self._bus, snapshot=self._resync, limits=self._limits, streams=self._streams
        )

    async def _resync(self, node_ids: frozenset[int]) -> pb.Resync:
        """A snapshot from this replica's node view, once it has every change committed before the call."""
        await self._view.caught_up()
        snap = pb.Resync()
        snap.MergeFromString(repeated(2, self._view.parts(node_ids or None)))  # no await since: one revision
        snap.revision, snap.cluster_epoch = self._view.revision, self._view.epoch
        # The keys service's ACTIVE version, asked after the snapshot (another service's state: as
        # of now, not of the snapshot's revision); 0 when it has none or cannot say.
        snap.active_key_version = await self.key_checker.active_version() if self.key_checker is not None else 0
        return snap


def _decode_list_token(token: str) -> dict[str, int] | None:
    """A ListNodes page token: position and revision (a token without a revision, from an older
    server, is read as revision 0)."""
    try:
        return validate.decode_token("page_token", token, ("rank", "id", "revision"))
    except InvalidArgumentError:
        old = validate.decode_token("page_token", token, ("rank", "id"))
        assert old is not None
        return {**old, "revision": 0}
