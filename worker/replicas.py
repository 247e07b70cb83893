"""Which replicas are alive: each says so every reclaim interval (heartbeat.lua).

Redis' own view cannot tell: on Redis 7.0 a read that returns nothing neither creates a
consumer nor resets its idle time (7.2 and Valkey reset it and report ``inactive``), so a
replica waiting on a quiet stream looks as idle as a dead one. So every replica writes its
name, scored with Redis' clock, into a sorted set next to the stream; a name seen within
``LIVE_INTERVALS`` heartbeats is alive. The pruning of dead consumers (prune_consumers.lua)
never removes a live one, and ``status`` lists them. One mechanism on every server version.
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


def live_window_ms(interval_s: float) -> int:
    """How recent a heartbeat must be for its replica to count as alive."""
    return int(interval_s * 1000 * LIVE_INTERVALS) + 1000


def beat(client: redis.Redis, stream: str, consumer: str, keep_ms: int) -> None:
    """Say that ``consumer``'s replica is alive (now, by Redis' clock); names silent for
    ``keep_ms`` are dropped."""
    HEARTBEAT(client, [replicas_key(stream)], [consumer, keep_ms])


def live(client: redis.Redis, stream: str, window_ms: int) -> dict[str, int]:
    """Replicas seen within ``window_ms``: name -> ms since their last heartbeat."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    key = replicas_key(stream)
    seen: list[tuple[bytes, float]] = client.zrangebyscore(
        key, now - window_ms, "+inf", withscores=True
    )  # type: ignore[assignment]
    return {name.decode(errors="replace"): now - int(at) for name, at in seen}
