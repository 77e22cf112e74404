"""The ``muster`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="muster",
    help="Muster: a control plane for clusters of application servers.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: rich markup would swallow the "[env: …; default …]" of every option
    context_settings={"help_option_names": ["-h", "--help"]},
)

SERVICES = ("registry", "locks", "keys", "balancer")

ListenOpt = Annotated[
    str | None, typer.Option("--listen", help="host:port to serve on. [env: MUSTER_LISTEN; default 127.0.0.1:7400]")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML file of options. [env: MUSTER_CONFIG]")]
HeartbeatOpt = Annotated[
    str | None, typer.Option(help="How often nodes heartbeat, e.g. 5s. [env: MUSTER_HEARTBEAT_INTERVAL; default 5s]")
]
WindowOpt = Annotated[
    str | None,
    typer.Option(help="No heartbeat this long: MISSED_CHECK_IN. [env: MUSTER_CHECK_IN_WINDOW; default 3 intervals]"),
]
TtlOpt = Annotated[
    str | None,
    typer.Option(help="No heartbeat this long: OFFLINE (lease expired). [env: MUSTER_LEASE_TTL; default 30s]"),
]
MaxNodesOpt = Annotated[
    int | None, typer.Option(help="The cluster's node limit, 0 for none. [env: MUSTER_MAX_NODES; default 0]")
]

NodeTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="File holding the node token, mode 0600 (or set MUSTER_NODE_TOKEN). [env: MUSTER_NODE_TOKEN_FILE]"
    ),
]
AdminTokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="File holding the admin token, mode 0600 (or set MUSTER_ADMIN_TOKEN). [env: MUSTER_ADMIN_TOKEN_FILE]"
    ),
]
TlsCertOpt = Annotated[Path | None, typer.Option(help="PEM certificate chain: serve TLS. [env: MUSTER_TLS_CERT_FILE]")]
TlsKeyOpt = Annotated[Path | None, typer.Option(help="PEM private key of the certificate. [env: MUSTER_TLS_KEY_FILE]")]
TlsClientCaOpt = Annotated[
    Path | None,
    typer.Option(help="PEM CA of client certificates: require mTLS. [env: MUSTER_TLS_CLIENT_CA_FILE]"),
]


def _server_imports() -> Any:
    try:
        import uvloop

        from muster.core import config, server
    except ImportError as exc:
        typer.echo(
            f"muster: the server is not installed ({exc.name} is missing); "
            "install it with: pip install 'muster[server]'",
            err=True,
        )
        raise typer.Exit(2) from None
    return uvloop, config, server


def _settings(config_mod: Any, **flags: Any) -> Any:
    from pydantic import ValidationError

    try:
        return config_mod.load_settings(**flags)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        typer.echo(f"muster: invalid {where}: {first['msg']}", err=True)
        raise typer.Exit(2) from None


def _ready(what: str, database: str) -> Any:
    def announce(address: str) -> None:
        print(f"muster: serving {what} on {address} (database: {database})", flush=True)

    return announce


@app.command()
def up(
    listen: ListenOpt = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the embedded PostgreSQL keeps its data. "
            "[env: MUSTER_DATA_DIR; default: ~/.local/share/muster, /var/lib/muster for root]"
        ),
    ] = None,
    config_file: ConfigOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    check_in_window: WindowOpt = None,
    lease_ttl: TtlOpt = None,
    max_nodes: MaxNodesOpt = None,
    node_token_file: NodeTokenFileOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    tls_cert_file: TlsCertOpt = None,
    tls_key_file: TlsKeyOpt = None,
    tls_client_ca_file: TlsClientCaOpt = None,
) -> None:
    """Run every service in this process on one port (embedded PostgreSQL unless MUSTER_DATABASE_URL is set)."""
    uvloop, config, server = _server_imports()
    settings = _settings(
        config,
        listen=listen,
        data_dir=data_dir,
        config_file=config_file,
        heartbeat_interval=heartbeat_interval,
        check_in_window=check_in_window,
        lease_ttl=lease_ttl,
        max_nodes=max_nodes,
        node_token_file=node_token_file,
        admin_token_file=admin_token_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_client_ca_file=tls_client_ca_file,
    )
    server.configure_logging(settings.log_level, settings.log_format)
    _check_security(settings)
    if settings.master_key is None and settings.master_key_file is None:
        from muster.keys.crypto import ensure_master_key

        path = ensure_master_key(settings.data_dir)
        print(f"muster: master key for keys at rest in {path} (keep it safe, and out of database backups)", flush=True)
        settings = settings.model_copy(update={"master_key_file": path})
    embedded = None
    if settings.database_url is not None:
        dsn = _dsn(config, settings)
        shown = _mask(dsn)
    else:
        from muster.core.embedded import EmbeddedPostgres

        pg_dir = settings.data_dir / "pg"
        print(f"muster: starting the embedded PostgreSQL in {pg_dir}", flush=True)
        embedded = EmbeddedPostgres(pg_dir, fsync=settings.embedded_fsync)
        try:
            embedded.start()
        except Exception as exc:
            typer.echo(f"muster: the embedded PostgreSQL did not start: {exc}", err=True)
            raise typer.Exit(1) from None
        dsn, shown = embedded.url, f"embedded PostgreSQL in {pg_dir}"
    try:
        uvloop.run(server.serve(settings, dsn, list(SERVICES), on_ready=_ready("all services", shown)))
    except (TimeoutError, RuntimeError, OSError) as exc:
        typer.echo(f"muster: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if embedded is not None:
            embedded.stop()


@app.command()
def serve(
    service: Annotated[
        str,
        typer.Argument(
            metavar="SERVICE[,SERVICE…]",
            help="registry, keys, balancer or locks; several comma-separated run in one process (registry,keys).",
        ),
    ],
    listen: ListenOpt = None,
    config_file: ConfigOpt = None,
    heartbeat_interval: HeartbeatOpt = None,
    check_in_window: WindowOpt = None,
    lease_ttl: TtlOpt = None,
    max_nodes: MaxNodesOpt = None,
    node_token_file: NodeTokenFileOpt = None,
    admin_token_file: AdminTokenFileOpt = None,
    tls_cert_file: TlsCertOpt = None,
    tls_key_file: TlsKeyOpt = None,
    tls_client_ca_file: TlsClientCaOpt = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            envvar="MUSTER_WORKERS",
            help="Server processes sharing the port (SO_REUSEPORT), each a full replica; if one dies, all stop "
            "and the command exits 1. [env: MUSTER_WORKERS; default 1]",
        ),
    ] = 1,
) -> None:
    """Run a service in this process against MUSTER_DATABASE_URL (any number of replicas may run).

    With --workers N, N processes serve the one port; the kernel spreads connections over them.
    """
    names = [n.strip() for n in service.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVICES]
    if unknown or not names or len(set(names)) != len(names):
        bad = ", ".join(unknown) or service
        typer.echo(f"muster: unknown or repeated service {bad!r}; choose from {', '.join(SERVICES)}", err=True)
        raise typer.Exit(2)
    from muster.cli import _workers

    if workers > 1 and not _workers.is_worker():
        _supervise_workers(names, workers, listen=listen, config_file=config_file)
        return
    uvloop, config, server = _server_imports()
    settings = _settings(
        config,
        listen=listen,
        config_file=config_file,
        heartbeat_interval=heartbeat_interval,
        check_in_window=check_in_window,
        lease_ttl=lease_ttl,
        max_nodes=max_nodes,
        node_token_file=node_token_file,
        admin_token_file=admin_token_file,
        tls_cert_file=tls_cert_file,
        tls_key_file=tls_key_file,
        tls_client_ca_file=tls_client_ca_file,
    )
    server.configure_logging(settings.log_level, settings.log_format)
    _check_security(settings)
    if settings.database_url is None:
        typer.echo(
            "muster: set MUSTER_DATABASE_URL=postgresql://… (or run `muster up` for everything in one process)",
            err=True,
        )
        raise typer.Exit(2)
    dsn = _dsn(config, settings)
    announce = _ready(", ".join(names), _mask(dsn))
    try:
        if _workers.is_worker():
            uvloop.run(_serve_worker(server, settings, dsn, names, announce))
        else:
            uvloop.run(server.serve(settings, dsn, names, on_ready=announce))
    except (TimeoutError, RuntimeError, OSError) as exc:
        typer.echo(f"muster: {exc}", err=True)
        raise typer.Exit(1) from None


async def _serve_worker(server: Any, settings: Any, dsn: str, names: list[str], announce: Any) -> None:
    """One ``--workers`` process: the shared port with SO_REUSEPORT; it stops when its parent is gone."""
    import asyncio

    from muster.cli import _workers

    _workers.die_with_parent()
    stop = asyncio.Event()

    async def orphaned() -> None:
        while not _workers.parent_gone():  # noqa: ASYNC110 - getppid() has nothing to await; the kernel signal is first
            await asyncio.sleep(0.5)
        print(f"muster: worker {os.getpid()}: the parent is gone; stopping", file=sys.stderr, flush=True)
        stop.set()

    watch = asyncio.create_task(orphaned())
    try:
        await server.serve(settings, dsn, names, on_ready=announce, stop=stop, reuse_port=True)
    finally:
        watch.cancel()


def _supervise_workers(names: list[str], workers: int, *, listen: str | None, config_file: Path | None) -> None:
    """``muster serve … --workers N`` (N > 1): starts the workers and waits; exits with the group's code.

    Imports no gRPC: the workers are new interpreters running the same command line (without
    ``--workers``), each bound to the same port.
    """
    from muster.cli import _workers
    from muster.core import config

    settings = _settings(config, listen=listen, config_file=config_file)
    if settings.metrics_listen:
        typer.echo(
            "muster: --workers cannot share one metrics port (MUSTER_METRICS_LISTEN); "
            "export metrics over OTLP instead, or run one process per port",
            err=True,
        )
        raise typer.Exit(2)

    def announce(address: str, pids: list[int]) -> None:
        shown = "MUSTER_DATABASE_URL" if settings.database_url else "none"
        print(
            f"muster: serving {', '.join(names)} on {address} (database: {shown}) "
            f"with {len(pids)} workers, pids {' '.join(map(str, pids))}",
            flush=True,
        )

    code = _workers.run(
        _worker_argv(sys.argv[1:]),
        workers=workers,
        listen=settings.listen,
        env={},
        announce=announce,
        ready_timeout=settings.database_wait.total_seconds() + 60,
        grace=settings.grace_period.total_seconds() + 5,
    )
    if code:
        raise typer.Exit(code)


def _worker_argv(argv: list[str]) -> list[str]:
    """The parent's command line without ``--workers`` and ``--listen`` (the supervisor adds the port)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--workers", "--listen"):
            skip = True
        elif not arg.startswith(("--workers=", "--listen=")):
            out.append(arg)
    return out


@app.command()
def migrate(config_file: ConfigOpt = None) -> None:
    """Apply pending database migrations of every service (safe to run from many processes at once)."""
    uvloop, config, server = _server_imports()
    settings = _settings(config, config_file=config_file)
    server.configure_logging(settings.log_level, settings.log_format)
    if settings.database_url is None:
        typer.echo("muster: set MUSTER_DATABASE_URL=postgresql://… to migrate", err=True)
        raise typer.Exit(2)
    _dsn(config, settings)  # exits 2 with the fix when the URLs are unusable
    dsn = config.database_direct_dsn(settings)
    assert dsn is not None
    try:
        applied = uvloop.run(server.run_migrations(dsn, list(SERVICES), wait=settings.database_wait.total_seconds()))
    except (TimeoutError, OSError) as exc:
        typer.echo(f"muster: {exc}", err=True)
        raise typer.Exit(1) from None
    if applied:
        for m in applied:
            print(f"applied {m.component} {m.version:04d}_{m.name}")
    else:
        print("database is up to date")


def _dsn(config: Any, settings: Any) -> str:
    """The database URL to connect with (an encrypted password decrypted); exit 2 with the fix otherwise."""
    try:
        dsn = config.database_dsn(settings)
        config.database_direct_dsn(settings)  # checked now: a pooled URL needs a direct one
    except ValueError as exc:
        typer.echo(f"muster: {exc}", err=True)
        raise typer.Exit(2) from None
    assert dsn is not None
    return str(dsn)


def _check_security(settings: Any) -> None:
    """Refuses unusable authentication or TLS settings before anything starts (one line, exit 2)."""
    from muster.core.auth import AuthConfigError, load_security

    try:
        load_security(settings)
    except AuthConfigError as exc:
        typer.echo(f"muster: {exc}", err=True)
        raise typer.Exit(2) from None


def _mask(dsn: str) -> str:
    """A database URL without its password."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return dsn


def _register_client_commands() -> None:
    # Imported here so that `muster up`/`serve` never pay for them, and they never import the server.
    from muster.cli import agent, balancer, keys, locks, nodes, routes

    nodes.register(app)
    agent.register(app)
    locks.register(app)
    keys.register(app)
    balancer.register(app)
    routes.register(app)


_register_client_commands()


def main() -> None:
    """Entry point of the ``muster`` command.

    Ends with ``os._exit`` after flushing: gRPC's teardown at interpreter exit can crash the process
    (losing buffered output); every command has already closed its channels and stopped what it
    started by then.
    """
    code = 0
    try:
        app(prog_name="muster")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
