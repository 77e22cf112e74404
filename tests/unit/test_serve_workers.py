"""``muster serve --workers``: the command line each worker gets."""

from __future__ import annotations

from muster.cli.main import _worker_argv


def test_a_worker_gets_the_parents_command_line_without_workers_and_listen() -> None:
    argv = ["serve", "registry", "--workers", "4", "--listen", "0.0.0.0:7400", "--lease-ttl", "10s"]
    assert _worker_argv(argv) == ["serve", "registry", "--lease-ttl", "10s"]
    assert _worker_argv(["serve", "locks", "--workers=2", "--listen=:7400"]) == ["serve", "locks"]
