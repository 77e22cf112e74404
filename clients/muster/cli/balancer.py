"""The balancer's operator commands: status, place, sessions, route, balancer set-strategy.

Each command is a thin layer over :mod:`muster.client` (one call, then output), in the shape of
:mod:`muster.cli.nodes`: tables for people, ``--json`` for scripts, a client error as
``muster: <one line>`` on stderr with exit code 1, a closed stdout ending a command quietly. The
client is imported inside the commands, so that ``muster up`` never pays for it.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from muster.cli._common import AddressOpt, JsonOpt, fail, print_json
from muster.cli.nodes import _connect, _out, _quiet_on_closed_stdout, _run, local_time, render

if TYPE_CHECKING:
    from rich.table import Table

    from muster.client import ClusterStatus, NodeSessions, Placement, Session


class Strategy(enum.StrEnum):
    """The placement strategies (``custom`` needs the server's balancer_custom setting)."""

    SESSIONS = "sessions"
    SYSTEM_LOAD = "system-load"
    USER_HASH = "user-hash"
    CUSTOM = "custom"


balancer_app = typer.Typer(
    name="balancer",
    help="Configure the balancer: the cluster's placement strategy.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


# -- formatting (pure; tests/unit/test_balancer_cli_format.py) ---------------------------------------


def number_text(value: float, decimals: int = 2) -> str:
    """A number rounded to ``decimals`` places without trailing zeros: 0.45, 0.5, 1, 0 (never "-0")."""
    text = f"{round(value, decimals):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def load_text(value: float) -> str:
    """A load average as the status view prints it: at most 2 decimals, 0.45 → "0.45", 0.0 → "0"."""
    return number_text(value, 2)


def score_text(value: float) -> str:
    """A candidate's score: at most 3 decimals (user-hash scores are fractions), 2.0 → "2"."""
    return number_text(value, 3)


def node_flags(node: NodeSessions) -> str:
    """What is wrong with a node, as the status view marks it: " (unreachable)", " (draining)",
    " (offline)" — each that applies, in that order — or "" for a healthy node."""
    flags = [name for name, on in (("unreachable", node.unreachable), ("draining", node.draining)) if on]
    if node.offline:
        flags.append("offline")
    return "".join(f" ({f})" for f in flags)


def session_line(session: Session) -> str:
    """A session in the status view: ``  12108 - alice``; ``  placed - alice`` before it started
    (``  started - alice`` when its node reported no process id)."""
    if session.state == "PLACED":
        what = "placed"
    else:
        what = str(session.pid) if session.pid else "started"
    return f"  {what} - {session.user}"


def status_lines(status: ClusterStatus) -> list[str]:
    """The cluster status view, one line per node (in the server's order: ONLINE first) and one per session::

    10.0.0.1:8787 Load: 0.45, 0.66, 0.32
      12108 - alice
    10.0.0.3:8787 (unreachable) Load: 0, 0, 0
    """
    lines = []
    for n in status.nodes:
        loads = ", ".join(load_text(x) for x in (n.load1, n.load5, n.load15))
        lines.append(f"{n.address or f'node {n.node_id}'}{node_flags(n)} Load: {loads}")
        lines += [session_line(s) for s in n.sessions]
    return lines


def status_json(status: ClusterStatus) -> dict[str, Any]:
    """``muster status --json``: ``{"strategy", "nodes": [{"node_id", "address", "route", "state",
    "unreachable", "draining", "offline", "load": [l1, l5, l15], "cpu_count", "sessions": [{"id", "pid",
    "user", "kind", "state"}]}]}``."""
    return {
        "strategy": status.strategy,
        "nodes": [
            {
                "node_id": n.node_id,
                "address": n.address,
                "route": n.route,
                "state": n.state,
                "unreachable": n.unreachable,
                "draining": n.draining,
                "offline": n.offline,
                "load": [n.load1, n.load5, n.load15],
                "cpu_count": n.cpu_count,
                "sessions": [
                    {"id": s.id, "pid": s.pid, "user": s.user, "kind": s.kind, "state": s.state} for s in n.sessions
                ],
            }
            for n in status.nodes
        ],
    }


def placement_json(placement: Placement, *, dry_run: bool) -> dict[str, Any]:
    """``muster place --json``: ``{"session_id", "node": {"id", "address"}, "strategy", "candidates":
    [{"node_id", "score"}], "excluded": [{"node_id", "reason"}], "fallback", "dry_run"}``."""
    s = placement.session
    return {
        "session_id": s.id,
        "node": {"id": s.node_id, "address": s.node_address},
        "strategy": placement.strategy,
        "candidates": [{"node_id": c.node_id, "score": c.score} for c in placement.candidates],
        "excluded": [{"node_id": e.node_id, "reason": e.reason} for e in placement.excluded],
        "fallback": placement.fallback,
        "dry_run": dry_run,
    }


def reason_text(reason: str) -> str:
    """An exclusion reason as people read it: ``missed_check_in`` → "missed check-in"."""
    return "missed check-in" if reason == "missed_check_in" else reason.replace("_", " ").lower()


def placement_lines(placement: Placement, *, dry_run: bool) -> list[str]:
    """The summary of a placement: ``Session <id> placed on node 2 (10.0.0.2:8787) by sessions``
    (``would be placed`` for a dry run), and why the strategy fell back, if it did."""
    s = placement.session
    verb = "would be placed" if dry_run else "placed"
    lines = [f"Session {s.id} {verb} on node {s.node_id} ({s.node_address}) by {placement.strategy}"]
    if placement.fallback:
        lines.append(f"Fallback: {placement.fallback}")
    return lines


def placement_table(placement: Placement) -> Table:
    """Every candidate (best first, the chosen one marked ``*``), then every excluded node with its reason."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in ("Node", "Address", "Score", "Sessions", "Chosen"):
        table.add_column(name, overflow="fold")
    for c in placement.candidates:
        table.add_row(str(c.node_id), c.address or "-", score_text(c.score), str(c.sessions), "*" if c.chosen else "")
    for e in placement.excluded:
        table.add_row(str(e.node_id), e.address or "-", "-", "-", f"excluded: {reason_text(e.reason)}")
    return table


SESSION_COLUMNS = ("ID", "Node", "User", "Kind", "State", "PID", "Placed")


def session_row(session: Session) -> tuple[str, ...]:
    """One ``muster sessions`` row (empty values as "-")."""
    return (
        session.id,
        str(session.node_id),
        session.user or "-",
        session.kind or "-",
        session.state.capitalize(),
        str(session.pid) if session.pid else "-",
        local_time(session.place_time),
    )


def sessions_table(sessions: list[Session]) -> Table:
    """The sessions as a box-less rich table, columns :data:`SESSION_COLUMNS`."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in SESSION_COLUMNS:
        table.add_column(name, overflow="fold")
    for s in sessions:
        table.add_row(*session_row(s))
    return table


def session_json(session: Session) -> dict[str, Any]:
    """A session as ``--json`` prints it (times ISO-8601 UTC, null if none)."""
    return {
        "id": session.id,
        "node_id": session.node_id,
        "node_address": session.node_address,
        "route": session.route,
        "user": session.user,
        "kind": session.kind,
        "state": session.state,
        "pid": session.pid,
        "place_time": session.place_time.isoformat() if session.place_time else None,
        "start_time": session.start_time.isoformat() if session.start_time else None,
        "moved_from": session.moved_from,
    }


def route_line(asked: str, session: Session, moved: bool) -> str:
    """``<id> -> node 1 (10.0.0.1:8787)``; a moved session shows its new id and ``(moved from <asked id>)``."""
    line = f"{session.id} -> node {session.node_id} ({session.node_address})"
    return line + f" (moved from {asked})" if moved else line


def parse_labels(labels: list[str]) -> dict[str, str]:
    """``["zone=a", "gpu=yes"]`` → ``{"zone": "a", "gpu": "yes"}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    out: dict[str, str] = {}
    for item in labels:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"label {item!r} is not key=value")
        out[key.strip()] = value
    return out


# -- commands ----------------------------------------------------------------------------------------


def status(address: AddressOpt = None, json: JsonOpt = False) -> None:
    """Show the cluster status view: every node's address, state, load and sessions.

    One line per node (ONLINE nodes first), marked (unreachable) when it missed its check-in,
    (draining) when it gets no new sessions, (offline) when it is not ONLINE; then one line per
    session: its process id (or "placed" before it started) and user.

    \b
      10.0.0.1:8787 Load: 0.45, 0.66, 0.32
        12108 - alice
      10.0.0.3:8787 (unreachable) Load: 0, 0, 0

    \b
    With --json: {"strategy", "nodes": [{"node_id", "address", "route", "state", "unreachable",
      "draining", "offline", "load": [l1, l5, l15], "cpu_count", "sessions": [{"id", "pid", "user",
      "kind", "state"}]}]}
    """

    async def body() -> ClusterStatus:
        async with _connect(address) as cluster:
            return await cluster.status()

    view = _run(body())
    if json:
        print_json(status_json(view))
    elif view.nodes:
        _out("".join(line + "\n" for line in status_lines(view)))
    else:
        _out("No nodes.\n")


def place(
    user: Annotated[str, typer.Option("--user", help="The session's user.", show_default=False)],
    kind: Annotated[str, typer.Option("--kind", help="The session's kind (e.g. the IDE or product).")] = "",
    label: Annotated[
        list[str] | None,
        typer.Option(
            "--label", metavar="KEY=VALUE", help="A label the node must carry (repeat for several).", show_default=False
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say where it would go: nothing is reserved.")
    ] = False,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Place a new session on a node by the cluster's strategy, and say why.

    Reserves the session on the chosen node (--dry-run only asks). Prints the session id and the
    node, then every candidate with its score (lowest wins) and every excluded node with its reason
    (draining, missed check-in, offline, labels). No node can take it: the reason on stderr, exit 1.

    \b
    With --json: {"session_id", "node": {"id", "address"}, "strategy", "candidates": [{"node_id",
      "score"}], "excluded": [{"node_id", "reason"}], "fallback", "dry_run"}
    """
    try:
        labels = parse_labels(label or [])
    except ValueError as exc:
        raise fail(str(exc), code=2) from None

    async def body() -> Placement:
        async with _connect(address) as cluster:
            return await cluster.place_session(user, kind=kind, labels=labels, dry_run=dry_run, all_candidates=True)

    placement = _run(body())
    if json:
        print_json(placement_json(placement, dry_run=dry_run))
        return
    _out("".join(line + "\n" for line in placement_lines(placement, dry_run=dry_run)))
    if placement.candidates or placement.excluded:
        _out(render(placement_table(placement)))


def sessions(
    node: Annotated[int, typer.Option("--node", min=0, help="Only this node's sessions (0: every node).")] = 0,
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """List the sessions, by node then oldest first: placed (reserved, not started yet) and started.

    Columns: ID, Node, User, Kind, State, PID, Placed (local time).

    \b
    With --json: [{"id", "node_id", "node_address", "route", "user", "kind", "state", "pid",
      "place_time", "start_time", "moved_from"}]
    """

    async def body() -> list[Session]:
        async with _connect(address) as cluster:
            return await cluster.list_sessions(node_id=node)

    listed = _run(body())
    if json:
        print_json([session_json(s) for s in listed])
    elif listed:
        _out(render(sessions_table(listed)))
    else:
        _out("No sessions.\n")


def route(
    session_id: Annotated[str, typer.Argument(help="The session id, <id>.<route>.", show_default=False)],
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Say which node a session is on now, following moves: `<id> -> node N (host:port)`.

    A session moved off a failed node shows its new id and "(moved from <id>)". An id this cluster
    did not issue (its route signature does not verify), or a session that ended: exit 1.

    \b
    With --json: {"session_id", "node": {"id", "address"}, "moved", "session": {...}}
    """

    async def body() -> tuple[Session, bool]:
        async with _connect(address) as cluster:
            return await cluster.route_session(session_id)

    session, moved = _run(body())
    if json:
        print_json(
            {
                "session_id": session_id,
                "node": {"id": session.node_id, "address": session.node_address},
                "moved": moved,
                "session": session_json(session),
            }
        )
    else:
        _out(route_line(session_id, session, moved) + "\n")


@balancer_app.command("set-strategy")
def set_strategy(
    name: Annotated[
        Strategy,
        typer.Argument(
            help="sessions (fewest sessions), system-load (lowest load per CPU), user-hash (a user stays on "
            "one node) or custom (the server's balancer_custom setting decides).",
            show_default=False,
        ),
    ],
    address: AddressOpt = None,
    json: JsonOpt = False,
) -> None:
    """Set the cluster's placement strategy (needs the admin token: MUSTER_TOKEN or MUSTER_ADMIN_TOKEN).

    Prints `Placement strategy: NAME (was PREVIOUS)`. With --json: {"strategy", "previous"}.
    """

    async def body() -> str:
        async with _connect(address) as cluster:
            return await cluster.set_strategy(name.value)

    previous = _run(body())
    if json:
        print_json({"strategy": name.value, "previous": previous})
    else:
        _out(f"Placement strategy: {name.value} (was {previous})\n")


def register(app: typer.Typer) -> None:
    """Adds the balancer's commands to the ``muster`` command."""
    for name, fn in (("status", status), ("place", place), ("sessions", sessions), ("route", route)):
        app.command(name)(_quiet_on_closed_stdout(fn))
    app.add_typer(balancer_app)
