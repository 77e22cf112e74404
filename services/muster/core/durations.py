"""Human durations: ``500ms``, ``5s``, ``2m``, ``1h30m``, or a number of seconds."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str | float | int | timedelta) -> timedelta:
    """Parses a duration such as ``500ms``, ``5s``, ``2m``, ``1h30m`` or ``2.5`` (seconds).

    Raises:
        ValueError: the text is not a duration; the message shows the accepted forms.
    """
    if isinstance(text, timedelta):
        return text
    if isinstance(text, int | float):
        return timedelta(seconds=float(text))
    s = text.strip().lower().replace(" ", "")
    try:
        return timedelta(seconds=float(s))
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not s or pos != len(s):
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 5s, 2m, 1h30m)")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """Formats a duration the way :func:`parse_duration` reads it (``1.5s``, ``2m``, ``250ms``)."""
    seconds = value.total_seconds()
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 3600:g}h" if seconds % 3600 == 0 else f"{seconds / 60:g}m"
    return f"{seconds:g}s"
