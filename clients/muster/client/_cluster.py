"""The async client: ``Cluster.connect()`` and the registry API."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from muster.api.balancer.v1 import balancer_service_pb2_grpc
from muster.api.keys.v1 import keys_service_pb2_grpc
from muster.api.locks.v1 import locks_service_pb2_grpc
from muster.api.registry.v1 import node_pb2, registry_service_pb2_grpc
from muster.api.registry.v1 import registry_service_pb2 as pb
from muster.client import keyfiles
from muster.client._balancer import BalancerApi
from muster.client._channel import Endpoint, backoff
from muster.client._config import ClientConfig, default_address, split_addresses
from muster.client._heartbeats import SharedKeepAlive
from muster.client._keys import KeysApi
from muster.client._locks import LocksApi
from muster.client._lockstream import LockStream
from muster.client._models import (
    Cluster as ClusterInfo,
)
from muster.client._models import (
    Heartbeat,
    Lease,
    Load,
    Node,
    NodeList,
    NodeLoad,
    NodeMode,
    NodeState,
    NodeStatus,
)
from muster.client._retry import call_again
from muster.client.errors import InvalidArgumentError, MusterError, NotFoundError, from_rpc_error

T = TypeVar("T")
_TRACER = trace.get_tracer("muster.client")


class Cluster(LocksApi, KeysApi, BalancerApi):
    """A connection to the control plane. Use ``await Cluster.connect(...)`` or
    ``async with Cluster.connect(...) as cluster:``.

    Every call has the configured deadline (10 s by default). Reads and idempotent calls are retried
    on a transient failure (UNAVAILABLE, a server-side CANCELLED, RESOURCE_EXHAUSTED: the table in
    :mod:`muster.client.errors`) with jittered backoff that honours the server's retry delay, moving
    to the next replica; a call the caller cancels is never retried. Errors are raised as
    :mod:`muster.client.errors` classes.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._registry = Endpoint(config.for_service("registry"), config, registry_service_pb2_grpc.RegistryServiceStub)
        self._locks = Endpoint(config.for_service("locks"), config, locks_service_pb2_grpc.LocksServiceStub)
        self._lock_stream = LockStream(self._locks, config)
        self._keys = Endpoint(config.for_service("keys"), config, keys_service_pb2_grpc.KeysServiceStub)
        self._balancer = Endpoint(config.for_service("balancer"), config, balancer_service_pb2_grpc.BalancerServiceStub)
        # Open KeepAlives: with more than one, their heartbeats share one stream, several per message.
        self._keep_alives = 0
        self._shared_keep_alive: SharedKeepAlive | None = None
        self._batched_heartbeats = True  # False once a server did not know KeepAliveRequest.heartbeats

    @classmethod
    def connect(
        cls,
        address: str | Sequence[str] | None = None,
        *,
        config: ClientConfig | None = None,
        **options: Any,
    ) -> _Connecting:
        """Connects to the control plane.

        Args:
            address: one ``host:port`` for all services, or several replicas (a list, or
                comma-separated); default ``MUSTER_ADDRESS`` or 127.0.0.1:7400.
            config: a full :class:`ClientConfig` (then ``address`` and options must be omitted).
            **options: any :class:`ClientConfig` field (``deadline=timedelta(seconds=5)``, ``token=…``).

        Returns:
            An object to ``await`` (giving the Cluster) or to use with ``async with`` (closing it at the end).
        """
        if config is None:
            config = ClientConfig(addresses=split_addresses(address or default_address()), **options)
        elif address is not None or options:
            raise TypeError("pass either config or address and options, not both")
        return _Connecting(cls(config))

    async def close(self) -> None:
        """Closes the channels. Open watches end."""
        await self._lock_stream.close()
        if self._shared_keep_alive is not None:
            await self._shared_keep_alive.close()
        await self._registry.close()
        await self._locks.close()
        await self._keys.close()
        await self._balancer.close()

    @property
    def registry_address(self) -> str:
        """The registry replica in use."""
        return self._registry.address

    # -- plumbing ------------------------------------------------------------------------------

    async def _call(
        self, endpoint: Endpoint, method: str, request: Any, *, retry: bool, timeout: timedelta | None = None
    ) -> Any:
        with _TRACER.start_as_current_span(method, kind=SpanKind.CLIENT, attributes={"rpc.method": method}):
            return await self._attempts(endpoint, method, request, retry=retry, timeout=timeout)

    async def _attempts(
        self, endpoint: Endpoint, method: str, request: Any, *, retry: bool, timeout: timedelta | None
    ) -> Any:
        attempt = 0
        deadline = (timeout or self.config.deadline).total_seconds()
        while True:
            try:
                return await getattr(endpoint.stub(), method)(request, timeout=deadline)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if retry and call_again(err) and attempt + 1 < self.config.max_attempts:
                    endpoint.fail_over()
                    await asyncio.sleep(backoff(attempt, self.config, err.retry_after))
                    attempt += 1
                    continue
                raise err from exc

    async def _registry_call(self, method: str, request: Any, *, retry: bool = True) -> Any:
        return await self._call(self._registry, method, request, retry=retry)

    # -- the registry --------------------------------------------------------------------------

    async def join_node(
        self,
        host: str,
        port: int,
        *,
        ipv4: str = "",
        labels: dict[str, str] | None = None,
        load: Load | None = None,
        request_id: str | None = None,
        wait_for_revision: bool = False,
        keys: keyfiles.LocalKeys | None = None,
    ) -> Lease:
        """Joins a node (or re-joins it: same address, same id, a new lease).

        Retried safely: the request carries an id the server deduplicates. With ``keys`` (what
        :func:`muster.client.keyfiles.check` found) the registry has the node's key fingerprints
        checked — never the keys themselves — and a node whose keys differ, or whose key files
        cannot be used, is stored in its INVALID_* state and refused.

        Raises:
            NodeLimitReachedError: the cluster's node limit is reached (the node is stored as INVALID_LICENSE).
            InvalidSecureCookieKeyError, InvalidLauncherKeyError, InvalidKeyPermissionsError,
                LauncherKeyUnreadableError: refused for its keys (``metadata`` has the fingerprints,
                path, mode and ``fix``).
            InvalidArgumentError: a bad host, port, label or load.
        """
        req = pb.JoinNodeRequest(
            host=host,
            port=port,
            ipv4=ipv4,
            labels=labels or {},
            request_id=request_id or uuid.uuid4().hex,
            wait_for_revision=wait_for_revision,
        )
        if load is not None:
            req.load.CopyFrom(load.to_proto())
        if keys is not None:
            req.key_check.CopyFrom(_key_check(keys))
        resp = await self._registry_call("JoinNode", req)
        return Lease(
            Node.from_proto(resp.node),
            resp.heartbeat_interval.ToTimedelta(),
            resp.lease_ttl.ToTimedelta(),
            resp.revision,
        )

    async def heartbeat(self, lease: Lease, load: Load | None = None) -> Heartbeat:
        """Renews a node's lease (retried: renewing twice is harmless).

        Raises:
            StaleLeaseError: a newer join replaced this lease.
            LeaseExpiredError: the node is no longer ONLINE; join again.
        """
        req = pb.HeartbeatRequest(node_id=lease.node_id, lease_id=lease.lease_id)
        if load is not None:
            req.load.CopyFrom(load.to_proto())
        return _heartbeat(await self._registry_call("Heartbeat", req))

    def keep_alive(self, lease: Lease) -> KeepAlive:
        """A KeepAlive stream: many heartbeats on one call (see :class:`KeepAlive`).

        While several are open on one Cluster, their heartbeats share one stream and go out several
        per message (answered once per message, each heartbeat with its own error).
        """
        return KeepAlive(self, lease)

    def _shared_keep_alives(self) -> SharedKeepAlive:
        if self._shared_keep_alive is None:
            self._shared_keep_alive = SharedKeepAlive(self._registry_endpoint())
        return self._shared_keep_alive

    async def leave_node(self, lease: Lease, *, delete: bool = False, wait_for_revision: bool = False) -> int:
        """Stops a node cleanly: OFFLINE, or removed with ``delete``. Returns the revision if asked."""
        req = pb.LeaveNodeRequest(
            node_id=lease.node_id, lease_id=lease.lease_id, delete_node=delete, wait_for_revision=wait_for_revision
        )
        try:
            return int((await self._registry_call("LeaveNode", req)).revision)
        except NotFoundError:
            if delete:
                return 0  # a retried delete that had already happened
            raise

    async def get_node(self, node_id: int) -> Node:
        """One node. Raises NodeNotFoundError."""
        return Node.from_proto((await self._registry_call("GetNode", pb.GetNodeRequest(node_id=node_id))).node)

    async def list_nodes(self, *, page_size: int = 1000) -> NodeList:
        """Every node, ONLINE first, then by id (all pages), with the revision of the first page."""
        nodes: list[Node] = []
        token, revision = "", 0
        while True:
            resp = await self._registry_call("ListNodes", pb.ListNodesRequest(page_size=page_size, page_token=token))
            revision = revision or resp.revision
            nodes += [Node.from_proto(n) for n in resp.nodes]
            token = resp.next_page_token
            if not token:
                return NodeList(nodes, revision)

    async def delete_node(self, node_id: int, *, force: bool = False, wait_for_revision: bool = False) -> int:
        """Deletes a node (DELETING, then removed); returns the revision (see :meth:`delete_node_sessions`).

        Raises:
            NodeHasSessionsError: it is ONLINE with sessions and ``force`` is not set.
            NodeNotFoundError: no such node.
        """
        return (await self.delete_node_sessions(node_id, force=force, wait_for_revision=wait_for_revision))[0]

    async def delete_node_sessions(
        self, node_id: int, *, force: bool = False, wait_for_revision: bool = False
    ) -> tuple[int, int, int, int]:
        """Deletes a node; returns (revision, its sessions, how many moved to other nodes, how many ended).

        Its sessions are moved as a failover moves them (new ids and routes); those no other node
        can take are ended.

        Raises:
            NodeHasSessionsError: it is ONLINE with sessions and ``force`` is not set.
            NodeNotFoundError: no such node.
        """
        req = pb.DeleteNodeRequest(node_id=node_id, force=force, wait_for_revision=wait_for_revision)
        resp = await self._registry_call("DeleteNode", req, retry=False)
        return int(resp.revision), resp.sessions, resp.moved_sessions, resp.ended_sessions

    async def set_node_mode(self, node_id: int, mode: NodeMode, *, wait_for_revision: bool = False) -> Node:
        """Drains (DRAINING) or undrains (ACTIVE) a node; idempotent."""
        req = pb.SetNodeModeRequest(node_id=node_id, mode=mode.value, wait_for_revision=wait_for_revision)
        return Node.from_proto((await self._registry_call("SetNodeMode", req)).node)

    async def drain_node(self, node_id: int) -> Node:
        """Shorthand for ``set_node_mode(node_id, NodeMode.DRAINING)``."""
        return await self.set_node_mode(node_id, NodeMode.DRAINING)

    async def undrain_node(self, node_id: int) -> Node:
        """Shorthand for ``set_node_mode(node_id, NodeMode.ACTIVE)``."""
        return await self.set_node_mode(node_id, NodeMode.ACTIVE)

    async def reset_cluster(self) -> tuple[ClusterInfo, int]:
        """Removes every node and the cluster definition. Not retried. Returns the cluster and how many nodes went."""
        resp = await self._registry_call("ResetCluster", pb.ResetClusterRequest(wait_for_revision=True), retry=False)
        return ClusterInfo.from_proto(resp.cluster, resp.revision), resp.deleted_nodes

    async def get_cluster(self) -> ClusterInfo:
        """The cluster definition, its timing and its head revision."""
        resp = await self._registry_call("GetCluster", pb.GetClusterRequest())
        return ClusterInfo.from_proto(resp.cluster, resp.head_revision)

    async def get_node_status(self, node_id: int) -> NodeStatus:
        """One node's view: the node, the online nodes and its session count."""
        resp = await self._registry_call("GetNodeStatus", pb.GetNodeStatusRequest(node_id=node_id))
        return NodeStatus(
            Node.from_proto(resp.node),
            [Node.from_proto(n) for n in resp.online_nodes],
            resp.session_count,
            resp.revision,
        )

    async def list_node_loads(self, *, page_size: int = 1000) -> list[NodeLoad]:
        """Every node's latest load, by id (all pages)."""
        out: list[NodeLoad] = []
        token = ""
        while True:
            resp = await self._registry_call(
                "ListNodeLoads", pb.ListNodeLoadsRequest(page_size=page_size, page_token=token)
            )
            for x in resp.loads:
                out.append(
                    NodeLoad(
                        x.node_id,
                        NodeState(x.state),
                        NodeMode(x.mode),
                        _health(x.health),
                        Load.from_proto(x.load),
                        _ts(x.last_seen_time),
                    )
                )
            token = resp.next_page_token
            if not token:
                return out

    def watch(
        self,
        start_revision: int = 0,
        *,
        kinds: Sequence[str] = (),
        node_ids: Sequence[int] = (),
        progress: bool = False,
    ) -> Any:
        """The cluster's events after ``start_revision`` (0: a snapshot first), resuming by itself.

        See :class:`muster.client.Watch`.
        """
        from muster.client._watch import Watch

        return Watch(
            self, start_revision=start_revision, kinds=tuple(kinds), node_ids=tuple(node_ids), progress=progress
        )

    def view(self) -> Any:
        """A live local view of the cluster's nodes (see :class:`muster.client.ClusterView`)."""
        from muster.client._watch import ClusterView

        return ClusterView(self)

    def _registry_endpoint(self) -> Endpoint:
        return self._registry


def _heartbeat(resp: pb.HeartbeatResponse) -> Heartbeat:
    return Heartbeat(_ts(resp.lease_expire_time), _ts(resp.server_time), resp.heartbeat_interval.ToTimedelta())


def _ts(ts: Any) -> Any:
    from muster.client._models import _time

    return _time(ts)


def _health(value: int) -> Any:
    from muster.client._models import Health

    return Health(value)


class _Connecting:
    """What ``Cluster.connect()`` returns: awaitable, and an async context manager."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def __await__(self) -> Generator[Any, None, Cluster]:
        async def ready() -> Cluster:
            return self._cluster

        return ready().__await__()

    async def __aenter__(self) -> Cluster:
        return self._cluster

    async def __aexit__(self, *exc: object) -> None:
        await self._cluster.close()


class KeepAlive:
    """Heartbeats on one stream: ``await ka.beat(load)`` sends one and waits for its answer.

    The stream is opened on first use and re-opened (on another replica if need be) after a
    transport failure. A stale or expired lease raises StaleLeaseError / LeaseExpiredError. While
    more than one KeepAlive is open on the same Cluster, they share one stream and their heartbeats
    go several per message (see :mod:`muster.client._heartbeats`); a failing heartbeat fails only
    its own ``beat``.
    """

    def __init__(self, cluster: Cluster, lease: Lease) -> None:
        self._cluster = cluster
        self._lease = lease
        self._queue: asyncio.Queue[pb.KeepAliveRequest | None] | None = None
        self._call: Any = None
        self._closed = False
        cluster._keep_alives += 1

    async def _requests(self, queue: asyncio.Queue[pb.KeepAliveRequest | None]) -> AsyncIterator[pb.KeepAliveRequest]:
        while True:
            item = await queue.get()
            if item is None:
                return
            yield item

    async def beat(self, load: Load | None = None) -> Heartbeat:
        """Sends one heartbeat and returns its answer (after the server committed it)."""
        hb = pb.HeartbeatRequest(node_id=self._lease.node_id, lease_id=self._lease.lease_id)
        if load is not None:
            hb.load.CopyFrom(load.to_proto())
        cluster = self._cluster
        if cluster._keep_alives > 1 and cluster._batched_heartbeats:
            if self._call is not None:
                self._reset()  # this lease now rides the shared stream
            try:
                return await self._beat_shared(hb)
            except InvalidArgumentError as exc:
                if exc.field != "heartbeat.node_id":
                    raise
                # A server from before KeepAliveRequest.heartbeats read the message as an empty
                # heartbeat: from now on every lease beats on its own stream.
                cluster._batched_heartbeats = False
        return await self._beat_alone(hb)

    async def _beat_shared(self, hb: pb.HeartbeatRequest) -> Heartbeat:
        attempt = 0
        config = self._cluster.config
        while True:
            shared = self._cluster._shared_keep_alives()
            try:
                async with asyncio.timeout(config.deadline.total_seconds()):
                    return _heartbeat(await shared.submit(hb))
            except TimeoutError as exc:
                shared.reset()
                err: MusterError = from_rpc_error(_Deadline())
                cause: BaseException = exc
            except MusterError as exc:
                err, cause = exc, exc
            if call_again(err) and attempt + 1 < config.max_attempts:
                await asyncio.sleep(backoff(attempt, config, err.retry_after))
                attempt += 1
                continue
            if err is cause:
                raise err
            raise err from cause

    async def _beat_alone(self, hb: pb.HeartbeatRequest) -> Heartbeat:
        req = pb.KeepAliveRequest(heartbeat=hb)
        endpoint = self._cluster._registry_endpoint()
        attempt = 0
        while True:
            if self._call is None:
                self._queue = asyncio.Queue()
                self._call = endpoint.stub().KeepAlive(self._requests(self._queue))
            assert self._queue is not None
            try:
                await self._queue.put(req)
                async with asyncio.timeout(self._cluster.config.deadline.total_seconds()):
                    resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    raise from_rpc_error(await _status_error(self._call))
                return _heartbeat(resp.heartbeat)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                self._reset()
                if isinstance(exc, TimeoutError):
                    err: MusterError = from_rpc_error(_Deadline())
                else:
                    err = from_rpc_error(exc)
                if call_again(err) and attempt + 1 < self._cluster.config.max_attempts:
                    endpoint.fail_over()
                    await asyncio.sleep(backoff(attempt, self._cluster.config, err.retry_after))
                    attempt += 1
                    continue
                raise err from exc

    def _reset(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None
        self._queue = None

    async def close(self) -> None:
        """Ends the stream (this lease's share of the shared one: nothing to end there)."""
        if not self._closed:
            self._closed = True
            self._cluster._keep_alives -= 1
        if self._queue is not None:
            await self._queue.put(None)
        self._reset()


class _Deadline(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "no answer to the heartbeat within the deadline"

    def trailing_metadata(self) -> tuple[()]:
        return ()


async def _status_error(call: Any) -> grpc.RpcError:
    code = await call.code()

    class _Ended(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return "the keep-alive stream ended"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    return _Ended()


_ = Callable, Awaitable  # re-exported types for annotations


def _key_check(keys: keyfiles.LocalKeys) -> node_pb2.NodeKeyCheck:
    msg = node_pb2.NodeKeyCheck(
        secure_cookie_key_fingerprint=keys.cookie_fingerprint, launcher_key_fingerprint=keys.launcher_fingerprint
    )
    if keys.problems:
        p = keys.problems[0]
        msg.problem.CopyFrom(
            node_pb2.KeyFileProblem(
                state=node_pb2.Node.State.Value("STATE_" + p.reason),
                path=str(p.path),
                mode=p.mode or 0,
                message=p.message[:1024],
            )
        )
    return msg
