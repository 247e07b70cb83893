"""The Redis ACL a replica needs, and nothing more (README, "Least privilege").

Commands: those the worker sends and those its scripts call (Redis checks a script's calls
against the caller's ACL too), plus XDEL for ``dlq replay``/``purge``. Keys: the stream, its
dead-letter stream, the counters' keys (``sc:*``), the replicas set and the group marker.
The test suite runs every worker and command as a user made from ``rules`` (tests/conftest.py).
"""

from __future__ import annotations

from worker.replicas import replicas_key

COMMANDS = (
    # reading and acknowledging the stream, claims, the group
    "xreadgroup", "xack", "xpending", "xclaim", "xrange", "xlen", "xinfo|stream",
    "xinfo|groups", "xinfo|consumers", "xgroup|create", "xgroup|delconsumer", "xgroup|setid",
    # dead letters (xadd also for `produce`; xdel only for `dlq replay` and `dlq purge`)
    "xadd", "xdel",
    # scripts, and what they call: locks, counters, markers, the replicas set
    "eval", "get", "set", "del", "exists", "incrby", "pexpire", "pexpireat", "zadd", "zrem",
    "zrange", "zrangebyscore", "zremrangebyscore", "zscore", "zmscore", "hset", "hdel", "hget",
    "hgetall",
    # the search for deleted entries' markers, clocks, checks at start, the connection
    "scan", "time", "info", "ping", "client|setname",
)  # fmt: skip


def key_patterns(stream: str, dead_letter_stream: str) -> list[str]:
    replicas = replicas_key(stream)
    return [
        stream,
        dead_letter_stream,
        "sc:*",
        replicas,
        f"{replicas}:terms",
        "stream-counter:group:*",
    ]


def rules(stream: str, dead_letter_stream: str) -> list[str]:
    """ACL SETUSER rules (after the user name and its password) for one stream."""
    keys = [f"~{k}" for k in key_patterns(stream, dead_letter_stream)]
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in COMMANDS), *keys]
