"""Server settings: flags over ``MUSTER_*`` variables over a TOML file over defaults."""

from __future__ import annotations

import logging
import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from muster.core.durations import parse_duration

log = logging.getLogger(__name__)

ENV_PREFIX = "MUSTER_"
DEFAULT_LISTEN = "127.0.0.1:7400"


def default_data_dir() -> Path:
    """Where ``muster up`` keeps its embedded database: ``/var/lib/muster`` for root, else the user's data dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/muster")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "muster"


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the optional TOML file named by ``config_file`` (flag) or ``MUSTER_CONFIG``."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
            self._data = {k.replace("-", "_"): v for k, v in raw.get("muster", raw).items()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    """Every server option. Each is a flag (``--lease-ttl``), a variable (``MUSTER_LEASE_TTL``),
    or a key of the TOML file (``lease_ttl = "30s"``), in that order of precedence."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    config_file: Path | None = Field(None, description="TOML file with any of these options.")
    database_url: SecretStr | None = Field(
        None, description="postgresql://… ; unset: the embedded PostgreSQL in the data directory."
    )
    database_password: SecretStr | None = Field(
        None,
        description="The database password, overriding database_url's; may be encrypted (muster encrypt-password).",
    )
    database_pooled: bool = Field(
        False,
        description="database_url goes through a pooler in transaction mode (PgBouncer): no prepared statements "
        "or session settings on it; LISTEN and migrations then use database_direct_url.",
    )
    database_direct_url: SecretStr | None = Field(
        None,
        description="postgresql://… reaching PostgreSQL itself (not a transaction pooler), for the LISTEN "
        "connection and migrations; unset: database_url.",
    )
    secure_cookie_key_file: Path | None = Field(
        None, description="The cookie key file that decrypts an encrypted database password (and its .d/ versions)."
    )
    listen: str = Field(DEFAULT_LISTEN, description="host:port to serve gRPC on (port 0: any free port).")
    data_dir: Path = Field(default_factory=default_data_dir, description="Where the embedded database lives.")
    heartbeat_interval: timedelta = Field(timedelta(seconds=5), description="How often nodes heartbeat.")
    check_in_window: timedelta | None = Field(
        None, description="No heartbeat for this long: MISSED_CHECK_IN (default 3 heartbeat intervals)."
    )
    lease_ttl: timedelta = Field(timedelta(seconds=30), description="No heartbeat for this long: OFFLINE.")
    max_nodes: int = Field(0, ge=0, description="The cluster's node limit (0: none).")
    reap_interval: timedelta = Field(timedelta(seconds=1), description="How often leases are swept.")
    lock_sweep_interval: timedelta = Field(
        timedelta(milliseconds=100), description="How often expired locks, waiters and claims are swept."
    )
    max_outage_credit: timedelta = Field(
        timedelta(minutes=10), description="At most this much database outage is credited to leases."
    )
    outage_threshold: timedelta = Field(
        timedelta(seconds=2), description="A gap between clock ticks longer than this is an outage."
    )
    event_retention: timedelta = Field(timedelta(hours=1), description="Events are kept at least this long.")
    event_retention_events: int = Field(100_000, ge=1, description="The newest N events are always kept.")
    compaction_interval: timedelta = Field(timedelta(seconds=10), description="How often old events are compacted.")
    progress_interval: timedelta = Field(timedelta(seconds=5), description="Idle watch streams get a mark this often.")
    poll_interval: timedelta = Field(timedelta(seconds=1), description="Fallback poll for lost notifications.")
    stream_max_lag: int = Field(10_000, ge=1, description="A watcher this many events behind is cut.")
    stream_write_timeout: timedelta = Field(timedelta(seconds=10), description="A watcher not reading is cut.")
    heartbeat_batch_window: timedelta = Field(
        timedelta(milliseconds=5),
        description="Ignored: heartbeats go through the group commit, which has no window (kept so configs load).",
    )
    grace_period: timedelta = Field(timedelta(seconds=10), description="How long shutdown waits for RPCs.")
    pool_min_size: int = Field(2, ge=1)
    pool_max_size: int = Field(20, ge=1)
    database_wait: timedelta = Field(timedelta(seconds=60), description="How long start waits for the database.")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: str = Field("text", description="text, or json (one object per line, with trace and span ids).")
    metrics_listen: str | None = Field(None, description="host:port to serve Prometheus metrics on (/metrics).")
    embedded_fsync: bool = Field(True, description="fsync in the embedded database (turn off only for tests).")
    # Authentication and TLS (muster.core.auth): tokens by variable, TOML or 0600 file; never by flag.
    node_token: SecretStr | None = Field(None, description="Token nodes present (joins, heartbeats, key fetch).")
    admin_token: SecretStr | None = Field(None, description="Token for admin RPCs (delete, reset, drain, rotate).")
    node_token_file: Path | None = Field(None, description="File holding the node token (first line; mode 0600).")
    admin_token_file: Path | None = Field(None, description="File holding the admin token (first line; mode 0600).")
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain: serve TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(None, description="PEM CA of client certificates: require mTLS.")
    allow_unauthenticated: bool = Field(
        False, description="Run without tokens or mTLS on a non-loopback address (behind a mesh that authenticates)."
    )

    # The registry's calls to the keys service (to check joining nodes' key fingerprints).
    keys_address: str | None = Field(
        None, description="host:port of the keys service, when it does not run in the registry's process."
    )
    keys_tls_ca_file: Path | None = Field(
        None, description="PEM CA of the keys service's certificate: call it over TLS."
    )

    # The registry's calls to the balancer (a node's sessions: counts, and moving them on a forced delete).
    balancer_address: str | None = Field(
        None, description="host:port of the balancer, when it does not run in the registry's process."
    )
    balancer_tls_ca_file: Path | None = Field(
        None, description="PEM CA of the balancer's certificate: call it over TLS."
    )

    # The balancer (muster.balancer).
    registry_address: str | None = Field(
        None, description="host:port of the registry the balancer follows (default: this server's own address)."
    )
    registry_tls_ca_file: Path | None = Field(
        None, description="PEM CA of the registry's certificate: call it over TLS."
    )
    balancer_custom: str | None = Field(
        None, description="The custom strategy: a module:function entry point, or an executable (and its arguments)."
    )
    balancer_custom_timeout: timedelta = Field(
        timedelta(seconds=1), description="How long the custom strategy may take before `sessions` decides."
    )
    balancer_diagnostics: str | None = Field(
        None, description="Log each placement decision as a JSON line: `stderr` or a file path."
    )
    placement_ttl: timedelta = Field(
        timedelta(minutes=2), description="A placement never reported started is ended after this long."
    )

    # The keys service (muster.keys): the master key that seals keys at rest, and the rotation grace.
    master_key_file: Path | None = Field(None, description="File holding the 32-byte master key (mode 0600).")
    master_key: SecretStr | None = Field(None, description="The master key, base64 of 32 bytes (MUSTER_MASTER_KEY).")
    key_grace_period: timedelta = Field(
        timedelta(hours=1), description="A replaced key version stays accepted this long after the new one's promotion."
    )

    @field_validator("key_grace_period", mode="before")
    @classmethod
    def _key_duration(cls, value: Any) -> Any:
        return parse_duration(value)

    @field_validator(
        "heartbeat_interval",
        "check_in_window",
        "lease_ttl",
        "reap_interval",
        "lock_sweep_interval",
        "max_outage_credit",
        "outage_threshold",
        "event_retention",
        "compaction_interval",
        "progress_interval",
        "poll_interval",
        "stream_write_timeout",
        "heartbeat_batch_window",
        "balancer_custom_timeout",
        "placement_ttl",
        "grace_period",
        "database_wait",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in ("text", "json"):
            raise ValueError("log_format must be text or json")
        return value

    @model_validator(mode="after")
    def _timing_is_sane(self) -> Settings:
        hb = self.heartbeat_interval
        if not timedelta(milliseconds=50) <= hb <= timedelta(hours=1):
            raise ValueError("heartbeat_interval must be between 50ms and 1h")
        if self.check_in_window is None:
            object.__setattr__(self, "check_in_window", hb * 3)
        if self.check_in_window < hb:
            raise ValueError("check_in_window must be at least heartbeat_interval")
        if self.lease_ttl < self.check_in_window:
            raise ValueError("lease_ttl must be at least check_in_window")
        if self.heartbeat_batch_window > timedelta(milliseconds=50):
            raise ValueError("heartbeat_batch_window must be at most 50ms")
        if self.progress_interval < timedelta(milliseconds=100):
            raise ValueError("progress_interval must be at least 100ms")
        return self

    @property
    def window(self) -> timedelta:
        """The check-in window, resolved."""
        assert self.check_in_window is not None
        return self.check_in_window

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init = init_settings()
        path = (
            init.get("config_file")
            or os.environ.get(ENV_PREFIX + "CONFIG_FILE")
            or os.environ.get(ENV_PREFIX + "CONFIG")
        )
        return init_settings, env_settings, _TomlSource(settings_cls, Path(path) if path else None)


def database_dsn(settings: Settings) -> str | None:
    """``database_url`` with ``database_password`` in it, an encrypted password decrypted.

    A password (in ``database_password`` or in the URL) written ``muster:v1:<fingerprint>:<data>``
    (``muster encrypt-password``) is decrypted with ``secure_cookie_key_file`` or one of its
    ``<file>.d/`` versions.

    Raises:
        ValueError: an encrypted password without a key file that decrypts it (the message says
            what to set; it never carries the password).
    """
    if settings.database_url is None:
        return None
    return _with_password(settings.database_url.get_secret_value(), settings)


def database_direct_dsn(settings: Settings) -> str | None:
    """The URL for LISTEN and migrations (``database_direct_url``, else ``database_url``), as :func:`database_dsn`.

    Raises:
        ValueError: as :func:`database_dsn`; also when ``database_pooled`` is on without a direct URL
            (LISTEN does not work through a transaction pooler).
    """
    if settings.database_direct_url is None:
        if settings.database_pooled:
            raise ValueError(
                "database_pooled is on but database_direct_url is unset: LISTEN does not work through a "
                "transaction pooler; set MUSTER_DATABASE_DIRECT_URL to a URL that reaches PostgreSQL itself"
            )
        return database_dsn(settings)
    return _with_password(settings.database_direct_url.get_secret_value(), settings)


def _with_password(url: str, settings: Settings) -> str:
    from urllib.parse import quote, unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    password = (
        settings.database_password.get_secret_value()
        if settings.database_password is not None
        else unquote(parts.password or "")
    )
    from muster.api import rules

    if rules.is_encrypted_password(password):
        if settings.secure_cookie_key_file is None:
            raise ValueError(
                "the database password is encrypted (muster encrypt-password): set MUSTER_SECURE_COOKIE_KEY_FILE "
                "to the cookie key file it was encrypted with"
            )
        try:
            password = rules.decrypt_password(password, rules.cookie_key_candidates(settings.secure_cookie_key_file))
        except ValueError as exc:
            raise ValueError(
                f"cannot decrypt the database password with {settings.secure_cookie_key_file}: {exc}; encrypt it "
                "again with `muster encrypt-password`"
            ) from None
    elif settings.database_password is None:
        return url
    user = quote(unquote(parts.username or ""), safe="")
    hosts = parts.netloc.rpartition("@")[2]  # kept as written: one host or several (h1:5432,h2:5432)
    netloc = f"{user}:{quote(password, safe='')}@{hosts}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def load_settings(**flags: Any) -> Settings:
    """Builds the settings from flags (``None`` means "not given"), the environment and the TOML file.

    Unknown ``MUSTER_*`` variables are logged as warnings, so a typo does not pass silently.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields} | {
        ENV_PREFIX + "CONFIG",
        ENV_PREFIX + "ADDRESS",
        ENV_PREFIX + "TEST_DATABASE_URL",
        ENV_PREFIX + "TEST_LOOP",
        ENV_PREFIX + "WORKERS",  # `muster serve --workers`
        ENV_PREFIX + "WORKER_OF",  # set by the --workers parent in each worker's environment
        # The agent's and the commands' variables (read by muster.client, not the server).
        *(
            ENV_PREFIX + n
            for n in (
                "HOST_NAME",
                "LISTEN_ADDRESS",
                "PORT",
                "LABELS",
                "STATE_DIR",
                "DELETE_NODE_ON_EXIT",
                "TOKEN",
                "KEYS_DIR",
                "SECURE_COOKIE_KEY_FILE",
                "LAUNCHER_KEY_FILE",
                "LAUNCHER_PUB_FILE",
                "LOCKS_ADDRESS",
                "BALANCER_ADDRESS",
            )
        ),
        *(ENV_PREFIX + n for n in ("TLS", "TLS_CA_FILE", "TLS_CLIENT_CERT_FILE", "TLS_CLIENT_KEY_FILE")),
    }
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            log.warning("unknown variable %s ignored", name, extra={"event": "unknown_env"})
    return Settings(**{k: v for k, v in flags.items() if v is not None})
