"""RegistryService: validates input, calls the store, turns results into protos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.core import telemetry, validate
from muster.core.errors import abort_with, translate, translate_errors
from muster.core.events import EventBus
from muster.core.watch import Streams, WatchLimits, run_watch
from muster.registry import convert, keycheck
from muster.registry.heartbeats import HeartbeatBatcher
from muster.registry.models import HeartbeatResult, Load, Mode, format_address
from muster.registry.store import RegistryStore

_MODES = {int(m): m for m in Mode}
# Heartbeats a KeepAlive stream may have waiting for their group commit at once.
_KEEPALIVE_IN_FLIGHT = 256


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
        self, store: RegistryStore, batcher: HeartbeatBatcher, bus: EventBus, limits: WatchLimits, streams: Streams
    ) -> None:
        self._store = store
        self._batcher = batcher
        self._bus = bus
        self._limits = limits
        self._streams = streams
        self.key_checker: keycheck.KeyChecker | None = None  # set by the component at start

    async def _revision(self, append_id: int, wanted: bool) -> int:
        return await self._store.revision_of(append_id) if wanted and append_id else 0

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
            revision=await self._revision(written.append_id, request.wait_for_revision),
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

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """One response per heartbeat, in request order; the first failing heartbeat ends the stream with its status.

        Pipelined: requests are read and their heartbeats started while earlier ones wait for their
        group commit (at most ``_KEEPALIVE_IN_FLIGHT`` per stream), so a stream carrying many nodes'
        heartbeats joins each batch with all of them instead of one per commit. Nothing outlives
        the stream: when it ends, fails or is cancelled, the reader and every heartbeat still in
        flight are cancelled (a heartbeat already queued in a batch still commits; nobody is told).
        """
        slots = asyncio.Semaphore(_KEEPALIVE_IN_FLIGHT)
        order: asyncio.Queue[asyncio.Future[HeartbeatResult] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await slots.acquire()
                    try:
                        beat = self._batcher.submit(*self._heartbeat_args(req.heartbeat, "heartbeat."))
                    except Exception as exc:  # noqa: BLE001 - bad input: answered in its turn
                        beat = loop.create_future()
                        beat.set_exception(exc)
                    order.put_nowait(beat)
            except Exception as exc:  # noqa: BLE001 - the stream broke: its status, in order, like a heartbeat's
                failed: asyncio.Future[HeartbeatResult] = loop.create_future()
                failed.set_exception(exc)
                order.put_nowait(failed)
            order.put_nowait(None)

        reader = asyncio.ensure_future(read())
        beat: asyncio.Future[HeartbeatResult] | None = None
        last: HeartbeatResult | None = None
        msg = pb.KeepAliveResponse()
        try:
            while (beat := await order.get()) is not None:
                result = await beat
                if result != last:  # a batch's heartbeats share one answer (its commit's now())
                    msg, last = pb.KeepAliveResponse(heartbeat=self._heartbeat_response(result)), result
                await context.write(msg)
                slots.release()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped like every unary call
            await abort_with(context, translate(exc))
        finally:
            # Everything cancelled at once (before any await, so a second cancellation of this call
            # cannot leave one behind), then collected with its exception.
            reader.cancel()
            leftovers = [beat] if beat is not None else []
            while not order.empty():
                if (item := order.get_nowait()) is not None:
                    leftovers.append(item)
            for item in leftovers:
                item.cancel()
            await asyncio.gather(reader, *leftovers, return_exceptions=True)

    @translate_errors
    async def LeaveNode(self, request: pb.LeaveNodeRequest, context: grpc.aio.ServicerContext) -> pb.LeaveNodeResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        lease_id = validate.positive_id("lease_id", request.lease_id)
        if request.delete_node:
            written = await self._store.delete(node_id, force=True, lease_id=lease_id)
        else:
            written = await self._store.leave(node_id, lease_id)
        return pb.LeaveNodeResponse(revision=await self._revision(written.append_id, request.wait_for_revision))

    @translate_errors
    async def GetNode(self, request: pb.GetNodeRequest, context: grpc.aio.ServicerContext) -> pb.GetNodeResponse:
        node = await self._store.get(validate.positive_id("node_id", request.node_id))
        return pb.GetNodeResponse(node=convert.node_to_proto(node))

    @translate_errors
    async def ListNodes(self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext) -> pb.ListNodesResponse:
        size = validate.page_size("page_size", request.page_size)
        token = validate.decode_token("page_token", request.page_token, ("rank", "id"))
        page = await self._store.list_nodes((token["rank"], token["id"]) if token else (-1, 0), size)
        resp = pb.ListNodesResponse(revision=page.revision)
        for n in page.nodes:
            resp.nodes.add(**convert.node_fields(n))
        if page.next_key:
            resp.next_page_token = validate.encode_token({"rank": page.next_key[0], "id": page.next_key[1]})
        resp.server_time.FromDatetime(page.server_time)
        return resp

    @translate_errors
    async def DeleteNode(
        self, request: pb.DeleteNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteNodeResponse:
        node_id = validate.positive_id("node_id", request.node_id)
        written = await self._store.delete(node_id, force=request.force)
        return pb.DeleteNodeResponse(revision=await self._revision(written.append_id, request.wait_for_revision))

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
            revision=await self._revision(written.append_id, request.wait_for_revision),
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
    async def GetNodeStatus(
        self, request: pb.GetNodeStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetNodeStatusResponse:
        node, online, revision = await self._store.node_status(validate.positive_id("node_id", request.node_id))
        return pb.GetNodeStatusResponse(
            node=convert.node_to_proto(node),
            online_nodes=[convert.node_to_proto(n) for n in online],
            session_count=node.load.session_count,
            revision=revision,
        )

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
        nodes, epoch, revision = await self._store.snapshot(node_ids)
        # The keys service's ACTIVE version, asked after the snapshot (another service's state: as
        # of now, not of the snapshot's revision); 0 when it has none or cannot say.
        active = await self.key_checker.active_version() if self.key_checker is not None else 0
        return pb.Resync(
            revision=revision,
            nodes=[convert.node_to_proto(n) for n in nodes],
            cluster_epoch=epoch,
            active_key_version=active,
        )
