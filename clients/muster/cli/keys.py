"""Key commands: ``muster keys status|rotate|generate`` and ``muster encrypt-password``.

Nothing here prints key bytes: status shows fingerprints; generate writes files (mode 0600) and
prints their paths and fingerprints; encrypt-password prints only the ciphertext.
"""

from __future__ import annotations

import getpass
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from muster.cli._common import AddressOpt, JsonOpt, address_or_default, fail, print_json, run

keys_app = typer.Typer(
    name="keys",
    help="The cluster's secure cookie key and launcher key pair: status, rotation, generation.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


@keys_app.command("status")
def status(address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Show the key versions (pending, active, retiring, retired), their fingerprints, and which nodes hold which."""
    from muster.client import Cluster

    async def go() -> Any:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.key_status()

    s = run(go())
    holders: dict[int, list[int]] = {}
    for n in s.nodes:
        for v in n.acknowledged_versions:
            holders.setdefault(v, []).append(n.node_id)
    if json_:
        print_json(
            {
                "defined": s.defined,
                "grace_period_seconds": s.grace_period.total_seconds(),
                "versions": [
                    {
                        "version": v.version,
                        "state": v.state,
                        "secure_cookie_key_fingerprint": v.fingerprints.secure_cookie_key,
                        "launcher_key_fingerprint": v.fingerprints.launcher_key,
                        "create_time": _iso(v.create_time),
                        "promote_time": _iso(v.promote_time),
                        "retire_time": _iso(v.retire_time),
                        "master_key_id": v.master_key_id,
                        "nodes": holders.get(v.version, []),
                    }
                    for v in s.versions
                ],
                "nodes": [
                    {
                        "node_id": n.node_id,
                        "live": n.live,
                        "acknowledged_versions": list(n.acknowledged_versions),
                        "last_fetch_time": _iso(n.last_fetch_time),
                    }
                    for n in s.nodes
                ],
            }
        )
        return
    if not s.defined:
        print("The cluster's keys are not defined yet: the first node to start defines them.")
        return
    print(
        f"{'VERSION':>7}  {'STATE':<9} {'COOKIE KEY':<16}  {'LAUNCHER KEY':<16}  {'SINCE':<19}  {'RETIRES':<19}  NODES"
    )
    live = {n.node_id for n in s.nodes if n.live}
    for v in s.versions:
        since = v.promote_time or v.create_time
        nodes = holders.get(v.version, [])
        shown = ", ".join(str(n) for n in nodes) or "-"
        if v.state == "PENDING":
            shown += f" ({len(live & set(nodes))}/{len(live)} live nodes)"
        print(
            f"{v.version:>7}  {v.state:<9} {v.fingerprints.secure_cookie_key:<16}  {v.fingerprints.launcher_key:<16}  "
            f"{_when(since):<19}  {_when(v.retire_time):<19}  {shown}"
        )


@keys_app.command("rotate")
def rotate(address: AddressOpt = None, json_: JsonOpt = False) -> None:
    """Make a new key version; it is promoted once every live node has acknowledged holding it."""
    from muster.client import Cluster

    async def go() -> Any:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.rotate_keys(wait_for_revision=True)

    version, revision = run(go())
    if json_:
        print_json({"version": version.version, "state": version.state, "revision": revision})
        return
    print(
        f"Key version {version.version} created ({version.state.lower()}; "
        f"cookie key {version.fingerprints.secure_cookie_key}). "
        "It becomes active once every live node holds it: see `muster keys status`."
    )


@keys_app.command("generate")
def generate(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the key files in.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing key files.")] = False,
) -> None:
    """Write a fresh secure cookie key (32 random bytes) and RSA-2048 launcher key pair, mode 0600."""
    from muster.client import keyfiles

    try:
        paths = keyfiles.generate_keys(out, overwrite=force)
    except (FileExistsError, OSError) as exc:
        raise fail(str(exc)) from None
    local = keyfiles.check(paths)
    print(f"Wrote {paths.secure_cookie_key} (fingerprint {local.cookie_fingerprint})")
    print(f"Wrote {paths.launcher_key} and {paths.launcher_pub} (fingerprint {local.launcher_fingerprint})")


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise fail("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def encrypt_password(
    secure_cookie_key_file: Annotated[
        Path | None,
        typer.Option(
            "--secure-cookie-key-file",
            help="The cookie key file to derive the key from (offline); without it, the control plane encrypts "
            "with the cluster's active key.",
        ),
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Encrypt a database password (read from stdin, or prompted) for a server's configuration."""
    from muster.client import keyfiles

    password = _read_password()
    if not password:
        raise fail("no password given (on stdin or at the prompt)")
    if secure_cookie_key_file is not None:
        key, problem = keyfiles.read_cookie_key(secure_cookie_key_file)
        if problem is not None:
            raise fail(problem.message)
        if not key:
            raise fail(f"{secure_cookie_key_file} does not exist")
        print(keyfiles.encrypt_password(password, key))
        return
    from muster.client import Cluster

    async def go() -> str:
        async with Cluster.connect(address_or_default(address)) as cluster:
            return await cluster.encrypt_secret(password)

    print(run(go()))


def register(app: typer.Typer) -> None:
    """Adds the key commands to the ``muster`` command."""
    app.add_typer(keys_app)
    app.command("encrypt-password")(encrypt_password)
