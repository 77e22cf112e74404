"""Placeholder: filled in by the balancer work (issue 5)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the ``muster`` command."""
