"""The ``muster agent`` command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds ``muster agent`` to the ``muster`` command."""
