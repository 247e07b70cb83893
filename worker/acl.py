"""The Redis ACL a replica needs, and nothing more (README, "Least privilege").

Commands: those the worker sends and those its scripts call (Redis checks a script's calls
against the caller's ACL too). An operator who repairs dead letters (``dlq replay``/``purge``)
also needs XDEL; replicas never delete an entry, so theirs lacks it. Keys: the stream, its
dead-letter stream, the counters' keys (``sc:*``), the replicas set and the group marker; the
stream names are matched literally (a ``*`` in a name grants nothing more). The test suite
runs every worker and command as users made from ``rules`` (tests/conftest.py).
"""

from __future__ import annotations

import re

from worker.replicas import replicas_key

COMMANDS = (
    # reading and acknowledging the stream, claims, the group
    "xreadgroup", "xack", "xpending", "xclaim", "xrange", "xlen", "xinfo|stream",
    "xinfo|groups", "xinfo|consumers", "xgroup|create", "xgroup|delconsumer", "xgroup|setid",
    # dead letters (xadd also for `produce`)
    "xadd",
    # scripts, and what they call: locks, counters, markers, the replicas set
    "eval", "get", "set", "del", "exists", "incrby", "pexpire", "pexpireat", "zadd", "zrem",
    "zrange", "zrangebyscore", "zremrangebyscore", "zscore", "zmscore", "hset", "hdel", "hget",
    "hgetall",
    # the search for deleted entries' markers, clocks, checks at start, the connection
    "scan", "time", "info", "ping", "client|setname",
)  # fmt: skip


OPERATOR_COMMANDS = ("xdel",)
"""What `dlq replay` and `dlq purge` need beyond a replica's commands."""


def key_patterns(stream: str, dead_letter_stream: str) -> list[str]:
    replicas = replicas_key(stream)
    literal = [stream, dead_letter_stream, replicas, f"{replicas}:terms"]
    return [*(_escaped(k) for k in literal), "sc:*", "stream-counter:group:*"]


def _escaped(key: str) -> str:
    """``key`` as an ACL pattern that matches only itself (Redis' glob-style matching)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", key)


def rules(stream: str, dead_letter_stream: str, *, operator: bool = False) -> list[str]:
    """ACL SETUSER rules (after the user name and its password) for one stream: a replica's,
    or with ``operator`` an operator's (a replica's and what `dlq` needs)."""
    commands = COMMANDS + OPERATOR_COMMANDS if operator else COMMANDS
    keys = [f"~{k}" for k in key_patterns(stream, dead_letter_stream)]
    return ["resetkeys", "resetchannels", "-@all", *(f"+{c}" for c in commands), *keys]
