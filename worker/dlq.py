"""``stream-counter dlq``: list, show, replay and purge dead-lettered entries.

A dead-letter entry holds the original fields, then ``error`` (why) and ``source_id`` (its
id on the source stream), as deadletter.lua wrote it. Replaying moves an entry back onto
its source stream with its original fields (a new id; an ``event_id`` still dedupes) and
deletes it from the dead-letter stream, atomically per entry (dlq_replay.lua).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from worker import scripts

REPLAY = scripts.Script.load("dlq_replay")
ADDED = (b"error", b"source_id")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    source_id: str
    error: str
    fields: list[tuple[str, str]]
    """The original fields, in order (repeats kept)."""

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_id": self.source_id,
            "error": self.error,
            "fields": [list(pair) for pair in self.fields],
        }


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


def _parse(entry_id: bytes, flat: list[bytes]) -> DeadLetter:
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
    error = source = b""
    if len(pairs) >= 2 and (pairs[-2][0], pairs[-1][0]) == ADDED:
        error, source = pairs[-2][1], pairs[-1][1]
        pairs = pairs[:-2]
    fields = [(_text(k), _text(v)) for k, v in pairs]
    return DeadLetter(_text(entry_id), _text(source), _text(error), fields)


def entries(client: redis.Redis, dead: str, limit: int | None = None) -> list[DeadLetter]:
    """The dead-letter stream's entries, oldest first (at most ``limit``)."""
    reply = scripts.raw(client, "XRANGE", dead, "-", "+", *(("COUNT", limit) if limit else ()))
    return [_parse(i, flat) for i, flat in reply]


def show(client: redis.Redis, dead: str, entry_id: str) -> DeadLetter | None:
    reply = scripts.raw(client, "XRANGE", dead, entry_id, entry_id)
    return _parse(reply[0][0], reply[0][1]) if reply else None


@dataclass(slots=True)
class Replayed:
    moved: list[tuple[str, str]]
    """(dead-letter id, new id on the source stream) of each entry put back."""
    missing: list[str]
    truncated: list[str]
    """Refused: dead-lettered with only its first 1,000 fields (see dlq_replay.lua)."""


def replay(client: redis.Redis, dead: str, source: str, ids: Sequence[str]) -> Replayed:
    """Move ``ids`` back onto ``source``, 1,000 ids per script call (each entry atomically)."""
    done = Replayed([], [], [])
    for i in range(0, len(ids), 1000):
        moved, missing, truncated = REPLAY(client, [dead, source], list(ids[i : i + 1000]))
        done.moved += [(_text(a), _text(b)) for a, b in moved]
        done.missing += [_text(x) for x in missing]
        done.truncated += [_text(x) for x in truncated]
    return done


def ids(client: redis.Redis, dead: str, before_ms: int | None = None) -> list[str]:
    """Every id of the dead-letter stream, or those dead-lettered before ``before_ms`` (a
    Unix time in ms), read 1,000 at a time."""
    end = "+" if before_ms is None else f"({before_ms}-0"
    found: list[str] = []
    start = "-"
    while True:
        page = scripts.raw(client, "XRANGE", dead, start, end, "COUNT", 1000)
        found += [_text(entry_id) for entry_id, _ in page]
        if len(page) < 1000:
            return found
        start = "(" + found[-1]


def older_than(client: redis.Redis, dead: str, ms: int) -> list[str]:
    """Ids of the entries dead-lettered more than ``ms`` ago (by Redis' clock)."""
    seconds, micros = client.time()
    return ids(client, dead, seconds * 1000 + micros // 1000 - ms)


def purge(client: redis.Redis, dead: str, ids: Sequence[str]) -> int:
    """Delete ``ids`` from the dead-letter stream; returns how many were there."""
    return sum(int(client.xdel(dead, *ids[i : i + 1000])) for i in range(0, len(ids), 1000))


_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: str) -> int:
    """'90s', '15m', '12h', '7d', '500ms' -> milliseconds. Raises ValueError in words."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s|m|h|d)\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 90s, 15m, 12h, 7d)")
    return int(match[1]) * _UNITS[match[2]]
