"""Lock commands: ``muster locks``, ``muster locks break``, ``muster locktester``, ``muster jobs``."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer

from muster.cli._common import (
    AddressOpt,
    JsonOpt,
    StateDirOpt,
    address_or_default,
    fail,
    print_json,
    read_node_file,
    run,
)

locks_app = typer.Typer(
    name="locks",
    help="List locks (holders, waiters, tokens, expiry), or break a stuck one.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@locks_app.callback()
def list_locks(ctx: typer.Context, address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """List the locks that are held or waited for."""
    if ctx.invoked_subcommand is not None:
        return
    from muster.client import Cluster

    async def go() -> list[Any]:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.list_locks()

    locks = run(go())
    if json_:
        print_json(
            {
                "locks": [
                    {"name": lock.name, "fence": lock.fence, "holders": lock.holders, "waiters": lock.waiters}
                    for lock in locks
                ]
            }
        )
        return
    if not locks:
        print("No locks are held.")
        return
    print(f"{'LOCK':<30} {'TOKEN':>6}  {'MODE':<9} {'HOLDER':<30} {'EXPIRES':<19} WAITERS")
    for lock in locks:
        holders = lock.holders or [{"token": "-", "mode": "-", "holder": "-", "expire_time": None}]
        for i, h in enumerate(holders):
            waiters = str(len(lock.waiters)) if i == 0 else ""
            print(
                f"{lock.name if i == 0 else '':<30} {h['token']!s:>6}  {h['mode']:<9} {h['holder']:<30} "
                f"{_when(h['expire_time']):<19} {waiters}"
            )


@locks_app.command("break")
def break_lock(
    name: Annotated[str, typer.Argument(help="The lock to break.")],
    address: AddressOpt = None,
) -> None:
    """Release a stuck lock by moving its fence on: the old holder's guarded writes then fail."""
    from muster.client import Cluster

    async def go() -> tuple[int, int]:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.break_lock(name)

    fence, released = run(go())
    print(f"Lock {name} broken: {released} hold(s) released; tokens below {fence} are now refused.")


def _holder(state_dir: Any) -> tuple[str, int]:
    import os
    import socket

    node = read_node_file(state_dir)
    if node is not None:
        return f"node {node['id']} ({node['address']})", int(node["id"])
    return f"{socket.gethostname()}:{os.getpid()}", 0


def locktester(
    name: Annotated[str, typer.Option("--name", help="The lock to test.")] = "muster-locktester",
    ttl: Annotated[float, typer.Option(help="Lease time to live in seconds (kept alive while held).")] = 10.0,
    address: AddressOpt = None,
    state_dir: StateDirOpt = None,
) -> None:
    """Take a lock and hold it until Ctrl+C; a second run anywhere is refused and names the holder."""
    from muster.client import Cluster
    from muster.client import errors as E

    holder, node_id = _holder(state_dir)

    async def go() -> int:
        async with Cluster.connect(address_or_default(address)) as cluster:
            try:
                async with cluster.try_lock(name, ttl=timedelta(seconds=ttl), holder=holder, node_id=node_id) as lease:
                    print(f"* Acquired lock {name} (token {lease.token})", flush=True)
                    print("  Holding it until Ctrl+C; run `muster locktester` elsewhere to see it refused.", flush=True)
                    stop = asyncio.Event()
                    loop = asyncio.get_running_loop()
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.add_signal_handler(sig, stop.set)
                    await stop.wait()
                print(f"* Released lock {name} (token {lease.token})", flush=True)
                return 0
            except E.LockHeldError as exc:
                print(
                    f"* Unable to acquire lock {name}: held by {exc.metadata.get('holder', '?')} "
                    f"(token {exc.metadata.get('token', '?')})",
                    flush=True,
                )
                return 1

    code = run(go())
    raise typer.Exit(code)


def jobs(
    job: Annotated[str, typer.Option("--job", help="Only this job's firings.")] = "",
    limit: Annotated[int, typer.Option(help="How many firings, newest first.")] = 50,
    address: AddressOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List the newest firings of single-run jobs: who claimed each, its token and state."""
    from muster.client import Cluster

    async def go() -> Any:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.list_jobs(job, limit=limit)

    firings, _ = run(go())
    if json_:
        print_json(
            {
                "firings": [
                    {
                        "job": f.job,
                        "scheduled_time": f.scheduled_time.isoformat(),
                        "holder": f.holder,
                        "node_id": f.node_id,
                        "token": f.token,
                        "state": f.state,
                        "attempt": f.attempt,
                        "recoverable": f.recoverable,
                    }
                    for f in firings
                ]
            }
        )
        return
    if not firings:
        print("No firings yet.")
        return
    print(f"{'JOB':<24} {'SCHEDULED':<19} {'STATE':<10} {'TOKEN':>5} {'ATTEMPT':>7}  HOLDER")
    for f in firings:
        print(f"{f.job:<24} {_when(f.scheduled_time):<19} {f.state:<10} {f.token:>5} {f.attempt:>7}  {f.holder}")


def register(app: typer.Typer) -> None:
    """Adds the lock commands to the ``muster`` command."""
    app.add_typer(locks_app)
    app.command("locktester")(locktester)
    app.command("jobs")(jobs)


_ = sys, fail
