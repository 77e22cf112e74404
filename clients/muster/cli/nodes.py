"""Operator commands on nodes: list-nodes, delete-node, node-status, reset-cluster, offline, online, watch.

Each command is a thin layer over :mod:`muster.client`: one or two calls, then output. Tables are for
people (rich, box-less, no colour when stdout is not a terminal, one row per line so they can be read
by column); ``--json`` is for scripts. A client error becomes ``muster: <one line>`` on stderr and exit
code 1 (see :func:`muster.cli._common.run`); a closed stdout (``muster watch | head``) ends a command
quietly.

The client is imported inside the commands, so that ``muster up`` never pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import os
import shutil
import signal
import sys
from collections.abc import Callable, Coroutine, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from muster.cli._common import (
    NODE_FILE,
    AddressOpt,
    JsonOpt,
    StateDirOpt,
    address_or_default,
    default_state_dir,
    fail,
    print_json,
    read_node_file,
    run,
)

if TYPE_CHECKING:
    from rich.table import Table

    from muster.client import Cluster, Event, Node, NodeMode, Progress, Resync
    from muster.client._address import ResolvedAddress
    from muster.client._cluster import _Connecting

NodeIdArg = Annotated[int, typer.Argument(help="The node's id (see `muster list-nodes`).", show_default=False)]
ThisNodeArg = Annotated[
    int | None,
    typer.Argument(
        help="The node's id. Default: this node, from the agent's node.json in --state-dir, else the node "
        "with this host's address (found the agent's way: MUSTER_HOST_NAME, MUSTER_LISTEN_ADDRESS, "
        "MUSTER_PORT, default port 8787).",
        show_default=False,
    ),
]

T = TypeVar("T")

DEFAULT_NODE_PORT = 8787

# Colours for a terminal only; rich writes none when stdout is not one (or NO_COLOR is set).
_STATUS_STYLE = {"ONLINE": "green", "MISSED_CHECK_IN": "yellow", "OFFLINE": "dim", "DELETING": "dim"}


# -- formatting (pure; tests/unit/test_cli_format.py) ------------------------------------------------


def status_text(status: str) -> str:
    """A status as people read it: ``MISSED_CHECK_IN`` → "Missed check-in", ``INVALID_LICENSE`` → "Invalid license"."""
    if status == "MISSED_CHECK_IN":
        return "Missed check-in"
    return status.replace("_", " ").capitalize()


def mode_text(mode: NodeMode) -> str:
    """``ACTIVE`` → "Active", ``DRAINING`` → "Draining"."""
    return mode.name.capitalize()


def local_time(when: datetime | None) -> str:
    """A UTC time in this machine's time zone, to the second; "-" for none."""
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when is not None else "-"


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def health_name(node: Node) -> str:
    """``MISSED_CHECK_IN`` for an ONLINE node that missed its check-in, else ``OK``.

    Health is only judged for ONLINE nodes; for the others ``status`` says what is wrong, and
    ``health`` is ``OK`` so that ``health == "MISSED_CHECK_IN"`` holds exactly when the table shows
    "Missed check-in".
    """
    return "MISSED_CHECK_IN" if node.status == "MISSED_CHECK_IN" else "OK"


def node_json(node: Node) -> dict[str, Any]:
    """A node as ``--json`` prints it.

    ``status`` is the stored state (``ONLINE``, ``OFFLINE``, ``INVALID_LICENSE``, …), ``health``
    ``OK`` or ``MISSED_CHECK_IN``, ``mode`` ``ACTIVE`` or ``DRAINING``, ``last_seen`` ISO-8601 in
    UTC (null if never), ``reason`` why it is in its state (``LEFT``, ``LEASE_EXPIRED``; "" if none);
    for a refused node, ``message`` says what is wrong and ``details`` holds ``node_fingerprint``,
    ``cluster_fingerprint``, ``path``, ``mode`` and ``fix`` (whichever apply).
    """
    return {
        "id": node.id,
        "address": node.address,
        "host": node.host,
        "ipv4": node.ipv4,
        "port": node.port,
        "status": node.state.name,
        "health": health_name(node),
        "mode": node.mode.name,
        "reason": node.state_reason,
        "last_seen": _iso(node.last_seen_time),
        "load": {
            "load1": node.load.load1,
            "load5": node.load.load5,
            "load15": node.load.load15,
            "cpu_count": node.load.cpu_count,
        },
        "sessions": node.sessions,
        "placed_sessions": node.placed_sessions,
        "reported_sessions": node.load.session_count,
        "message": node.state_message,
        "details": dict(node.state_details),
    }


NODE_COLUMNS = ("ID", "Host", "IPv4", "Port", "Status", "Mode", "Last seen", "Sessions")


def node_row(node: Node) -> tuple[str, ...]:
    """One table row (empty values as "-", so that every cell has text)."""
    return (
        str(node.id),
        node.host or "-",
        node.ipv4 or "-",
        str(node.port),
        status_text(node.status),
        mode_text(node.mode),
        local_time(node.last_seen_time),
        str(node.sessions),
    )


def nodes_table(nodes: Iterable[Node]) -> Table:
    """The nodes as a box-less rich table, columns :data:`NODE_COLUMNS`, left-aligned."""
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in NODE_COLUMNS:
        table.add_column(name, overflow="fold")  # a narrow terminal wraps cells, never cuts them
    for node in nodes:
        cells = list(node_row(node))
        status = Text(cells[4], style=_STATUS_STYLE.get(node.status, "red"))
        table.add_row(*cells[:4], status, *cells[5:])
    return table


def render(renderable: Any, *, terminal: bool | None = None) -> str:
    """Renders for stdout: a terminal gets its width and colours; a pipe gets plain lines, never wrapped."""
    from rich.console import Console

    tty = sys.stdout.isatty() if terminal is None else terminal
    buf = io.StringIO()
    width = shutil.get_terminal_size().columns if tty else 100_000
    Console(file=buf, force_terminal=tty, width=width, highlight=False).print(renderable)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def event_json(item: Resync | Event | Progress) -> dict[str, Any]:
    """One ``muster watch --json`` line: ``{"type": "event" | "resync" | "progress", "revision": N, ...}``.

    An event adds ``time``, ``kind`` (``NodeJoined``), ``node_id`` (null if none) and what its payload
    says: the node's resulting ``status``/``health``/``mode`` and the whole ``node`` when it carries
    one, ``previous_status`` (NodeStateChanged), ``mode`` (NodeModeChanged), ``address``
    (NodeDeleted), ``epoch`` (ClusterReset), ``outage_seconds``/``credited_seconds``
    (OutageCredited). A resync adds ``epoch``, ``active_key_version`` and ``nodes``; a progress mark
    ``through_revision`` and ``head_revision`` (its ``revision`` is ``through_revision``).
    """
    from muster.client import NodeMode, NodeState, Progress, Resync

    if isinstance(item, Resync):
        return {
            "type": "resync",
            "revision": item.revision,
            "epoch": item.cluster_epoch,
            "active_key_version": item.active_key_version,
            "nodes": [node_json(n) for n in item.nodes],
        }
    if isinstance(item, Progress):
        return {
            "type": "progress",
            "revision": item.through_revision,
            "through_revision": item.through_revision,
            "head_revision": item.head_revision,
        }
    out: dict[str, Any] = {
        "type": "event",
        "revision": item.revision,
        "time": _iso(item.time),
        "kind": item.kind,
        "node_id": item.node_id or None,
    }
    if item.node is not None:
        out.update(status=item.node.state.name, health=health_name(item.node), mode=item.node.mode.name)
        out["node"] = node_json(item.node)
    payload: Any = item.payload
    if item.kind == "NodeStateChanged" and payload is not None:
        with contextlib.suppress(ValueError):
            out["previous_status"] = NodeState(payload.previous_state).name
    elif item.kind == "NodeModeChanged" and payload is not None:
        with contextlib.suppress(ValueError):
            out["mode"] = NodeMode(payload.mode).name
    elif item.kind == "NodeDeleted" and payload is not None:
        out["address"] = payload.address
    elif item.kind == "ClusterReset" and payload is not None:
        out["epoch"] = payload.cluster.epoch
    elif item.kind == "OutageCredited" and payload is not None:
        out["outage_seconds"] = payload.outage.ToTimedelta().total_seconds()
        out["credited_seconds"] = payload.credited.ToTimedelta().total_seconds()
    return out


def event_line(item: Resync | Event | Progress) -> str:
    """One ``muster watch`` line, e.g. ``rev 12  NodeJoined        node 3  10.0.0.5:8787  Online  Active``."""
    data = event_json(item)
    if data["type"] == "resync":
        n = len(data["nodes"])
        what, rest = "Resync", f"{n} node{'s' if n != 1 else ''}, epoch {data['epoch']}"
    elif data["type"] == "progress":
        what, rest = "Progress", f"through {data['through_revision']}, head {data['head_revision']}"
    else:
        what = data["kind"]
        parts = [f"node {data['node_id']}"] if data["node_id"] else []
        node = data.get("node")
        if node is not None:
            parts.append(node["address"])
            status = status_text("MISSED_CHECK_IN" if node["health"] == "MISSED_CHECK_IN" else node["status"])
            if node["reason"] and node["status"] != "ONLINE":
                status += f" ({node['reason']})"
            parts += [status, node["mode"].capitalize()]
        elif what == "NodeModeChanged" and "mode" in data:
            parts.append(data["mode"].capitalize())
        elif what == "NodeDeleted":
            parts.append(data["address"])
        elif what == "ClusterReset":
            parts.append(f"epoch {data['epoch']}")
        elif what == "OutageCredited":
            parts.append(f"outage {data['outage_seconds']:.1f}s, credited {data['credited_seconds']:.1f}s")
        rest = "  ".join(parts)
    return f"rev {data['revision']}  {what:<16}  {rest}".rstrip()


# -- plumbing ----------------------------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _quiet_on_closed_stdout(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A reader that went away (``| head``) ends the command quietly, with exit code 0."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            # Point stdout at /dev/null so that the interpreter's last flush does not fail again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(0) from None

    return wrapper


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """:func:`run`, where a call that got no answer within its deadline counts as an unreachable control plane."""
    return run(_no_answer_is_unreachable(coro))


async def _no_answer_is_unreachable(coro: Coroutine[Any, Any, T]) -> T:
    from muster.client.errors import DeadlineExceededError, UnavailableError

    try:
        return await coro
    except DeadlineExceededError as exc:
        raise UnavailableError(f"no answer within the deadline: {exc}", code=exc.code) from exc


def _connect(address: str | None) -> _Connecting:
    from muster.client import Cluster

    try:
        return Cluster.connect(address_or_default(address))
    except ValueError as exc:
        raise fail(f"bad --address: {exc}") from None


def _which_node(node_id: int | None, state_dir: Path | None) -> int | tuple[ResolvedAddress, Path]:
    """The node an id-less command means: node.json's id, else this host's address (to look up)."""
    if node_id is not None:
        return node_id
    node_file = read_node_file(state_dir)
    if node_file is not None:
        return int(node_file["id"])
    from muster.client import AddressNotFoundError, resolve_node_address

    where = (state_dir or default_state_dir()) / NODE_FILE
    port_text = os.environ.get("MUSTER_PORT") or str(DEFAULT_NODE_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise fail(f"MUSTER_PORT={port_text!r} is not a port number; give the node's id") from None
    try:
        resolved = resolve_node_address(
            port=port,
            host_name=os.environ.get("MUSTER_HOST_NAME") or None,
            listen_address=os.environ.get("MUSTER_LISTEN_ADDRESS") or None,
        )
    except AddressNotFoundError as exc:
        raise fail(f"which node? there is no {where}, and {exc}; or give the node's id") from None
    return resolved, where


async def _node_id(cluster: Cluster, which: int | tuple[ResolvedAddress, Path]) -> int:
    if isinstance(which, int):
        return which
    here, where = which
    for node in (await cluster.list_nodes()).nodes:
        if node.address == here.address or (node.host == here.host and node.port == here.port):
            return node.id
    raise fail(
        f"which node? there is no {where}, and no node has this host's address {here.address}; "
        "give the node's id (see `muster list-nodes`)"
    )


# -- commands ----------------------------------------------------------------------------------------


def list_nodes(address: AddressOpt = None, json: JsonOpt = False) -> None:
    """List the cluster's nodes: ONLINE first, then by id.

    Columns: ID, Host, IPv4, Port, Status, Mode, Last seen (local time), Sessions.

    A node's sessions are the balancer's sessions on it that have not ended, placed (reserved,
    not started yet) and started alike: the same sessions `muster sessions` lists.

    \b
    With --json: {"revision": N, "nodes": [{"id", "address", "host", "ipv4", "port",
      "status", "health", "mode", "reason", "last_seen", "load", "sessions", "placed_sessions",
      "reported_sessions"}]} (reported_sessions: what the node's agent last reported)
    """

    async def body() -> Any:
        async with _connect(address) as cluster:
            return await cluster.list_nodes()

    listed = _run(body())
    if json:
        print_json({"revision": listed.revision, "nodes": [node_json(n) for n in listed.nodes]})
    elif listed.nodes:
        _out(render(nodes_table(listed.nodes)))
    else:
        _out("No nodes.\n")


def delete_node(
    node_id: NodeIdArg,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Delete even an ONLINE node with sessions: they move to other nodes as in a failover "
            "(new ids and routes); those no node can take end.",
        ),
    ] = False,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Delete a node (it passes through DELETING).

    An ONLINE node with sessions (placed or started, as `muster sessions` lists them) is refused:
    drain it first (`muster offline ID`), or pass --force. Its sessions are moved to other nodes as
    a failover moves them (new ids and routes: `muster route OLD_ID` answers the new node); those
    no other node can take are ended. The output says which happened to how many.
    """

    async def body() -> tuple[int, int, int, int]:
        async with _connect(address) as cluster:
            return await cluster.delete_node_sessions(node_id, force=force, wait_for_revision=True)

    revision, sessions, moved, ended = _run(body())
    if json:
        print_json(
            {
                "id": node_id,
                "deleted": True,
                "revision": revision,
                "sessions": sessions,
                "moved_sessions": moved,
                "ended_sessions": ended,
            }
        )
        return
    _out(f"Node {node_id} deleted.\n")
    if moved:
        _out(f"{_count(moved, 'session')} moved to other nodes (new ids and routes; see `muster sessions`).\n")
    if ended:
        _out(f"{_count(ended, 'session')} ended: no other node could take {'it' if ended == 1 else 'them'}.\n")
    if sessions > moved + ended:
        left = sessions - moved - ended
        _out(f"{_count(left, 'session')} will be moved by the balancer's failover.\n")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def node_status(
    node_id: ThisNodeArg = None,
    state_dir: StateDirOpt = None,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Show one node's view: the node, its session count, and the online nodes.

    \b
    With --json: {"revision": N, "node": {...}, "sessions": N, "online_nodes": [{...}]},
      each node as in `muster list-nodes --json`.
    """
    which = _which_node(node_id, state_dir)

    async def body() -> Any:
        async with _connect(address) as cluster:
            return await cluster.get_node_status(await _node_id(cluster, which))

    status = _run(body())
    if json:
        print_json(
            {
                "revision": status.revision,
                "node": node_json(status.node),
                "sessions": status.node.sessions,
                "placed_sessions": status.node.placed_sessions,
                "reported_sessions": status.session_count,
                "online_nodes": [node_json(n) for n in status.online_nodes],
            }
        )
        return
    node = status.node
    load = node.load
    fields = [
        ("Status", status_text(node.status) + (f" ({node.state_reason})" if node.status != "ONLINE" else "")),
        ("Mode", mode_text(node.mode)),
        ("Host", node.host or "-"),
        ("IPv4", node.ipv4 or "-"),
        ("Port", str(node.port)),
        ("Last seen", local_time(node.last_seen_time)),
        ("Load", f"{load.load1:.2f} {load.load5:.2f} {load.load15:.2f} ({load.cpu_count} CPUs)"),
        ("Sessions", _sessions_text(node, status.session_count)),
    ]
    if node.state_message:
        fields.insert(1, ("Why", node.state_message))
    labels = {"node_fingerprint": "Holds", "cluster_fingerprint": "Expected", "path": "File", "mode": "Mode found"}
    fields[2:2] = [(labels[k], node.state_details[k]) for k in labels if node.state_details.get(k)]
    if node.state_details.get("fix"):
        fields.insert(2 + sum(1 for k in labels if node.state_details.get(k)), ("Fix", node.state_details["fix"]))
    lines = [f"Node {node.id}  {node.address}"] + [f"  {name:<10} {value}" for name, value in fields]
    lines += ["", f"Online nodes: {len(status.online_nodes)}"]
    _out("\n".join(lines) + "\n")
    if status.online_nodes:
        _out(render(nodes_table(status.online_nodes)))


def _sessions_text(node: Any, reported: int) -> str:
    """node-status's Sessions: the balancer's count (placed ones said), and the agent's own count
    where it differs, saying which side is missing reports."""
    text = str(node.sessions)
    if node.placed_sessions:
        text += f" ({node.placed_sessions} placed, not started yet)"
    if reported != node.sessions:
        if reported < node.sessions:
            why = "the agent is missing reports: its application did not report every session it holds"
        else:
            why = "the balancer is missing reports: the agent counts sessions it did not report to the balancer"
        text += f"; the node's agent reports {reported} ({why})"
    return text


def reset_cluster(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Remove every node and the cluster definition (keys included): the next node to start defines the cluster.

    Asks for confirmation on a terminal; elsewhere it needs --yes.
    """
    if not yes:
        if not sys.stdin.isatty():
            raise fail("refusing to reset the cluster without confirmation (stdin is not a terminal); pass --yes")

        async def count() -> Any:
            async with _connect(address) as cluster:
                return await cluster.get_cluster(), await cluster.list_nodes()

        info, listed = _run(count())
        target = address_or_default(address)
        n = info.node_count
        sessions = sum(node.sessions for node in listed.nodes)
        ending = f"; {_count(sessions, 'session')} will end" if sessions else ""
        if not typer.confirm(
            f"Reset the cluster at {target}? This removes {n} node{'s' if n != 1 else ''} and the cluster "
            f"definition, keys included{ending}",
            default=False,
        ):
            raise fail("reset cancelled; nothing was changed")

    async def body() -> Any:
        import grpc

        from muster.client.errors import MusterError

        async with _connect(address) as cluster:
            result = await cluster.reset_cluster()
            try:
                await cluster.reset_keys()
            except MusterError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    return result  # no keys service behind this address: no keys to reset
                if exc.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                print(
                    f"muster: warning: the nodes were removed but the keys were not ({exc.code.name}: the keys "
                    "service did not answer); run `muster reset-cluster` again once it runs",
                    file=sys.stderr,
                )
            return result

    cluster_info, removed = _run(body())
    if json:
        print_json({"removed_nodes": removed, "epoch": cluster_info.epoch, "revision": cluster_info.head_revision})
    else:
        _out(f"Cluster reset: {removed} node{'s' if removed != 1 else ''} removed, new epoch {cluster_info.epoch}.\n")


def _set_mode(node_id: int | None, state_dir: Path | None, address: str | None, json: bool, draining: bool) -> None:
    from muster.client import NodeMode

    which = _which_node(node_id, state_dir)

    async def body() -> Node:
        async with _connect(address) as cluster:
            mode = NodeMode.DRAINING if draining else NodeMode.ACTIVE
            return await cluster.set_node_mode(await _node_id(cluster, which), mode)

    node = _run(body())
    if json:
        print_json(node_json(node))
    elif draining:
        _out(f"Node {node.id} ({node.address}) is draining: it keeps its sessions and gets no new ones.\n")
    else:
        _out(f"Node {node.id} ({node.address}) is active.\n")


def offline(
    node_id: ThisNodeArg = None,
    state_dir: StateDirOpt = None,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Drain a node: it keeps its sessions and gets no new ones (the reference "offline mode")."""
    _set_mode(node_id, state_dir, address, json, draining=True)


def online(
    node_id: ThisNodeArg = None,
    state_dir: StateDirOpt = None,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Undrain a node: it gets new sessions again."""
    _set_mode(node_id, state_dir, address, json, draining=False)


def watch(
    from_revision: Annotated[
        int,
        typer.Option(
            "--from-revision", min=0, help="Print the events after this revision; 0: a snapshot (Resync) first."
        ),
    ] = 0,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Follow the cluster's events until interrupted (Ctrl+C ends it with exit code 0).

    \b
    One line per event, snapshot (Resync) and progress mark, e.g.
      rev 12  NodeJoined        node 3  10.0.0.5:8787  Online  Active
    With --json, one object per line:
      {"type": "event" | "resync" | "progress", "revision": N, ...}

    A dropped stream resumes by itself after the last revision, on any replica, and says so on stderr.
    """
    _run(_follow(address, from_revision, json))


async def _follow(address: str | None, from_revision: int, as_json: bool) -> None:
    from muster.client import ConnectionState

    def emit(item: Resync | Event | Progress) -> None:
        if as_json:
            print_json(event_json(item))
        else:
            _out(event_line(item) + "\n")

    def note(message: str) -> None:
        with contextlib.suppress(OSError):
            sys.stderr.write(f"muster: {message}\n")
            sys.stderr.flush()

    async def follow() -> None:
        async with _connect(address) as cluster:
            await cluster.get_cluster()  # the watch itself retries for ever: fail fast when unreachable
            async with cluster.watch(from_revision, progress=True) as items:
                was_lost = False

                def on_state(state: ConnectionState) -> None:
                    nonlocal was_lost
                    if state is ConnectionState.CONNECTED:
                        if was_lost:
                            note(f"watch resumed after revision {items.through_revision}")
                        was_lost = False
                    elif state is ConnectionState.IN_JEOPARDY:
                        was_lost = True
                        note(f"watch stream lost; resuming after revision {items.through_revision}")
                    else:
                        was_lost = True
                        note("no working watch stream for a while; still trying (Ctrl+C to stop)")

                items.on_state_change(on_state)
                async for item in items:
                    emit(item)

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


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``muster`` command."""
    commands: list[tuple[str, Callable[..., None]]] = [
        ("list-nodes", list_nodes),
        ("delete-node", delete_node),
        ("node-status", node_status),
        ("reset-cluster", reset_cluster),
        ("offline", offline),
        ("online", online),
        ("watch", watch),
    ]
    for name, fn in commands:
        app.command(name)(_quiet_on_closed_stdout(fn))
