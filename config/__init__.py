"""Configuration of stream-counter (pydantic-settings)."""

from config.settings import (
    ENV_PREFIX,
    LogFormat,
    LogLevel,
    Settings,
    redact_url,
    settings_table,
)

__all__ = ["ENV_PREFIX", "LogFormat", "LogLevel", "Settings", "redact_url", "settings_table"]
