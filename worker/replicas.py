"""Which replicas are alive: each says so every reclaim interval (heartbeat.lua).

Redis' own view cannot tell: on Redis 7.0 a read that returns nothing neither creates a
consumer nor resets its idle time (7.2 and Valkey reset it and report ``inactive``), so a
replica waiting on a quiet stream looks as idle as a dead one. So every replica writes its
name, scored with Redis' clock, into a sorted set next to the stream; a name seen within
``LIVE_INTERVALS`` heartbeats is alive. The pruning of dead consumers (prune_consumers.lua)
never removes a live one, and ``status`` lists them. One mechanism on every server version.

Each heartbeat also records the replica's **terms**: the protocol version it speaks and the
settings every replica of a group must share (the safety argument compares one replica's
claims, CLAIM_IDLE_MS, with another's locks, LOCK_TTL_MS). A replica that sees a live
replica on other terms does not apply anything until they agree (``Consumer``): during a
rolling upgrade to another protocol, new replicas wait until the old ones are gone.
Replicas older than this heartbeat do not say anything: stop them before starting new ones.
"""

from __future__ import annotations

import redis

from worker import scripts

HEARTBEAT = scripts.Script.load("heartbeat")

LIVE_INTERVALS = 3
"""Heartbeats a replica may miss (a slow turn, a short outage) and still count as alive."""


def replicas_key(stream: str) -> str:
    """The replicas set of ``stream``, in the stream's cluster slot: ``<stream>:replicas``
    when the stream's name has a hash tag of its own, else ``{<stream>}:replicas``. (A name
    with a '}' and no hash tag cannot be wrapped: Redis would hash another part of it.)"""
    start = stream.find("{")
    end = stream.find("}", start + 1) if start >= 0 else -1
    if end > start + 1 or "}" in stream:
        return f"{stream}:replicas"
    return f"{{{stream}}}:replicas"


def interval_s(claim_idle_ms: int) -> float:
    """The reclaim interval: how often a replica sweeps for idle entries, checks in and
    beats (CLAIM_IDLE_MS / 2, within 50 ms .. 5 s)."""
    return max(0.05, min(claim_idle_ms / 2000, 5.0))


def live_window_ms(claim_idle_ms: int) -> int:
    """How recent a heartbeat must be for its replica to count as alive: a few intervals,
    plus the longest a turn can run past a sweep (it finishes the batches in flight, whose
    busy entries may wait LOCK_WAIT_MS, at most CLAIM_IDLE_MS / 4), plus a second."""
    return int(interval_s(claim_idle_ms) * 1000 * LIVE_INTERVALS) + claim_idle_ms // 4 + 1000


PROTOCOL = 2
"""The version of the protocol between replicas (lock lanes, markers, their keys). Raise it
whenever replicas of the new code must not work beside replicas of the old."""


def terms(lock_ttl_ms: int, claim_idle_ms: int) -> str:
    """What every replica of a group must agree on, as one string."""
    return f"protocol={PROTOCOL} lock_ttl_ms={lock_ttl_ms} claim_idle_ms={claim_idle_ms}"


def terms_key(stream: str) -> str:
    return replicas_key(stream) + ":terms"


def beat(
    client: redis.Redis, stream: str, consumer: str, keep_ms: int, its_terms: str, window_ms: int
) -> dict[str, str]:
    """Say that ``consumer``'s replica is alive (now, by Redis' clock) and on what terms;
    names silent for ``keep_ms`` are dropped. Returns every live replica's terms."""
    keys = [replicas_key(stream), terms_key(stream)]
    reply = HEARTBEAT(client, keys, [consumer, keep_ms, its_terms, window_ms])
    return {_text(reply[i]): _text(reply[i + 1]) for i in range(0, len(reply), 2)}


def all_terms(client: redis.Redis, stream: str) -> dict[str, str]:
    """The terms each replica last said it works on (live or not)."""
    found: dict[bytes, bytes] = client.hgetall(terms_key(stream))  # type: ignore[assignment]
    return {_text(name): _text(terms) for name, terms in found.items()}


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def live(client: redis.Redis, stream: str, window_ms: int) -> dict[str, int]:
    """Replicas seen within ``window_ms``: name -> ms since their last heartbeat."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    key = replicas_key(stream)
    seen: list[tuple[bytes, float]] = client.zrangebyscore(
        key, now - window_ms, "+inf", withscores=True
    )  # type: ignore[assignment]
    return {name.decode(errors="replace"): now - int(at) for name, at in seen}
