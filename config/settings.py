"""Worker configuration: environment variables prefixed ``STREAM_COUNTER_``, overridable by flags.

Settings are read once, at the edge (the CLI), and passed to everything else. Nothing below
this module reads the environment.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "STREAM_COUNTER_"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class LogLevel(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


def default_consumer_name() -> str:
    """Unique per process, readable in XINFO CONSUMERS: ``<host>-<pid>``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def redact_url(url: str) -> str:
    """The URL with its secrets replaced by ``***``: the password (a user name is kept),
    a lone token in the user part (``redis://TOKEN@host``), and a ``password=`` parameter."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if colon else f"***@{hostport}"
    query = parts.query
    if query:
        query = "&".join(
            f"{key}=***" if key.lower() == "password" else f"{key}={value}" if sep else key
            for key, sep, value in (item.partition("=") for item in query.split("&"))
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


PositiveMs = Annotated[int, Field(ge=1)]


class Described(NamedTuple):
    """One setting as the CLI's help and the README's table show it."""

    field: str
    env: str
    flag: str
    metavar: str
    shown_default: str
    meaning: str


MIN_CLAIM_IDLE_MS = 1_000
"""Below this, an ordinary stall (a slow fsync, a pause of the process) makes entries still
in hand look idle: other replicas claim them, every claim counts a delivery, and valid
events end up dead-lettered."""
MIN_LOCK_TTL_MS = 100
"""A lock must outlive one batch's lock, apply and release round trips."""
SHUTDOWN_MARGIN_MS = 1_000
"""Beyond the read and the batch in progress: handing back and leaving the group."""


class Settings(BaseSettings):
    """Everything a replica needs. Field ``x`` is set by ``STREAM_COUNTER_X`` or ``--x``.

    The bounds between fields come from the protocol; ``docs/settings.md`` derives them.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    # Each field's description is its one source: the CLI's --help and the README's
    # configuration table come from it (``describe``; tests/test_settings.py compares).
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="`redis://` or `rediss://`; the password is redacted in every log line",
        json_schema_extra={"metavar": "URL", "shown": "`redis://127.0.0.1:6379/0`"},
    )
    stream: str = Field("events", min_length=1, description="the stream to consume")
    group: str = Field(
        "stream-counter",
        min_length=1,
        description="consumer group, created from the start of the stream (`MKSTREAM`) if missing",
    )
    consumer: str = Field(
        default_factory=default_consumer_name,
        min_length=1,
        description="this replica's name, unique per process",
        json_schema_extra={"shown": "`<host>-<pid>`"},
    )
    dead_letter_stream: str | None = Field(
        None,
        description="where rejected entries go (in a cluster, give it the stream's hash tag)",
        json_schema_extra={"shown": "`<stream>:dead`"},
    )
    batch_size: int = Field(
        1000,
        ge=1,
        le=1000,
        description="entries per read, 1..1000 (the benchmark runs with 1000)",
    )
    block_ms: int = Field(
        1000,
        ge=1,
        le=60_000,
        description="how long a read waits for new entries, 1..60000 (also bounds how fast a "
        "stop is seen)",
    )
    claim_idle_ms: int = Field(
        30_000,
        ge=MIN_CLAIM_IDLE_MS,
        description="idle time after which a pending entry is claimed by another replica; at "
        "least 1000, and greater than `LOCK_TTL_MS`",
    )
    max_deliveries: int = Field(
        5, description="deliveries after which an entry is dead-lettered; at least 2"
    )
    lock_ttl_ms: int = Field(
        10_000, ge=MIN_LOCK_TTL_MS, description="lifetime of a counter lock; at least 100"
    )
    lock_wait_ms: int = Field(
        2_000,
        ge=0,
        description="longest wait for busy locks per batch; at most `CLAIM_IDLE_MS` / 4",
    )
    dedupe_window_ms: int = Field(
        86_400_000,
        ge=1_000,
        description="how long a producer's `event_id` dedupes its retries; at least 1000",
    )
    shutdown_grace_ms: int = Field(
        10_000,
        ge=0,
        description="after the first signal, exit forcibly after this long; at least "
        "`BLOCK_MS` + `LOCK_WAIT_MS` + 1000",
    )
    tls_ca_file: FilePath | None = Field(
        None,
        description="`rediss://` only: the CA certificates that verify the server (else the "
        "system's)",
        json_schema_extra={"metavar": "PATH", "shown": "system CAs"},
    )
    tls_cert_file: FilePath | None = Field(
        None,
        description="`rediss://` only: this client's certificate, for servers that ask for "
        "one; with `TLS_KEY_FILE`",
        json_schema_extra={"metavar": "PATH", "shown": "none"},
    )
    tls_key_file: FilePath | None = Field(
        None,
        description="`rediss://` only: the private key of `TLS_CERT_FILE`",
        json_schema_extra={"metavar": "PATH", "shown": "none"},
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65_535,
        description="serve Prometheus `/metrics`, `/healthz` and `/readyz` on this port (all "
        "interfaces); off when unset",
        json_schema_extra={"metavar": "PORT", "shown": "off"},
    )
    log_level: LogLevel = Field(
        LogLevel.INFO,
        description="`DEBUG` logs one line per batch",
        json_schema_extra={"metavar": "LEVEL"},
    )
    log_format: LogFormat | None = Field(
        None,
        description="`json` or `console`",
        json_schema_extra={"metavar": "FORMAT", "shown": "json unless stdout is a terminal"},
    )

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        try:
            parts = urlsplit(url)
            port = parts.port  # raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("must start with redis:// or rediss://")
        if not parts.hostname:
            raise ValueError("has no host")
        del port
        return value

    @field_validator("max_deliveries")
    @classmethod
    def _survives_a_crash(cls, value: int) -> int:
        if value < 2:
            raise ValueError(
                "must be at least 2: a crash of the replica holding an entry counts one "
                "delivery, so with 1 a valid event would be dead-lettered after any crash"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower()
            return value or None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        problems = self.conflicts()
        if problems:
            raise PydanticCustomError("settings_conflict", "\n".join(problems))
        return self

    def conflicts(self) -> list[str]:
        """One line per rule between fields that these settings break (docs/settings.md)."""
        p = ENV_PREFIX
        claim, ttl, wait = self.claim_idle_ms, self.lock_ttl_ms, self.lock_wait_ms
        problems = []
        if claim <= ttl:
            problems.append(
                f"{p}CLAIM_IDLE_MS ({claim}) must be greater than {p}LOCK_TTL_MS ({ttl}): "
                f"entries would be claimed away from a replica that still holds their lock"
            )
        if wait > claim // 4:
            problems.append(
                f"{p}LOCK_WAIT_MS ({wait}) must be at most {p}CLAIM_IDLE_MS / 4 "
                f"({claim // 4}): entries waiting for a busy lock must be claimed ours again "
                f"(every CLAIM_IDLE_MS / 3) before they look idle to other replicas"
            )
        stop = self.block_ms + wait + SHUTDOWN_MARGIN_MS
        if self.shutdown_grace_ms < stop:
            problems.append(
                f"{p}SHUTDOWN_GRACE_MS ({self.shutdown_grace_ms}) must be at least "
                f"{p}BLOCK_MS + {p}LOCK_WAIT_MS + {SHUTDOWN_MARGIN_MS} ({stop}): a clean stop "
                f"finishes the read and the batch in progress, then hands back the rest"
            )
        tls = (self.tls_ca_file, self.tls_cert_file, self.tls_key_file)
        if any(tls) and not self.redis_url.get_secret_value().startswith("rediss://"):
            problems.append(
                f"{p}TLS_* files are set but {p}REDIS_URL does not start with rediss://: "
                f"the connection would not use TLS"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append(
                f"{p}TLS_CERT_FILE and {p}TLS_KEY_FILE go together: a client certificate "
                f"needs its key"
            )
        if self.dead_letter == self.stream:
            problems.append(
                f"{p}DEAD_LETTER_STREAM ({self.dead_letter!r}) must differ from {p}STREAM: "
                f"rejected entries would be read again, forever"
            )
        return problems

    @classmethod
    def describe(cls) -> list[Described]:
        """Every setting as documented: field, environment variable, flag, metavar, default
        as shown, meaning."""
        rows = []
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            metavar = extra.get("metavar") or ("MS" if name.endswith("_ms") else "N")
            if info.annotation in (str, str | None) and "metavar" not in extra:
                metavar = "NAME"
            shown = extra.get("shown")
            if shown is None:
                default = info.default
                shown = f"`{default}`" if isinstance(default, str) else str(default)
            rows.append(
                Described(
                    name,
                    ENV_PREFIX + name.upper(),
                    "--" + name.replace("_", "-"),
                    str(metavar),
                    str(shown),
                    info.description or "",
                )
            )
        return rows

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def redacted_url(self) -> str:
        return redact_url(self.redis_url.get_secret_value())


def settings_table() -> str:
    """The README's configuration table, from the fields' descriptions."""
    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for d in Settings.describe():
        env = d.env.removeprefix(ENV_PREFIX)
        rows.append(f"| `{env}` | `{d.flag}` | {d.shown_default} | {d.meaning} |")
    return "\n".join(rows)
