"""What every operator command shares: the address option, output, errors, the agent's node file."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

T = TypeVar("T")

NODE_FILE = "node.json"
AGENT_SOCKET = "agent.sock"

AddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="The control plane, host:port (replicas comma-separated). [env: MUSTER_ADDRESS; default 127.0.0.1:7400]",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]
StateDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="The agent's state directory (node.json, agent.sock). "
        "[env: MUSTER_STATE_DIR; default /var/lib/muster/agent for root, else ~/.local/state/muster/agent]",
    ),
]


def address_or_default(address: str | None) -> str:
    """The ``--address`` flag, else ``MUSTER_ADDRESS``, else 127.0.0.1:7400."""
    from muster.client._config import default_address

    return address or default_address()


def default_state_dir() -> Path:
    """The agent's default state directory (one definition, in the client)."""
    from muster.client._agent import default_state_dir as agents_default

    return agents_default()


def read_node_file(state_dir: Path | None) -> dict[str, Any] | None:
    """The agent's ``node.json`` (``{"id", "address", "host", "port"}``), or None if there is none."""
    path = (state_dir or default_state_dir()) / NODE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("id"), int) else None


def fail(message: str, code: int = 1) -> typer.Exit:
    """Prints ``muster: <message>`` on stderr and returns the Exit to raise."""
    typer.echo(f"muster: {message}", err=True)
    return typer.Exit(code)


_loop: asyncio.AbstractEventLoop | None = None


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a command's coroutine; a client error becomes one line on stderr and exit code 1.

    One event loop for the command's life, never closed: the command ends through ``os._exit``
    after flushing (see ``muster.cli.main.main``), and closing a loop that gRPC's aio machinery
    still knows of could crash the process (SIGSEGV) before its output was written.
    """
    from muster.client.errors import MusterError, NoEligibleNodeError, UnavailableError

    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    try:
        return _loop.run_until_complete(coro)
    except NoEligibleNodeError as exc:
        raise fail(str(exc)) from None
    except UnavailableError as exc:
        raise fail(
            f"the control plane is unreachable ({exc}); is `muster up` running? set --address or MUSTER_ADDRESS"
        ) from None
    except MusterError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a function as a command body (kept for symmetry; errors are handled in :func:`run`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


def print_json(value: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(value, indent=None, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()
