"""The ``muster agent`` command: the node agent as a process.

It runs :class:`muster.client.Agent` until SIGTERM or SIGINT, then leaves the cluster. Progress goes
to stdout, one flushed line each (``muster agent: node 3 joined as 10.0.0.5:8787 (found by
interfaces) via 127.0.0.1:7400``); warnings and the reason it stopped, if it failed, go to stderr.

The client is imported inside the command, so that ``muster up`` never pays for it, and nothing of
the server is imported: the agent runs on the base install (uvloop when it is there, else asyncio).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from muster.cli._common import AddressOpt, StateDirOpt, address_or_default, default_state_dir

if TYPE_CHECKING:
    from muster.client import AgentConfig

PREFIX = "muster agent: "

HostNameOpt = Annotated[
    str | None,
    typer.Option(
        "--host-name",
        metavar="NAME",
        envvar="MUSTER_HOST_NAME",
        show_envvar=False,
        help="This node's address as the cluster should reach it (first in the lookup order). [env: MUSTER_HOST_NAME]",
    ),
]
ListenAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--listen-address",
        metavar="ADDR",
        envvar="MUSTER_LISTEN_ADDRESS",
        show_envvar=False,
        help="The address the application listens on; used unless it is a wildcard such as 0.0.0.0. "
        "[env: MUSTER_LISTEN_ADDRESS]",
    ),
]
PortOpt = Annotated[
    int,
    typer.Option(
        "--port",
        metavar="PORT",
        envvar="MUSTER_PORT",
        show_envvar=False,
        show_default=False,
        min=1,
        max=65535,
        help="The application's port. [env: MUSTER_PORT; default 8787]",
    ),
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        metavar="KEY=VALUE",
        show_default=False,
        help="A label key=value stored with the node; repeat for more. [env: MUSTER_LABELS, comma-separated k=v,k2=v2]",
    ),
]
DeleteOpt = Annotated[
    bool,
    typer.Option(
        "--delete-node-on-exit",
        envvar="MUSTER_DELETE_NODE_ON_EXIT",
        show_envvar=False,
        show_default=False,
        help="On a clean stop remove the node instead of leaving it OFFLINE (containers whose address "
        "changes on restart). [env: MUSTER_DELETE_NODE_ON_EXIT=1]",
    ),
]


def _path_opt(flag: str, env: str, what: str) -> object:
    return typer.Option(
        flag, metavar="FILE", envvar=env, show_envvar=False, show_default=False, help=f"{what} [env: {env}]"
    )


KeysDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--keys-dir",
        metavar="DIR",
        envvar="MUSTER_KEYS_DIR",
        show_envvar=False,
        show_default=False,
        help="Manage the node's keys in DIR: secure-cookie-key, launcher.pem, launcher.pub (the three "
        "options below override single files). [env: MUSTER_KEYS_DIR]",
    ),
]
CookieFileOpt = Annotated[
    Path | None,
    _path_opt(
        "--secure-cookie-key-file",
        "MUSTER_SECURE_COOKIE_KEY_FILE",
        "The secure cookie key file (written 0600 from the cluster's if missing).",
    ),
]
LauncherFileOpt = Annotated[
    Path | None,
    _path_opt("--launcher-key-file", "MUSTER_LAUNCHER_KEY_FILE", "The launcher private key (PEM)."),
]
LauncherPubFileOpt = Annotated[
    Path | None,
    _path_opt("--launcher-pub-file", "MUSTER_LAUNCHER_PUB_FILE", "The launcher public key (PEM)."),
]


def register(app: typer.Typer) -> None:
    """Adds ``muster agent`` to the ``muster`` command."""
    app.command(name="agent")(agent)


def agent(
    host_name: HostNameOpt = None,
    listen_address: ListenAddressOpt = None,
    port: PortOpt = 8787,
    label: LabelOpt = None,
    state_dir: StateDirOpt = None,
    delete_node_on_exit: DeleteOpt = False,
    keys_dir: KeysDirOpt = None,
    secure_cookie_key_file: CookieFileOpt = None,
    launcher_key_file: LauncherFileOpt = None,
    launcher_pub_file: LauncherPubFileOpt = None,
    address: AddressOpt = None,
) -> None:
    """Run the node agent: join, heartbeat, serve the session socket; leave on SIGTERM or Ctrl+C.

    The node's address is, in order: --host-name; --listen-address with --port; the first usable
    address of this machine's host name; the last non-loopback IPv4 address of its interfaces.
    It writes <state-dir>/node.json and serves <state-dir>/agent.sock, on which the application
    reports sessions (one JSON object per line: {"op": "session_started", "session": "s1"},
    {"op": "session_ended", "session": "s1"}, {"op": "status"}).

    With --keys-dir (or the three key file options) the agent also manages the node's keys: the
    first node defines the cluster's (uploading its files, or receiving generated ones), later
    nodes are checked by fingerprint (a node whose keys differ is refused: the agent says why
    and exits 1) or receive the cluster's, and rotations are followed without a restart.
    """
    from muster.client import AgentConfig

    labels = _parse_labels(label or _env_labels())
    try:
        config = AgentConfig(
            addresses=address_or_default(address),
            host_name=host_name or None,
            listen_address=listen_address or None,
            port=port,
            labels=labels,
            state_dir=Path(state_dir) if state_dir is not None else default_state_dir(),
            delete_node_on_exit=delete_node_on_exit,
            key_paths=_key_paths(keys_dir, secure_cookie_key_file, launcher_key_file, launcher_pub_file),
        )
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    raise typer.Exit(_run(config))


def _key_paths(directory: Path | None, cookie: Path | None, launcher: Path | None, pub: Path | None) -> object:
    """The key files to manage: --keys-dir's standard names, overridden file by file; None without any."""
    from muster.client.keyfiles import KeyPaths

    given = [p for p in (cookie, launcher, pub) if p is not None]
    if directory is None and not given:
        return None
    base = KeyPaths.in_dir(directory if directory is not None else given[0].parent)
    return KeyPaths(cookie or base.secure_cookie_key, launcher or base.launcher_key, pub or base.launcher_pub)


def _env_labels() -> list[str]:
    raw = os.environ.get("MUSTER_LABELS", "")
    return [item.strip() for item in raw.split(",") if item.strip()]


def _parse_labels(items: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"bad label {item!r}: write key=value (--label zone=a, or MUSTER_LABELS=zone=a,rack=3)", 2)
        labels[key.strip()] = value.strip()
    return labels


def _fail(message: str, code: int = 1) -> typer.Exit:
    print(PREFIX + message, file=sys.stderr, flush=True)
    return typer.Exit(code)


class _Lines(logging.Handler):
    """The agent's log as ``muster agent: …`` lines: progress on stdout, warnings on stderr.

    A fatal error is not printed here: the command prints it once, from the exception, as it exits.
    """

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "agent_failed":
            return
        try:
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            print(PREFIX + record.getMessage(), file=stream, flush=True)
        except Exception:  # noqa: BLE001 - a closed stdout must not stop the agent
            self.handleError(record)


def _run(config: AgentConfig) -> int:
    from muster.client import _agent

    handler = _Lines()
    logger = logging.getLogger(_agent.__name__)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_main(config))
    return uvloop.run(_main(config))


async def _main(config: AgentConfig) -> int:
    from muster.client import AddressNotFoundError, Agent, Cluster
    from muster.client.errors import MusterError, NodeLimitReachedError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print(f"{PREFIX}{signal.Signals(signum).name}: leaving the cluster", flush=True)
            stop.set()
        elif main is not None:
            main.cancel()  # a second signal: stop now, without waiting to leave

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    from muster.client._telemetry import setup_tracing

    tracing = setup_tracing("muster-agent")
    try:
        async with Cluster.connect(config.addresses) as cluster:
            await Agent(cluster, config).run(stop)
    except asyncio.CancelledError:
        if signals < 2:
            raise
        # Our own cancellation, from a second signal: this is where it ends.
        print(PREFIX + "stopped without leaving (second signal); the node expires after its lease", file=sys.stderr)
        return 130
    except AddressNotFoundError as exc:
        return _error(str(exc))
    except NodeLimitReachedError as exc:
        limit = exc.metadata.get("max_nodes", "?")
        node = exc.metadata.get("node", "?")
        return _error(
            f"the cluster's node limit ({limit}) is reached; node {node} is stored as INVALID_LICENSE. "
            "Delete a node (`muster delete-node ID`) or raise the control plane's max_nodes (MUSTER_MAX_NODES)"
        )
    except MusterError as exc:
        return _error(str(exc))
    except (RuntimeError, OSError) as exc:
        return _error(str(exc))
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if tracing is not None:
            tracing.shutdown()  # flushes the last spans
    return 0


def _error(message: str) -> int:
    print(PREFIX + message, file=sys.stderr, flush=True)
    return 1
