"""Input checks shared by the servicers. Each raises InvalidArgumentError naming the field."""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from muster.core.errors import InvalidArgumentError

_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
# A node carrying this label takes at most that many sessions (the balancer's capacity limit).
CAPACITY_LABEL = "muster.io/max-sessions"
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
MAX_PAGE_SIZE = 10_000
DEFAULT_PAGE_SIZE = 1_000
MAX_LABELS_BYTES = 64 * 1024
MAX_ID = 2**62


def host(field: str, value: str) -> str:
    """A host name (RFC 1123) or an IP literal."""
    if not value:
        raise InvalidArgumentError(field, "is required (a host name or IP address)")
    if len(value) > 253:
        raise InvalidArgumentError(field, "is longer than 253 characters")
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if (
        not all(_HOST_LABEL.match(label) for label in labels)
        or value[-1:].isdigit()
        and all(label.isdigit() for label in labels)
    ):
        raise InvalidArgumentError(field, f"{value[:80]!r} is neither a host name nor an IP address")
    return value.rstrip(".").lower()


def fingerprint(field: str, value: str) -> str:
    """A key fingerprint: empty, or 16 lowercase hex digits."""
    if value and not _FINGERPRINT.match(value):
        raise InvalidArgumentError(field, "must be empty or 16 lowercase hex digits (a fingerprint)")
    return value


def ipv4(field: str, value: str) -> str:
    """An optional IPv4 address."""
    if not value:
        return ""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidArgumentError(field, f"{value[:80]!r} is not an IPv4 address") from None


def port(field: str, value: int) -> int:
    """A TCP port, 1..65535."""
    if not 1 <= value <= 65535:
        raise InvalidArgumentError(field, f"must be between 1 and 65535, got {value}")
    return value


def positive_id(field: str, value: int) -> int:
    """An id: a positive integer."""
    if not 0 < value < MAX_ID:
        raise InvalidArgumentError(field, f"must be a positive id, got {value}")
    return value


def enum_value(field: str, value: int, allowed: Mapping[int, Any]) -> Any:
    """A known, non-zero enum value."""
    if value not in allowed:
        names = ", ".join(str(getattr(v, "name", v)) for v in allowed.values())
        raise InvalidArgumentError(field, f"unknown value {value}; use one of {names}")
    return allowed[value]


def labels(field: str, value: Mapping[str, str]) -> dict[str, str]:
    """Placement labels: keys like Kubernetes label keys, values up to 256 characters, 64 KiB in all."""
    total = 0
    for k, v in value.items():
        total += len(k) + len(v)
        if total > MAX_LABELS_BYTES:
            raise InvalidArgumentError(field, f"labels exceed {MAX_LABELS_BYTES} bytes in all")
        if not _LABEL_KEY.match(k):
            raise InvalidArgumentError(field, f"key {k[:64]!r} must be 1-63 characters: letters, digits, ._/-")
        if len(v) > 256:
            raise InvalidArgumentError(field, f"value of {k!r} is longer than 256 characters")
        if k == CAPACITY_LABEL and not (v.isdigit() and 1 <= int(v) <= 1_000_000):
            raise InvalidArgumentError(field, f"{CAPACITY_LABEL} must be a whole number of sessions, 1 to 1000000")
    if len(value) > 64:
        raise InvalidArgumentError(field, "at most 64 labels")
    return dict(value)


def request_id(field: str, value: str) -> str:
    """An optional idempotency key of up to 128 printable characters."""
    if len(value) > 128 or not value.isprintable():
        raise InvalidArgumentError(field, "must be at most 128 printable characters")
    return value


def finite(field: str, value: float, *, low: float, high: float) -> float:
    """A finite number within [low, high]."""
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgumentError(field, f"must be a number between {low:g} and {high:g}, got {value}")
    return value


def integer(field: str, value: int, *, low: int, high: int) -> int:
    """An integer within [low, high]."""
    if not low <= value <= high:
        raise InvalidArgumentError(field, f"must be between {low} and {high}, got {value}")
    return value


def page_size(field: str, value: int) -> int:
    """0 for the default, else 1..10,000."""
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return integer(field, value, low=1, high=MAX_PAGE_SIZE)


def encode_token(data: dict[str, Any]) -> str:
    """An opaque page token."""
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode()


def decode_token(field: str, token: str, keys: tuple[str, ...]) -> dict[str, int] | None:
    """Reads a page token made by :func:`encode_token`; None for an empty token."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(data, dict) or any(not isinstance(data.get(k), int) for k in keys):
            raise ValueError
        return {k: int(data[k]) for k in keys}
    except ValueError:
        raise InvalidArgumentError(field, "is not a token from a previous response") from None
