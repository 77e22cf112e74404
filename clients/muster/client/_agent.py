"""The node agent: joins this node, keeps its lease, reports its sessions and leaves cleanly.

::

    config = AgentConfig(addresses=("cp1:7400", "cp2:7400"), host_name="app1.example.com")
    async with Cluster.connect(config.addresses) as cluster, Agent(cluster, config) as agent:
        agent.session_started("s-1", pid=4242, user="ana")
        ...                                # the application's own work
    # leaving the block leaves the cluster: OFFLINE (or removed with delete_node_on_exit)

``muster agent`` runs the same class as a process; an application that is not asyncio (or not
Python) reports its sessions on the agent's unix socket instead (see :class:`Agent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from opentelemetry import trace

from muster.api.rules import KEY_EVENT_KINDS, SESSION_MOVED_KINDS
from muster.client import keyfiles
from muster.client._address import ResolvedAddress, resolve_node_address
from muster.client._cluster import Cluster
from muster.client._config import ClientConfig, default_address, split_addresses
from muster.client._keys import KeySync
from muster.client._models import Event, Lease, Load, Node, Resync
from muster.client._retry import backoff, wait_out
from muster.client._watch import ClusterView, NodeChange
from muster.client.errors import (
    KeysNotDefinedError,
    KeyVersionNotFoundError,
    LeaseExpiredError,
    MusterError,
    NodeNotFoundError,
    StaleLeaseError,
)

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("muster.agent")

NODE_FILE = "node.json"
AGENT_SOCKET = "agent.sock"
MAX_REQUEST_BYTES = 64 * 1024
_SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL
_BACKOFF_INITIAL = timedelta(milliseconds=100)


def default_state_dir() -> Path:
    """``MUSTER_STATE_DIR``, else /var/lib/muster/agent for root, else the user's state directory."""
    if os.environ.get("MUSTER_STATE_DIR"):
        return Path(os.environ["MUSTER_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/muster/agent")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "muster" / "agent"


def _default_addresses() -> tuple[str, ...]:
    return split_addresses(default_address())


@dataclass(frozen=True)
class AgentConfig:
    """What the agent needs to know about this node.

    Attributes:
        addresses: the control plane's replicas (``host:port``); a comma-separated string is split.
            Used when the agent opens its own :class:`Cluster` (default ``MUSTER_ADDRESS`` or
            127.0.0.1:7400).
        host_name: the node's address as the cluster should reach it; the first strategy of the
            reference order (see :func:`resolve_node_address`).
        listen_address: the address the application listens on; used when it is not a wildcard.
        port: the application's port (default 8787).
        labels: free-form labels stored with the node.
        state_dir: where ``node.json`` and ``agent.sock`` live (default ``MUSTER_STATE_DIR``, else
            /var/lib/muster/agent for root, else ``~/.local/state/muster/agent``).
        delete_node_on_exit: remove the node's row on a clean stop instead of leaving it OFFLINE
            (containers whose address changes on restart).
        leave_timeout: how long a clean stop may try to leave before giving up (the node then
            expires after its lease).
        serve_socket: serve ``<state_dir>/agent.sock`` (default True).
        report_sessions: report sessions started and ended to the balancer, and follow the sessions
            it moves onto this node (default True; a control plane without a balancer is noticed
            once and left alone).
        key_paths: the node's key files (secure cookie key, launcher private and public key); None:
            the agent does not manage keys. When set, the join carries their fingerprints (a node
            whose keys differ is refused), a node without them receives the cluster's, and key
            rotations are followed: new versions written beside the files and acknowledged, the
            files replaced on promotion, retired copies removed.
    """

    addresses: tuple[str, ...] = field(default_factory=_default_addresses)
    host_name: str | None = None
    listen_address: str | None = None
    port: int = 8787
    labels: Mapping[str, str] = field(default_factory=dict)
    state_dir: Path = field(default_factory=default_state_dir)
    delete_node_on_exit: bool = False
    leave_timeout: timedelta = timedelta(seconds=5)
    serve_socket: bool = True
    key_paths: keyfiles.KeyPaths | None = None
    report_sessions: bool = True

    def __post_init__(self) -> None:
        addresses: str | Sequence[str] = self.addresses
        object.__setattr__(self, "addresses", split_addresses(addresses))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        object.__setattr__(self, "labels", dict(self.labels))
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range; use 1 to 65535")
        for key, value in self.labels.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ValueError(f"label {key!r}={value!r} is not a non-empty string key with a string value")

    @property
    def node_file(self) -> Path:
        """``<state_dir>/node.json``."""
        return self.state_dir / NODE_FILE

    @property
    def socket_path(self) -> Path:
        """``<state_dir>/agent.sock``."""
        return self.state_dir / AGENT_SOCKET


@dataclass(frozen=True)
class _Session:
    pid: int | None
    user: str | None
    started: float


class Agent:
    """A node agent: resolves the node's address, joins, heartbeats, follows the cluster, leaves.

    ``await agent.run(stop)`` runs until ``stop`` is set (or :meth:`stop` is called), then leaves
    the cluster (OFFLINE, or removed with ``delete_node_on_exit``) and returns. ``async with
    Agent(...) as agent:`` does the same around a block, entering once the node has joined.

    While running, the agent:

    - heartbeats every ``heartbeat_interval`` the control plane names, on one KeepAlive stream,
      with the load averages, CPU count and session count;
    - rides through an unreachable control plane (or database) with jittered backoff, moving to
      another replica; it never gives up;
    - joins again from the same address (so with the same id) when its lease expired or its node
      was removed;
    - writes ``<state_dir>/node.json`` (``{"id", "address", "host", "port"}``, mode 0600);
    - keeps a live :class:`ClusterView` (:attr:`view`);
    - serves ``<state_dir>/agent.sock`` (mode 0600), one JSON request per line, one JSON reply per
      line: ``{"op": "session_started", "session": "s1", "pid": 12, "user": "u"}``,
      ``{"op": "session_ended", "session": "s1"}``, ``{"op": "set_session_count", "count": 3}``
      (each answered ``{"ok": true, "sessions": K}``) and ``{"op": "status"}`` (answered with
      :meth:`status`). A bad request is answered ``{"ok": false, "error": "..."}``.

    Session methods are called on the agent's event loop (other threads use the socket).

    Args:
        cluster: the connection to use; None opens one on ``config.addresses`` (closed at the end).
        config: the node's configuration.
        resolver: finds the node's address; called with ``port``, ``host_name`` and
            ``listen_address`` keywords (default :func:`resolve_node_address`).
    """

    def __init__(
        self,
        cluster: Cluster | None,
        config: AgentConfig,
        *,
        resolver: Callable[..., ResolvedAddress] = resolve_node_address,
    ) -> None:
        self.config = config
        self._cluster = cluster
        self._resolver = resolver
        self._stop = asyncio.Event()
        self._joined = asyncio.Event()
        self._lease: Lease | None = None
        self._resolved: ResolvedAddress | None = None
        self._sessions: dict[str, _Session] = {}
        self._count = 0
        self._phase = "starting"
        self._failing_since: float | None = None
        self._last_beat = 0.0
        self._view: ClusterView | None = None
        self._callbacks: list[Callable[[NodeChange], None]] = []
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._node_file: dict[str, Any] | None = None
        self._socket_inode: int | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self.rejoins = 0
        self._keys: KeySync | None = None
        self._reports: asyncio.Queue[tuple[str, str, int, str]] = asyncio.Queue()
        self._moved_callbacks: list[Callable[[Any], None]] = []
        self._balancer_missing = False

    # -- what the application sees -------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The current lease, None before the first join."""
        return self._lease

    @property
    def node_id(self) -> int | None:
        """The node's id, None before the first join."""
        return self._lease.node_id if self._lease else None

    @property
    def resolved(self) -> ResolvedAddress | None:
        """The node's address and the strategy that found it, None before it is resolved."""
        return self._resolved

    @property
    def view(self) -> ClusterView | None:
        """The live view of the cluster's nodes, None before the node joined."""
        return self._view

    @property
    def session_count(self) -> int:
        """The session count the next heartbeat reports."""
        return self._count

    @property
    def state(self) -> str:
        """``starting``, ``connected``, ``in_jeopardy`` (heartbeats failing, the lease may still
        hold), ``disconnected`` (failing for longer than the lease), ``stopping`` or ``stopped``."""
        if self._phase != "running":
            return self._phase
        if self._failing_since is None:
            return "connected"
        ttl = self._lease.lease_ttl.total_seconds() if self._lease else 0.0
        return "disconnected" if time.monotonic() - self._failing_since > ttl else "in_jeopardy"

    def on_change(self, callback: Callable[[NodeChange], None]) -> None:
        """Calls ``callback(change)`` for every node added, changed or removed in :attr:`view`
        (kept across restarts of the view)."""
        self._callbacks.append(callback)
        if self._view is not None:
            self._view.on_change(callback)

    def session_started(self, session_id: str, *, pid: int | None = None, user: str | None = None) -> None:
        """Counts a session that started (once per id; reported with the next heartbeat).

        Raises:
            ValueError: an empty session id, or a negative pid.
            TypeError: a value of the wrong type.
        """
        _check_session(session_id)
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
            raise TypeError("pid must be an integer")
        if pid is not None and pid < 0:
            raise ValueError("pid must not be negative")
        if user is not None and not isinstance(user, str):
            raise TypeError("user must be a string")
        if session_id not in self._sessions:
            self._count += 1
        self._sessions[session_id] = _Session(pid, user, time.time())
        self._report(("started", session_id, pid or 0, user or ""))

    def session_ended(self, session_id: str) -> None:
        """Uncounts a session that ended (an unknown id changes nothing)."""
        _check_session(session_id)
        if self._sessions.pop(session_id, None) is not None:
            self._count = max(0, self._count - 1)
            self._report(("ended", session_id, 0, ""))

    def on_session_moved(self, callback: Callable[[Any], None]) -> None:
        """Calls ``callback(event)`` when the balancer moves a session onto this node (its node failed):
        ``event.payload`` is a ``SessionMoved`` (``session`` under its new id, ``previous_id``,
        ``previous_node_id``). The session is counted here from then on; restoring its state is the
        application's business."""
        self._moved_callbacks.append(callback)

    def _report(self, item: tuple[str, str, int, str]) -> None:
        if self.config.report_sessions:
            self._reports.put_nowait(item)

    def set_session_count(self, count: int) -> None:
        """Sets the session count outright, for applications that count their sessions themselves.

        Later :meth:`session_started` / :meth:`session_ended` calls move it by one.

        Raises:
            ValueError: a negative count.
        """
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError("count must be an integer")
        if count < 0:
            raise ValueError("count must not be negative")
        self._count = count

    def status(self) -> dict[str, Any]:
        """What ``{"op": "status"}`` answers: the node, the session count, the view and the state."""
        view = self._view
        nodes = sorted(view.nodes.values(), key=lambda n: n.id) if view is not None else []
        return {
            "node_id": self.node_id,
            "address": self._lease.node.address if self._lease else None,
            "lease_id": self._lease.lease_id if self._lease else None,
            "sessions": self._count,
            "state": self.state,
            "via": self._cluster.registry_address if self._cluster is not None else None,
            "rejoins": self.rejoins,
            "view": [n.id for n in nodes],
            "view_state": view.state.value if view is not None else None,
            "view_revision": view.revision if view is not None else 0,
            "nodes": [_node_summary(n) for n in nodes],
            "keys": (
                {"active_version": self._keys.active_version, "action": self._keys.action}
                if self._keys is not None
                else None
            ),
        }

    async def wait_joined(self) -> Lease:
        """Waits until the node has joined; returns its lease."""
        await self._joined.wait()
        assert self._lease is not None
        return self._lease

    def stop(self) -> None:
        """Asks :meth:`run` to leave the cluster and return."""
        self._stop.set()

    # -- the context manager -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        self._task = asyncio.create_task(self.run(), name="muster-agent")
        joined = asyncio.create_task(self._joined.wait())
        try:
            await asyncio.wait({joined, self._task}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            joined.cancel()
            self._task.cancel()
            raise
        joined.cancel()
        if self._task.done():
            self._task.result()  # raises what stopped it before it joined
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task

    # -- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Runs the agent until ``stop`` is set or :meth:`stop` is called, then leaves and returns.

        Args:
            stop: an event the caller sets to stop the agent (optional; :meth:`stop` works too).

        Raises:
            AddressNotFoundError: no strategy found the node's address; set ``host_name``.
            NodeLimitReachedError: the cluster's node limit is reached.
            StaleLeaseError: another agent joined as this node (same address); this one stops
                rather than take turns with it.
            InvalidArgumentError: the control plane refused the node's address, port or labels.
            RuntimeError: another agent serves this state directory's socket, or the socket path
                is too long.

        Cancelling the task that runs it stops the agent without leaving (the node then expires
        after its lease); set ``stop`` to leave cleanly.
        """
        if self._running:
            raise RuntimeError("the agent is already running")
        self._running = True
        own = self._cluster is None
        if self._cluster is None:
            self._cluster = Cluster(ClientConfig(addresses=self.config.addresses))
        cluster = self._cluster
        relay = asyncio.create_task(self._relay_stop(stop)) if stop is not None else None
        server: asyncio.AbstractServer | None = None
        try:
            self._resolved = await asyncio.to_thread(
                self._resolver,
                port=self.config.port,
                host_name=self.config.host_name,
                listen_address=self.config.listen_address,
            )
            self._prepare_state_dir()
            if self.config.serve_socket:
                server = await self._serve_socket()
            main = asyncio.create_task(self._main(cluster), name="muster-agent-main")
            stopping = asyncio.create_task(self._stop.wait())
            try:
                await asyncio.wait({main, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not main.done():
                    main.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await main
                    _raise_if_cancelling()
            if not main.cancelled() and main.exception() is not None:
                main.result()
            self._phase = "stopping"
            await self._leave(cluster)
        finally:
            self._phase = "stopped"
            if relay is not None:
                relay.cancel()
            if server is not None:
                server.close()
                self._remove_socket()
                for writer in list(self._clients):
                    writer.close()
            if own:
                await cluster.close()
            self._running = False

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._stop.set()

    async def _main(self, cluster: Cluster) -> None:
        await self._join(cluster)
        # Heartbeats start at once; the keys are synced alongside (fetching may take a moment).
        lease = asyncio.create_task(self._keep_lease(cluster), name="muster-agent-lease")
        viewer = asyncio.create_task(self._follow_view(cluster), name="muster-agent-view")
        watched = {lease}
        if self.config.key_paths is not None:
            watched.add(asyncio.create_task(self._manage_keys(cluster), name="muster-agent-keys"))
        if self.config.report_sessions:
            watched.add(asyncio.create_task(self._manage_sessions(cluster), name="muster-agent-sessions"))
        try:
            # These end only by failing (a refusal, a replaced agent).
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in (*watched, viewer):
                t.cancel()
            for t in (*watched, viewer):
                with contextlib.suppress(asyncio.CancelledError):
                    await t

    # -- sessions ------------------------------------------------------------------------------

    async def _manage_sessions(self, cluster: Cluster) -> None:
        """Reports sessions to the balancer in order, and takes in the sessions moved onto this node."""
        follower = asyncio.create_task(self._follow_moves(cluster), name="muster-agent-moves")
        try:
            while True:
                item = await self._reports.get()
                await self._send_report(cluster, item)
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _send_report(self, cluster: Cluster, item: tuple[str, str, int, str]) -> None:
        what, session_id, pid, user = item
        attempt = 0
        while not self._balancer_missing:
            lease = self._lease
            assert lease is not None
            try:
                if what == "started":
                    await cluster.report_session_started(lease.node_id, session_id, pid=pid, user=user)
                else:
                    await cluster.report_session_ended(lease.node_id, session_id)
                return
            except MusterError as exc:
                if wait_out(exc):
                    self._failing(exc)
                    await asyncio.sleep(self._backoff(attempt, exc))
                    attempt += 1
                    continue
                if exc.code.name == "UNIMPLEMENTED":
                    self._balancer_missing = True
                    log.info(
                        "no balancer answers; sessions are counted in heartbeats only",
                        extra={"event": "agent_sessions"},
                    )
                    return
                log.warning("session %s not reported: %s", session_id, exc, extra={"event": "agent_sessions"})
                return

    async def _follow_moves(self, cluster: Cluster) -> None:
        lease = self._lease
        assert lease is not None
        start = await self._head_revision(cluster)
        async with cluster.watch(start, kinds=SESSION_MOVED_KINDS, node_ids=[lease.node_id]) as stream:
            async for item in stream:
                if not isinstance(item, Event) or item.payload is None:
                    continue
                moved = item.payload
                session_id = moved.session.id  # type: ignore[attr-defined]
                if session_id not in self._sessions:
                    self._sessions[session_id] = _Session(moved.session.pid or None, moved.session.user, time.time())  # type: ignore[attr-defined]
                    self._count += 1
                log.info(
                    "session %s moved here from node %s as %s",
                    moved.previous_id,  # type: ignore[attr-defined]
                    moved.previous_node_id,  # type: ignore[attr-defined]
                    session_id,
                    extra={"event": "agent_session_moved", "session": session_id},
                )
                for callback in self._moved_callbacks:
                    callback(item)

    # -- keys ----------------------------------------------------------------------------------

    async def _head_revision(self, cluster: Cluster) -> int:
        attempt = 0
        while True:
            try:
                return (await cluster.get_cluster()).head_revision
            except MusterError as exc:
                if not wait_out(exc):
                    raise
                self._failing(exc)
                await asyncio.sleep(self._backoff(attempt, exc))
                attempt += 1

    async def _sync_keys(self, cluster: Cluster) -> KeySync:
        """Brings the key files in line with the cluster's versions, riding out an unreachable control
        plane. A refusal (the files differ, or cannot be used) is recorded on the node by joining
        again with the key check, and stops the agent."""
        paths, lease = self.config.key_paths, self._lease
        assert paths is not None and lease is not None
        attempt = 0
        while True:
            try:
                done = await cluster.sync_keys(lease.node_id, paths)
            except (KeyVersionNotFoundError, KeysNotDefinedError) as exc:
                # A version retired or the keys reset while we looked: look again.
                log.info("keys changed while syncing (%s); syncing again", exc.reason, extra={"event": "agent_keys"})
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
                continue
            except MusterError as exc:
                if wait_out(exc):
                    self._failing(exc)
                    await asyncio.sleep(self._backoff(attempt, exc))
                    attempt += 1
                    continue
                log.error("the node's keys are refused: %s", exc, extra={"event": "agent_failed"})
                with contextlib.suppress(MusterError):
                    await self._join(cluster, refused=True)  # records the refusal on the node
                raise
            break
        first, self._keys = self._keys is None, done
        if done.changed or first:
            log.info(
                "keys %s: active version %s%s%s%s",
                done.action,
                done.active_version,
                f", installed {', '.join(map(str, done.installed))}" if done.installed else "",
                f", promoted {done.promoted}" if done.promoted else "",
                f", retired {', '.join(map(str, done.retired))}" if done.retired else "",
                extra={"event": "agent_keys", "node": lease.node_id, "version": done.active_version},
            )
        return done

    async def _manage_keys(self, cluster: Cluster) -> None:
        """Syncs the key files now, then on every key event and after a resync (history compacted away)."""
        start_revision = await self._head_revision(cluster)  # before the sync: no event falls in between
        await self._sync_keys(cluster)
        async with cluster.watch(start_revision, kinds=KEY_EVENT_KINDS) as stream:
            async for item in stream:
                if isinstance(item, Event | Resync):
                    await self._sync_keys(cluster)

    async def _join(self, cluster: Cluster, cause: MusterError | None = None, *, refused: bool = False) -> Lease:
        resolved = self._resolved
        assert resolved is not None
        request_id = uuid.uuid4().hex  # one per join, so that our own retries do not act twice
        attempt = 0
        while True:
            paths = self.config.key_paths
            local = await asyncio.to_thread(keyfiles.check, paths) if paths is not None else None
            try:
                with _TRACER.start_as_current_span("muster.agent.join", attributes={"muster.address": resolved.host}):
                    lease = await cluster.join_node(
                        resolved.host,
                        resolved.port,
                        ipv4=resolved.ipv4,
                        labels=dict(self.config.labels),
                        load=self._load(),
                        request_id=request_id,
                        keys=local,
                    )
            except MusterError as exc:
                if wait_out(exc):
                    self._failing(exc)
                    await asyncio.sleep(self._backoff(attempt, exc))
                    attempt += 1
                    continue
                if not refused:
                    log.error("the control plane refused the node: %s", exc, extra={"event": "agent_failed"})
                raise
            break
        if refused:
            return lease  # the key check passed this time (a reset); the caller stops anyway
        previous, self._lease = self._lease, lease
        self._recovered()
        self._phase = "running"
        self._write_node_file(lease)
        if previous is None:
            log.info(
                "node %s joined as %s (found by %s) via %s",
                lease.node_id,
                lease.node.address,
                resolved.strategy.replace("-", " "),
                cluster.registry_address,
                extra={"event": "agent_joined", "node": lease.node_id},
            )
        else:
            self.rejoins += 1
            if isinstance(cause, NodeNotFoundError):
                why = f"node {previous.node_id} was removed from the cluster"
            elif isinstance(cause, StaleLeaseError):
                why = f"node {previous.node_id} is gone (the control plane was reset)"
            elif cause is not None and cause.metadata.get("state_reason", "LEASE_EXPIRED") != "LEASE_EXPIRED":
                why = f"node {previous.node_id} was {cause.metadata.get('state')} ({cause.metadata['state_reason']})"
            else:
                why = "lease expired"
            log.info(
                "%s; joined again as node %s",
                why,
                lease.node_id,
                extra={"event": "agent_rejoined", "node": lease.node_id},
            )
        self._joined.set()
        return lease

    async def _keep_lease(self, cluster: Cluster) -> None:
        assert self._lease is not None
        keep_alive = cluster.keep_alive(self._lease)
        attempt = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    beat = await keep_alive.beat(self._load())
                except (LeaseExpiredError, NodeNotFoundError) as exc:
                    await keep_alive.close()
                    cause: MusterError = exc
                    if exc.metadata.get("state") == "DELETING":
                        cause = await self._deleted(cluster, exc)
                    await self._join(cluster, cause)
                    keep_alive = cluster.keep_alive(self._lease)
                    continue
                except StaleLeaseError as exc:
                    await keep_alive.close()
                    if await self._replaced(cluster):
                        raise self._stale(exc) from exc
                    await self._join(cluster, exc)
                    keep_alive = cluster.keep_alive(self._lease)
                    continue
                except MusterError as exc:
                    if not wait_out(exc):
                        log.error("heartbeats are refused: %s", exc, extra={"event": "agent_failed"})
                        raise
                    self._failing(exc)
                    await asyncio.sleep(self._backoff(attempt, exc))
                    attempt += 1
                    continue
                attempt = 0
                self._last_beat = time.monotonic()
                self._recovered()
                interval = (beat.heartbeat_interval or self._lease.heartbeat_interval).total_seconds()
                await asyncio.sleep(max(0.0, started + interval - time.monotonic()))
        finally:
            await keep_alive.close()

    async def _deleted(self, cluster: Cluster, cause: MusterError) -> MusterError:
        """Waits for an operator's deletion (DELETING, then removed) to finish before joining again:
        joining in between would bring the row back under its old id and undo the deletion."""
        assert self._lease is not None
        attempt = 0
        while True:
            try:
                node = await cluster.get_node(self._lease.node_id)
            except NodeNotFoundError as exc:
                return exc
            except MusterError as exc:
                if not wait_out(exc):
                    raise
                self._failing(exc)
                hint = exc.retry_after
            else:
                if node.state.name != "DELETING" or node.address != self._lease.node.address:
                    return cause
                hint = None
            await asyncio.sleep(self._backoff(attempt, hint=hint))
            attempt += 1

    async def _replaced(self, cluster: Cluster) -> bool:
        """After STALE_LEASE: does another agent hold this node (rather than a reset control plane
        having given the id to another address)?"""
        assert self._lease is not None
        attempt = 0
        while True:
            try:
                node = await cluster.get_node(self._lease.node_id)
            except NodeNotFoundError:
                return False
            except MusterError as exc:
                if not wait_out(exc):
                    raise
                self._failing(exc)
                await asyncio.sleep(self._backoff(attempt, exc))
                attempt += 1
                continue
            return node.address == self._lease.node.address

    def _stale(self, exc: StaleLeaseError) -> StaleLeaseError:
        assert self._lease is not None
        message = (
            f"another agent joined as node {self._lease.node_id} ({self._lease.node.address}) and holds its "
            "lease; this agent stops instead of taking turns with it. Stop the other agent, or give this "
            "one its own address (--host-name, --port)"
        )
        log.error("%s", message, extra={"event": "agent_failed", "node": self._lease.node_id})
        return StaleLeaseError(message, code=exc.code, reason=exc.reason, metadata=exc.metadata)

    async def _follow_view(self, cluster: Cluster) -> None:
        attempt = 0
        while True:
            view = cluster.view()
            for callback in self._callbacks:
                view.on_change(callback)
            self._view = view
            try:
                await view.start()
                attempt = 0
                assert view._task is not None
                await view._task
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("the cluster view stopped (%s); following again", exc, extra={"event": "agent_view"})
            finally:
                await view.stop()
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    async def _leave(self, cluster: Cluster) -> None:
        lease = self._lease
        if lease is None:
            log.info("stopped before the node joined", extra={"event": "agent_left"})
            return
        delete = self.config.delete_node_on_exit
        try:
            async with asyncio.timeout(self.config.leave_timeout.total_seconds()):
                await cluster.leave_node(lease, delete=delete)
        except StaleLeaseError:
            log.warning(
                "node %s is held by another agent; left it as it is",
                lease.node_id,
                extra={"event": "agent_left", "node": lease.node_id},
            )
            return
        except NodeNotFoundError:
            log.info("node %s was already removed", lease.node_id, extra={"event": "agent_left"})
        except (TimeoutError, MusterError) as exc:
            log.warning(
                "node %s could not leave (%s); it goes OFFLINE when its lease expires",
                lease.node_id,
                exc or "no answer",
                extra={"event": "agent_left", "node": lease.node_id},
            )
            return
        else:
            log.info(
                "node %s left (%s)",
                lease.node_id,
                "deleted" if delete else "OFFLINE",
                extra={"event": "agent_left", "node": lease.node_id},
            )
        if delete:
            with contextlib.suppress(FileNotFoundError):
                self.config.node_file.unlink()

    # -- health of the connection --------------------------------------------------------------

    def _failing(self, exc: MusterError) -> None:
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "the control plane does not answer (%s: %s); retrying",
                type(exc).__name__,
                exc,
                extra={"event": "agent_unreachable"},
            )

    def _recovered(self) -> None:
        if self._failing_since is not None:
            down = time.monotonic() - self._failing_since
            self._failing_since = None
            if self._lease is not None and self._phase == "running":
                log.info(
                    "the control plane answers again after %.1fs (node %s, via %s)",
                    down,
                    self._lease.node_id,
                    self._cluster.registry_address if self._cluster else "?",
                    extra={"event": "agent_reconnected"},
                )

    def _backoff(self, attempt: int, exc: MusterError | None = None, *, hint: timedelta | None = None) -> float:
        """The client's one backoff, capped at the heartbeat interval (at least 1 s), honouring the
        retry delay the server sent with ``exc``."""
        interval = self._lease.heartbeat_interval if self._lease else timedelta(seconds=1)
        if exc is not None:
            hint = exc.retry_after
        return backoff(attempt, initial=_BACKOFF_INITIAL, maximum=max(timedelta(seconds=1), interval), hint=hint)

    def _load(self) -> Load:
        try:
            load1, load5, load15 = os.getloadavg()
        except OSError:
            load1 = load5 = load15 = 0.0
        return Load(load1, load5, load15, os.cpu_count() or 0, self._count)

    # -- the state directory -------------------------------------------------------------------

    def _prepare_state_dir(self) -> None:
        self.config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _write_node_file(self, lease: Lease) -> None:
        data = {"id": lease.node_id, "address": lease.node.address, "host": lease.node.host, "port": lease.node.port}
        if data == self._node_file:
            return
        _write_atomically(self.config.node_file, json.dumps(data) + "\n")
        self._node_file = data

    async def _serve_socket(self) -> asyncio.AbstractServer:
        path = self.config.socket_path
        if len(os.fsencode(path)) > _SOCKET_PATH_MAX:
            raise RuntimeError(
                f"the socket path {path} is longer than {_SOCKET_PATH_MAX} bytes; use a shorter state directory"
            )
        if path.exists() or path.is_symlink():
            if await _answers(path):
                raise RuntimeError(
                    f"another agent serves {path}; stop it, or give this one another state directory (--state-dir)"
                )
            path.unlink()
        # Bound under a private name and made 0600 before it appears under its real name.
        tmp = path.with_name(f".sock.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(tmp))
            os.chmod(tmp, 0o600)
            os.rename(tmp, path)
            self._socket_inode = path.stat().st_ino
            sock.listen(64)
            sock.setblocking(False)
            return await asyncio.start_unix_server(self._serve_client, sock=sock, limit=MAX_REQUEST_BYTES)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    def _remove_socket(self) -> None:
        path = self.config.socket_path
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == self._socket_inode:
                path.unlink()

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    writer.write(_reply_line(_error(f"a request line is at most {MAX_REQUEST_BYTES} bytes")))
                    await writer.drain()
                    return
                if not line:
                    return
                if not line.strip():
                    continue
                writer.write(_reply_line(self.handle_request(line)))
                await writer.drain()
        except asyncio.CancelledError:
            raise
        except OSError:
            return  # the application went away
        except Exception:
            log.exception("agent socket request failed", extra={"event": "agent_socket"})
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def handle_request(self, line: bytes | str) -> dict[str, Any]:
        """Answers one socket request (a JSON object with ``op``); never raises for bad input."""
        try:
            request = json.loads(line)
        except ValueError as exc:
            return _error(f"the request is not JSON: {exc}")
        if not isinstance(request, dict):
            return _error('a request is a JSON object with an "op"')
        # Values are checked by the methods (TypeError/ValueError become the error reply).
        fields: Any = request
        op = fields.get("op")
        try:
            if op == "session_started":
                self.session_started(fields.get("session"), pid=fields.get("pid"), user=fields.get("user"))
            elif op == "session_ended":
                self.session_ended(fields.get("session"))
            elif op == "set_session_count":
                self.set_session_count(fields.get("count"))
            elif op == "status":
                return {"ok": True, **self.status()}
            else:
                return _error(f"unknown op {op!r}; use session_started, session_ended, set_session_count or status")
        except (TypeError, ValueError) as exc:
            return _error(str(exc))
        return {"ok": True, "sessions": self._count}


def _check_session(session_id: object) -> None:
    if not isinstance(session_id, str):
        raise TypeError('"session" must be a string naming the session')
    if not session_id or len(session_id) > 1024:
        raise ValueError('"session" must be 1 to 1024 characters')


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _reply_line(reply: dict[str, Any]) -> bytes:
    return (json.dumps(reply, default=str) + "\n").encode()


def _node_summary(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "address": node.address,
        "state": node.state.name,
        "mode": node.mode.name,
        "health": node.health.name,
        "lease_id": node.lease_id,
    }


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _answers(path: Path) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(path)), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


def _write_atomically(path: Path, text: str) -> None:
    """Writes a file whole or not at all: a 0600 temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
