"""Operator commands on nodes: list-nodes, delete-node, node-status, reset-cluster, offline, online, watch."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``muster`` command."""
