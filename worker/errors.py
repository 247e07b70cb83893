"""The one exception hierarchy of stream-counter, and the process exit codes.

    StreamCounterError            base of everything we raise on purpose
    ├── InvalidEvent              an entry that breaks the event contract; it is dead-lettered
    ├── RedisUnsupported          the server cannot run us (Redis < 7.0, the stream key holds
    │   │                         another type, authentication refused); ExitCode.REDIS
    │   └── EvictingRedis         its maxmemory-policy may evict keys: refused at start
    │                             (ExitCode.REDIS); found later, the worker stops applying
    │                             and waits until it is noeviction again
    └── GroupDeleted              the consumer group was deleted after it had been created:
                                  recreating it from the start would count everything
                                  again, so the worker waits for an operator

Redis' own errors (redis.exceptions.*) are not wrapped: connection errors are retried by
the consumer loop, and a write error on a counter is recorded as the entry's failure reason.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """Stopped on request (SIGTERM/SIGINT) after finishing or handing back its batch."""
    FAILURE = 1
    """An unexpected error; the traceback is logged."""
    CONFIG = 2
    """Invalid configuration or usage, detected before touching Redis."""
    REDIS = 3
    """Redis cannot run us: version < 7.0, authentication, wrong key type, an evicting
    maxmemory-policy."""
    FORCED = 4
    """A second signal, or the shutdown grace period ran out."""
    UNAVAILABLE = 5
    """``get``/``produce`` could not reach Redis (``run`` waits and retries instead)."""


class StreamCounterError(Exception):
    """Base class of every error stream-counter raises on purpose."""


class InvalidEvent(StreamCounterError):
    """A stream entry breaks the event contract; ``reason`` goes to the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RedisUnsupported(StreamCounterError):
    """The Redis server cannot run this worker (and retrying will not change that)."""


class EvictingRedis(RedisUnsupported):
    """Redis' maxmemory-policy lets it evict keys: markers, counters or locks could vanish."""


class ReplicasDisagree(StreamCounterError):
    """A live replica of the group works on other terms (protocol version, LOCK_TTL_MS,
    CLAIM_IDLE_MS): nothing is applied until they agree (``worker.replicas``)."""

    def __init__(self, others: dict[str, str], ours: str) -> None:
        self.others, self.ours = others, ours
        shown = "; ".join(f"{name}: {terms}" for name, terms in sorted(others.items()))
        super().__init__(f"ours: {ours}; theirs: {shown}")


class GroupDeleted(StreamCounterError):
    """The consumer group existed and was deleted (XGROUP DESTROY), while the stream's
    history may already be counted. The worker does not recreate it from the start."""
