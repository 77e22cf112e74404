"""Settings: flags over MUSTER_* variables over the TOML file over defaults."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from muster.core.config import load_settings
from muster.core.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("5s", 5), ("2m", 120), ("1h30m", 5400), ("2.5", 2.5), ("1d", 86400), (" 3 s ", 3)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "5x", "ms", "5s3", "-1s", "s5"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_durations_format_round_trip() -> None:
    for text in ["250ms", "5s", "2m", "1h"]:
        assert format_duration(parse_duration(text)) == text


def test_defaults_are_documented_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["MUSTER_HEARTBEAT_INTERVAL", "MUSTER_LEASE_TTL", "MUSTER_CHECK_IN_WINDOW", "MUSTER_LISTEN"]:
        monkeypatch.delenv(name, raising=False)
    s = load_settings()
    assert s.heartbeat_interval == timedelta(seconds=5)
    assert s.window == timedelta(seconds=15)
    assert s.lease_ttl == timedelta(seconds=30)
    assert s.listen == "127.0.0.1:7400"


def test_flags_beat_environment_beats_toml(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    toml = tmp_path / "muster.toml"
    toml.write_text('heartbeat_interval = "2s"\nlease_ttl = "40s"\nmax_nodes = 7\n')
    monkeypatch.setenv("MUSTER_CONFIG", str(toml))
    monkeypatch.setenv("MUSTER_LEASE_TTL", "50s")
    monkeypatch.delenv("MUSTER_HEARTBEAT_INTERVAL", raising=False)
    monkeypatch.delenv("MUSTER_MAX_NODES", raising=False)
    s = load_settings(max_nodes=9)
    assert s.heartbeat_interval == timedelta(seconds=2)  # from the file
    assert s.lease_ttl == timedelta(seconds=50)  # the variable beats the file
    assert s.max_nodes == 9  # the flag beats both
    assert s.window == timedelta(seconds=6)  # derived from the interval


def test_absurd_timing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MUSTER_CHECK_IN_WINDOW", raising=False)
    with pytest.raises(ValidationError, match="lease_ttl must be at least check_in_window"):
        load_settings(heartbeat_interval="10s", lease_ttl="5s")
    with pytest.raises(ValidationError, match="heartbeat_interval"):
        load_settings(heartbeat_interval="1ms")


def test_unknown_variable_is_warned(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MUSTER_LEASE_TLL", "5s")
    load_settings()
    assert "MUSTER_LEASE_TLL" in caplog.text


def test_an_encrypted_database_password_is_decrypted_with_the_cookie_key_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import os

    from muster.client import keyfiles
    from muster.core.config import database_dsn

    for name in list(os.environ):
        if name.startswith("MUSTER_"):
            monkeypatch.delenv(name)
    key = tmp_path / "secure-cookie-key"
    keyfiles.write_key_file(key, os.urandom(32))
    secret = "p@ss:w/rd é"
    encrypted = keyfiles.encrypt_password(secret, key.read_bytes())
    assert secret not in encrypted
    url = "postgresql://muster@db.example:5433/muster?sslmode=require"
    settings = load_settings(database_url=url, database_password=encrypted, secure_cookie_key_file=key)
    dsn = database_dsn(settings)
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(dsn)
    assert (unquote(parts.password or ""), parts.username, parts.hostname, parts.port, parts.path, parts.query) == (
        secret,
        "muster",
        "db.example",
        5433,
        "/muster",
        "sslmode=require",
    )
    # Without the key file, or with another key, it refuses and says what to do, never the password.
    with pytest.raises(ValueError, match="MUSTER_SECURE_COOKIE_KEY_FILE") as no_key:
        database_dsn(load_settings(database_url=url, database_password=encrypted))
    other = tmp_path / "other-key"
    keyfiles.write_key_file(other, os.urandom(32))
    with pytest.raises(ValueError, match="encrypt-password") as wrong:
        database_dsn(load_settings(database_url=url, database_password=encrypted, secure_cookie_key_file=other))
    for err in (no_key, wrong):
        assert secret not in str(err.value) and encrypted not in str(err.value)
    # A plain URL is used as given.
    assert database_dsn(load_settings(database_url="postgresql://u:pw@h/db")) == "postgresql://u:pw@h/db"
