"""Worker configuration: environment variables prefixed ``STREAM_COUNTER_``, overridable by flags.

Settings are read once, at the edge (the CLI), and passed to everything else. Nothing below
this module reads the environment.
"""

from __future__ import annotations

import os
import socket
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
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

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    stream: str = Field("events", min_length=1)
    group: str = Field("stream-counter", min_length=1)
    consumer: str = Field(default_factory=default_consumer_name, min_length=1)
    dead_letter_stream: str | None = None
    batch_size: int = Field(1000, ge=1, le=1000)
    block_ms: int = Field(1000, ge=1, le=60_000)
    claim_idle_ms: int = Field(30_000, ge=MIN_CLAIM_IDLE_MS)
    max_deliveries: int = 5
    lock_ttl_ms: int = Field(10_000, ge=MIN_LOCK_TTL_MS)
    lock_wait_ms: int = Field(2_000, ge=0)
    dedupe_window_ms: int = Field(86_400_000, ge=1_000)
    shutdown_grace_ms: int = Field(10_000, ge=0)
    log_level: LogLevel = LogLevel.INFO
    log_format: LogFormat | None = None

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
        if self.dead_letter == self.stream:
            problems.append(
                f"{p}DEAD_LETTER_STREAM ({self.dead_letter!r}) must differ from {p}STREAM: "
                f"rejected entries would be read again, forever"
            )
        return problems

    @property
    def dead_letter(self) -> str:
        return self.dead_letter_stream or f"{self.stream}:dead"

    @property
    def redacted_url(self) -> str:
        return redact_url(self.redis_url.get_secret_value())
