"""Logging: structlog, JSON lines when stdout is not a terminal, coloured console otherwise.

Secrets never reach a log line: settings are logged through ``Settings.redacted_url``, and
as a safety net every string value is scrubbed of URL passwords (``scheme://user:pw@``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from config import LogFormat, Settings

# The user part of a URL (greedy up to the last '@' of the word: a password may contain
# '@'), and password= parameters.
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)(\S+)@", re.IGNORECASE)
_PASSWORD_PARAM = re.compile(r"(\bpassword=)[^&\s'\"]+", re.IGNORECASE)
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


def scrub(text: str) -> str:
    def userinfo(match: re.Match[str]) -> str:
        user, colon, _ = match.group(2).partition(":")
        return f"{match.group(1)}{user}:***@" if colon else f"{match.group(1)}***@"

    return _PASSWORD_PARAM.sub(r"\1***", _URL_USERINFO.sub(userinfo, text))


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and ("://" in value or "password=" in value.lower()):
            event[key] = scrub(value)
    return event


def configure(
    settings: Settings, stream: TextIO | None = None
) -> structlog.typing.FilteringBoundLogger:
    """Configure structlog for this process and return the worker's logger."""
    out = stream or sys.stdout
    fmt = settings.log_format
    if fmt is None:
        fmt = LogFormat.CONSOLE if out.isatty() else LogFormat.JSON
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt is LogFormat.JSON
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level.value]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    log: structlog.typing.FilteringBoundLogger = structlog.get_logger("stream-counter")
    return log.bind(consumer=settings.consumer)
