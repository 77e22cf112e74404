"""``muster routes``: the route map an edge balancer (HAProxy) sends each session's requests by.

A session id is ``<base>.<route>`` and a node's route is ``n<node id>`` (DESIGN.md, Balancer). The
map is an HAProxy map file, one ``<key> <address>`` entry per line, ``#`` lines are comments::

    n1 10.0.0.1:8787                  an ONLINE node's route -> its address
    n3 10.0.0.2:8787                  a node no longer ONLINE -> a live node (most of its sessions went there)
    8f3e….n3 10.0.0.2:8787            a moved session's old id -> the address of its node now
    @count 2                          how many nodes are ONLINE ...
    @0 10.0.0.1:8787                  ... and each one's address, for requests without a session id
    @1 10.0.0.2:8787

Addresses are ``ip:port`` (``[ip]:port`` for IPv6) because HAProxy's ``set-dst`` takes an IP: a
node that joined under a host name is written with the IPv4 address the registry found for it, else
with what the name resolves to here. The old ids are those the sessions' ``moved_from`` names; with
``--watch`` the command also remembers ids moved more than once and the routes of deleted nodes.
An old id that is not listed still carries its dead node's route, which leads to a live node whose
application asks ``RouteSession`` where the session went.

The client is imported inside the command, so that ``muster up`` never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import signal
import socket
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from muster.api.rules import ROUTE_EVENT_KINDS, node_of_route, route_of
from muster.cli._common import AddressOpt, address_or_default, fail, run

if TYPE_CHECKING:
    from muster.client import Cluster, Node
    from muster.client._balancer import Session

COUNT_KEY = "@count"
DEBOUNCE = 0.2  # a failover moves sessions in bursts: one regeneration per burst
RETRY = 5.0  # seconds between attempts to reach HAProxy (or the control plane) again while watching
HAPROXY_TIMEOUT = 10.0
PAYLOAD_BYTES = 8000  # an `add map` payload must fit HAProxy's CLI buffer (tune.bufsize, 16 kB by default)

HEADER = """\
# Muster session routes for HAProxy, written by `muster routes`: <key> <ip:port>
#   n<id>          the route of an ONLINE node -> its address; of a node no longer ONLINE -> a live node
#   <base>.n<id>   a moved session's old id -> the address of its node now
#   @count, @<i>   how many nodes are ONLINE, and the address of each (for requests without a session id)
"""


def _usable_key(key: str) -> bool:
    return bool(key) and not key.startswith(("#", "@")) and not any(c.isspace() for c in key)


@dataclass
class RouteMemory:
    """What ``--watch`` remembers between regenerations: ids moved (old -> current) and every route seen."""

    aliases: dict[str, str] = field(default_factory=dict)
    routes: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class RouteMap:
    """A generated map: node routes, moved sessions' old ids, and the ONLINE nodes' addresses."""

    routes: tuple[tuple[str, str], ...]
    moved: tuple[tuple[str, str], ...]
    pool: tuple[str, ...]
    remapped: int

    @property
    def count(self) -> int:
        """Route entries: node routes and old session ids (not the ``@`` pool)."""
        return len(self.routes) + len(self.moved)

    def entries(self) -> list[tuple[str, str]]:
        """Every ``(key, value)`` in file order."""
        pool = [(COUNT_KEY, str(len(self.pool)))] + [(f"@{i}", a) for i, a in enumerate(self.pool)]
        return [*self.routes, *self.moved, *pool]

    def summary(self) -> str:
        """``2 online, 1 remapped, 3 moved sessions``."""
        return f"{len(self.pool)} online, {self.remapped} remapped, {len(self.moved)} moved sessions"

    def render(self) -> str:
        """The map file's text."""
        body = "".join(f"{k} {v}\n" for k, v in self.entries())
        return f"{HEADER}# {self.summary()}\n{body}"


def format_address(host: str, port: int) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


async def node_addresses(nodes: Iterable[Node], memory: RouteMemory) -> dict[int, str]:
    """The ``ip:port`` of each ONLINE node (those that cannot be resolved are left out, with a warning)."""
    from muster.client import NodeState

    loop = asyncio.get_running_loop()
    out: dict[int, str] = {}
    for n in nodes:
        if n.state is not NodeState.ONLINE:
            continue
        host, port = n.host, n.port
        if not host or not port:
            h, _, p = n.address.rpartition(":")
            host, port = h.strip("[]"), int(p) if p.isdigit() else 0
        ip = _ip_literal(host) or _ip_literal(n.ipv4)
        if ip is None and host and port:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                ip = str(infos[0][4][0]) if infos else None
            except OSError:
                ip = None
        if ip is None or not port:
            note = f"node {n.id}'s address {n.address} cannot be resolved to an IP address; it is left out of the map"
            if note not in memory.warned:
                memory.warned.add(note)
                _warn(note)
            continue
        out[n.id] = format_address(ip, port)
    return out


def build_routes(
    nodes: Iterable[Node], sessions: Iterable[Session], addresses: dict[int, str], memory: RouteMemory
) -> RouteMap:
    """The map for these nodes and sessions.

    Args:
        nodes: every node the registry has (ONLINE or not).
        sessions: every session the balancer has.
        addresses: ``ip:port`` of each ONLINE node that can be routed to (see :func:`node_addresses`).
        memory: updated with the ids moved and the routes seen (a fresh one for a single run).
    """
    nodes = list(nodes)
    by_id = {s.id: s for s in sessions}
    online = sorted(addresses)
    for s in by_id.values():
        if s.moved_from and s.moved_from != s.id:
            memory.aliases[s.moved_from] = s.id
    # Old id -> the session under its current id (following ids moved more than once); aliases of
    # sessions that ended are forgotten.
    current: dict[str, Session] = {}
    for old in list(memory.aliases):
        target, hops = memory.aliases[old], 0
        while target not in by_id and target in memory.aliases and hops < 64:
            target, hops = memory.aliases[target], hops + 1
        if target in by_id and old not in by_id:
            memory.aliases[old] = target
            current[old] = by_id[target]
        else:
            del memory.aliases[old]
    memory.routes |= {route_of(n.id) for n in nodes} | {s.route for s in by_id.values()}
    memory.routes |= {r for r in (old.rpartition(".")[2] for old in current) if node_of_route(r) is not None}

    moved = tuple(
        sorted((old, addresses[s.node_id]) for old, s in current.items() if s.node_id in addresses and _usable_key(old))
    )
    # A dead route goes to the live node that took most of its sessions, else to one picked by its id.
    took: dict[str, Counter[int]] = {}
    for old, s in current.items():
        if s.node_id in addresses:
            took.setdefault(old.rpartition(".")[2], Counter())[s.node_id] += 1
    routes: list[tuple[int, str, str]] = []
    remapped = 0
    for route in memory.routes:
        node_id = node_of_route(route)
        if node_id is None:
            continue
        if node_id in addresses:
            routes.append((node_id, route, addresses[node_id]))
        elif online:
            counts = took.get(route)
            chosen = min(counts, key=lambda i: (-counts[i], i)) if counts else online[node_id % len(online)]
            routes.append((node_id, route, addresses[chosen]))
            remapped += 1
    routes.sort()
    return RouteMap(
        tuple((r, a) for _, r, a in routes),
        moved,
        tuple(addresses[i] for i in online),
        remapped,
    )


# -- writing the map ---------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` (a temporary file beside it, then a rename; the old mode is kept)."""
    path = path.expanduser()
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class HAProxyError(Exception):
    """HAProxy's runtime API could not be reached or refused a command."""


_SHOW_MAP = re.compile(r"^(-?\d+) \((.*)\) pattern loaded from file", re.MULTILINE)
_VERSION = re.compile(r"New version created: (\d+)")


class HAProxyRuntime:
    """Replaces a map's contents in a running HAProxy through its runtime API (the stats socket).

    The new contents are staged as a new version of the map (``prepare map``, ``add map @<ver>``)
    and swapped in at once (``commit map``), so no request sees a half-written map. Needs HAProxy
    2.4 or later and a socket with ``level admin``.

    Args:
        socket_path: the ``stats socket`` path.
        map_file: the map's file, as HAProxy loaded it.
    """

    def __init__(self, socket_path: Path, map_file: Path) -> None:
        self.socket_path = socket_path
        self.map_file = map_file

    async def command(self, line: str, payload: str | None = None) -> str:
        """Sends one command (with a ``<<`` payload if given) and returns HAProxy's answer."""
        data = line + (f" <<\n{payload}\n" if payload is not None else "\n")
        try:
            async with asyncio.timeout(HAPROXY_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                try:
                    writer.write(data.encode())
                    await writer.drain()
                    answer = await reader.read()
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except TimeoutError:
            raise HAProxyError(f"no answer from {self.socket_path} within {HAPROXY_TIMEOUT:g}s") from None
        except OSError as exc:
            raise HAProxyError(f"cannot connect to {self.socket_path}: {exc.strerror or exc}") from None
        return answer.decode(errors="replace")

    async def map_id(self) -> str:
        """``#<id>`` of the map HAProxy loaded from ``map_file``."""
        answer = await self.command("show map")
        if "Permission denied" in answer:
            raise HAProxyError(f"{self.socket_path} refuses map commands; give the stats socket `level admin`")
        return _loaded_map_id(answer, self.map_file)

    async def replace(self, entries: Sequence[tuple[str, str]]) -> None:
        """Makes the map's contents exactly ``entries`` in one atomic swap.

        Raises:
            HAProxyError: HAProxy is unreachable or refused a command (the map there is unchanged).
        """
        map_id = await self.map_id()
        answer = await self.command(f"prepare map {map_id}")
        found = _VERSION.search(answer)
        if found is None:
            raise HAProxyError(f"prepare map failed: {_first_line(answer)}")
        version = found.group(1)
        chunk: list[str] = []
        size = 0
        for key, value in entries:
            line = f"{key} {value}\n"
            if chunk and size + len(line) > PAYLOAD_BYTES:
                await self._add(version, map_id, chunk)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            await self._add(version, map_id, chunk)
        answer = await self.command(f"commit map @{version} {map_id}")
        if answer.strip():
            raise HAProxyError(f"commit map failed: {_first_line(answer)}")

    async def _add(self, version: str, map_id: str, lines: list[str]) -> None:
        answer = await self.command(f"add map @{version} {map_id}", "".join(lines))
        if answer.strip():
            raise HAProxyError(f"add map failed: {_first_line(answer)}")


def _loaded_map_id(show_map: str, map_file: Path) -> str:
    """``#<id>`` of the map loaded from ``map_file`` in a ``show map`` answer (the path as written
    in haproxy.cfg, or the same file)."""
    wanted = os.path.realpath(map_file)
    loaded = _SHOW_MAP.findall(show_map)
    for map_id, file in loaded:
        if file == str(map_file) or os.path.realpath(file) == wanted:
            return f"#{map_id}"
    files = ", ".join(sorted({f for _, f in loaded})) or "none"
    raise HAProxyError(f"HAProxy has no map loaded from {map_file} (its maps: {files})")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no answer")


def _warn(message: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"muster: {message}\n")
        sys.stderr.flush()


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# -- the command ---------------------------------------------------------------------------------------


class _Generator:
    """One regeneration: read the nodes and sessions, build the map, write it, push it to HAProxy."""

    def __init__(self, cluster: Cluster, map_file: Path | None, runtime: HAProxyRuntime | None) -> None:
        self.cluster = cluster
        self.map_file = map_file
        self.runtime = runtime
        self.memory = RouteMemory()
        self.pending: RouteMap | None = None  # a map HAProxy has not taken yet
        self.last_error = ""

    async def regenerate(self, *, strict: bool) -> None:
        """Writes (or prints) the map and pushes it; ``strict``: a refusal by HAProxy raises."""
        listing = await self.cluster.list_nodes()
        sessions = await self.cluster.list_sessions()
        addresses = await node_addresses(listing.nodes, self.memory)
        routes = build_routes(listing.nodes, sessions, addresses, self.memory)
        if self.map_file is None:
            _out(routes.render())
            return
        write_atomic(self.map_file, routes.render())
        line = f"muster routes: wrote {routes.count} routes to {self.map_file} ({routes.summary()}"
        if self.runtime is not None:
            self.pending = routes
            try:
                await self.runtime.replace(routes.entries())
            except HAProxyError as exc:
                if strict:
                    _out(line + ")\n")
                    raise
                _out(line + "; HAProxy not updated)\n")
                self._failed(exc)
                return
            self.pending, self.last_error = None, ""
            line += "; HAProxy updated"
        _out(line + ")\n")

    async def push_pending(self) -> None:
        """Tries again to give HAProxy the last map it did not take."""
        if self.runtime is None or self.pending is None:
            return
        try:
            await self.runtime.replace(self.pending.entries())
        except HAProxyError as exc:
            if str(exc) != self.last_error:
                self._failed(exc)
            return
        _out(f"muster routes: HAProxy at {self.runtime.socket_path} updated ({self.pending.count} routes)\n")
        self.pending, self.last_error = None, ""

    def _failed(self, exc: HAProxyError) -> None:
        assert self.runtime is not None
        self.last_error = str(exc)
        _warn(f"HAProxy at {self.runtime.socket_path} not updated ({exc}); trying again every {RETRY:g}s")


async def _once(address: str | None, map_file: Path | None, socket_path: Path | None) -> None:
    from muster.client import Cluster

    runtime = HAProxyRuntime(socket_path, map_file) if socket_path is not None and map_file is not None else None
    async with Cluster.connect(address_or_default(address)) as cluster:
        await _Generator(cluster, map_file, runtime).regenerate(strict=True)


async def _watch(address: str | None, map_file: Path | None, socket_path: Path | None) -> None:
    from muster.client import Cluster, Progress
    from muster.client.errors import MusterError

    runtime = HAProxyRuntime(socket_path, map_file) if socket_path is not None and map_file is not None else None

    async def follow() -> None:
        async with Cluster.connect(address_or_default(address)) as cluster:
            start = (await cluster.list_nodes()).revision
            gen = _Generator(cluster, map_file, runtime)
            await gen.regenerate(strict=False)  # an unreachable control plane fails here, at once
            dirty = asyncio.Event()

            async def read() -> None:
                seen = start
                async with cluster.watch(start, kinds=ROUTE_EVENT_KINDS) as events:
                    async for item in events:
                        if isinstance(item, Progress) or item.revision <= seen:
                            continue  # a snapshot of what the map already reflects
                        seen = item.revision
                        dirty.set()

            reader = asyncio.create_task(read(), name="muster-routes-watch")
            try:
                while True:
                    waiter = asyncio.create_task(dirty.wait())
                    timeout = RETRY if gen.pending is not None else None
                    done, _ = await asyncio.wait({reader, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    if reader in done:
                        reader.result()  # the stream ended with an error that is not worth resuming
                        return
                    if not dirty.is_set():
                        await gen.push_pending()
                        continue
                    await asyncio.sleep(DEBOUNCE)
                    dirty.clear()
                    try:
                        await gen.regenerate(strict=False)
                    except MusterError as exc:
                        if not exc.transient:  # the client's one table (muster.client.errors)
                            raise
                        _warn(f"the control plane is unreachable ({exc}); trying again in {RETRY:g}s")
                        await asyncio.sleep(RETRY)
                        dirty.set()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    follower = asyncio.create_task(follow())
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({follower, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower  # raises what ended it, unless it was the interrupt
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def routes(
    haproxy_map: Annotated[
        Path | None,
        typer.Option(
            "--haproxy-map",
            metavar="FILE",
            help="Write the map to FILE (atomically: a temporary file, then a rename) instead of stdout.",
        ),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Keep following the cluster's events and write the map again on each change."),
    ] = False,
    haproxy_socket: Annotated[
        Path | None,
        typer.Option(
            "--haproxy-socket",
            metavar="PATH",
            help="Also swap the new map into a running HAProxy through this runtime API socket "
            "(`stats socket PATH level admin`): no reload needed. Needs --haproxy-map.",
        ),
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Write the route map an edge balancer (HAProxy) sends each session's requests by.

    \b
    One `<key> <ip:port>` entry per line (lines starting with # are comments):
      n<id>          a node's route: ONLINE -> its address; no longer ONLINE -> a live
                     node's address (the node that took most of its sessions)
      <base>.n<id>   a moved session's old id -> the address of its node now
      @count, @<i>   how many nodes are ONLINE, and each one's address (requests without a session)
    A session id is <base>.<route>: look the whole id up first, then its route (after the last dot).
    deploy/haproxy/haproxy.cfg is a working HAProxy configuration that does so.

    \b
    With --haproxy-map, prints one line per map written:
      muster routes: wrote N routes to FILE (2 online, 1 remapped, 3 moved sessions; HAProxy updated)
    --watch runs until Ctrl+C or SIGTERM (exit code 0); if HAProxy cannot be reached it says so on
    stderr, keeps writing the file, and tries again every 5 seconds.
    """
    if haproxy_socket is not None and haproxy_map is None:
        raise fail("--haproxy-socket needs --haproxy-map (the map file HAProxy loads)", 2)
    try:
        if watch:
            run(_watch(address, haproxy_map, haproxy_socket))
        else:
            run(_once(address, haproxy_map, haproxy_socket))
    except HAProxyError as exc:
        raise fail(f"the map was written but HAProxy was not updated: {exc}") from None
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None
        raise fail(f"cannot write {haproxy_map}: {exc.strerror or exc}") from None


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``muster`` command."""
    app.command("routes")(routes)
