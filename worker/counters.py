"""Counter keys and the fenced, exactly-once write.

Key layout: the keys of one counter share a hash tag, so they sit in one cluster slot and
one script can touch them all:

    sc:{<name>}:v        the value (a Redis integer; a missing key reads as 0)
    sc:{<name>}:lock:<consumer>
                         a lock lane (see ``lock``): held by a replica to apply entries
                         pending for it, and for those it claimed from <consumer>, that
                         consumer's lane too (docs/design-lock-lanes.md)
    sc:{<name>}:next:<consumer>
                         the replica waiting for that lane, if any (short-lived)
    sc:{<name>}:applied  entry markers, a sorted set scored by expiry time (ms):
                         'x:<stream>|<entry id>' for an entry applied, not yet acknowledged;
                         removed after XACK, else kept ENTRY_MARKER_TTL_MS (the stream is
                         part of it: several streams may feed one counter, with the same ids)
    sc:{<name>}:event_ids
                         event_id markers, the same way: 'k:<event_id>', a producer's
                         idempotency key, kept for the dedupe window
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import redis

from worker import scripts
from worker.connection import is_transient
from worker.events import Event
from worker.scripts import Call

APPLY = scripts.Script.load("counter_apply")
FINISH = scripts.Script.load("counter_finish")

ENTRY_MARKER_TTL_MS = 30 * 86_400_000
"""Life of an entry marker that is not removed after its XACK (its replica died in between,
or the XACK never came). It protects the entry from being applied again, so it must outlive
any outage in which nobody can acknowledge the entry: Redis down, every replica stopped or
cut off. Leaving the dedupe window to event_id markers alone, 30 days, whatever the window
(README, "What it guarantees")."""


def value_key(name: str) -> str:
    return f"sc:{{{name}}}:v"


def lane_key(name: str, consumer: str) -> str:
    """The lock lane of ``consumer`` on counter ``name``."""
    return f"sc:{{{name}}}:lock:{consumer}"


def waiter_key(name: str, consumer: str) -> str:
    """Who waits for the lock lane of ``consumer`` on counter ``name``."""
    return f"sc:{{{name}}}:next:{consumer}"


def applied_key(name: str) -> str:
    return f"sc:{{{name}}}:applied"


def event_ids_key(name: str) -> str:
    return f"sc:{{{name}}}:event_ids"


def entry_marker(stream: bytes, entry_id: bytes) -> bytes:
    return b"x:" + stream + b"|" + entry_id


class Written(Enum):
    APPLIED = 1
    LOCK_LOST = 0
    ALREADY_APPLIED = 2
    FAILED = 3
    NOT_APPLIED = 4
    """Probe only: none of the events has a marker."""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcome: Written
    skipped: tuple[int, ...] = ()
    """ALREADY_APPLIED: 0-based positions of the events that already have a marker."""
    error: str = ""
    """FAILED: Redis' error message (e.g. 'ERR increment or decrement would overflow')."""
    transient: bool = False
    """FAILED because Redis refuses writes for now (OOM, READONLY...), not for the entries."""


class Write(NamedTuple):
    """One counter's part of an apply call: its events."""

    name: str
    events: list[Event]
    probe: bool = False
    """Only ask which events already have a marker; write nothing."""


def apply_call(
    stream: bytes,
    token: str,
    writes: Sequence[Write],
    marker_ttl_ms: int,
    lanes: Mapping[str, Sequence[str]],
) -> Call:
    """One script call that applies each write's events (read from ``stream``) to its
    counter, each counter on its own, fenced by ``token`` on every lane key that
    ``lanes`` gives for it (see counter_apply.lua)."""
    keys: list[str] = []
    args: list[str | bytes | int] = [
        marker_ttl_ms,
        ENTRY_MARKER_TTL_MS,
        entry_marker(stream, b""),
        token,
    ]
    add_keys, add_args = keys.extend, args.extend
    for write in writes:
        name, events = write.name, write.events
        its = lanes[name]
        if len(events) == 1:  # the common case with many counters: no loops, no lists
            event = events[0]
            total = "" if write.probe else event.delta
            if event.event_id is None:
                add_keys((value_key(name), applied_key(name), *its))
                add_args((len(its), total, 1, event.entry_id, 0))
            else:
                add_keys((value_key(name), applied_key(name), event_ids_key(name), *its))
                add_args((len(its), total, 1, event.entry_id, 1, 1, event.event_id))
            continue
        add_args((len(its), "" if write.probe else sum(e.delta for e in events), len(events)))
        add_args([e.entry_id for e in events])
        eids: list[bytes | int] = []
        for position, event in enumerate(events, 1):
            if event.event_id is not None:
                eids += (position, event.event_id)
        args.append(len(eids) // 2)
        add_args(eids)
        if eids:  # its event_id markers' key only when it has some (see counter_apply.lua)
            add_keys((value_key(name), applied_key(name), event_ids_key(name), *its))
        else:
            add_keys((value_key(name), applied_key(name), *its))
    return Call(APPLY, tuple(args), tuple(keys))


def parse_apply(raw: object, writes: int) -> list[ApplyResult]:
    """One ApplyResult per write of the call (an error reply fails them all)."""
    if isinstance(raw, Exception):
        failed = ApplyResult(Written.FAILED, error=str(raw), transient=is_transient(raw))
        return [failed] * writes
    assert isinstance(raw, list), raw
    return [_parse_one(reply) for reply in raw]


_APPLIED = ApplyResult(Written.APPLIED)
_LOCK_LOST = ApplyResult(Written.LOCK_LOST)
_NOT_APPLIED = ApplyResult(Written.NOT_APPLIED)


def _parse_one(reply: int | list[Any]) -> ApplyResult:
    if reply == 1:  # the common replies are plain integers, the rare ones lists
        return _APPLIED
    if reply == 0:
        return _LOCK_LOST
    if reply == 4:
        return _NOT_APPLIED
    assert isinstance(reply, list), reply
    code = reply[0]
    if code == 2:
        return ApplyResult(Written.ALREADY_APPLIED, skipped=tuple(int(i) - 1 for i in reply[1:]))
    error = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
    return ApplyResult(Written.FAILED, error=error, transient=is_transient(error))


def finish_call(
    stream: bytes,
    token: str,
    releases: Sequence[tuple[str, Sequence[str], Sequence[bytes]]],
    lock_ttl_ms: int,
) -> Call:
    """Per (counter, lane keys taken, acknowledged entry ids): release the lanes held with
    ``token`` and, if all of them still were, remove those entries' markers, else make them
    expire LOCK_TTL_MS from now (no lane taken: always the latter); one script call (see
    counter_finish.lua)."""
    keys: list[str] = []
    args: list[str | bytes | int] = [entry_marker(stream, b""), token, lock_ttl_ms]
    for name, lanes, acked in releases:
        keys.append(applied_key(name))
        keys += lanes
        args += [len(lanes), len(acked), *acked]
    return Call.eval(FINISH, keys, args)


def expire_soon(
    client: redis.Redis, stream: bytes, markers: Mapping[str, Sequence[bytes]], lock_ttl_ms: int
) -> None:
    """Make the markers of these entries (per counter) expire LOCK_TTL_MS from now: entries
    that left the pending list without a finish that held every lane (found deleted, or
    acknowledged by a round whose reply was lost), which nobody can still be writing by
    then (counter_finish.lua with no lane)."""
    no_lanes: list[str] = []
    releases = [(name, no_lanes, ids) for name, ids in markers.items() if ids]
    if not releases:
        return
    call = finish_call(stream, "", releases, lock_ttl_ms)
    reply = FINISH(client, call.keys, call.args)
    errors = [r for r in reply if isinstance(r, bytes)]
    if errors:
        raise redis.ResponseError(errors[0].decode(errors="replace"))


def read_values(client: redis.Redis, names: Sequence[str]) -> dict[str, int]:
    """Current values, in one round trip; a counter never written reads as 0.

    Raises ValueError naming the counter if its key holds something else than an integer.
    """
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.get(value_key(name))
    results = pipe.execute(raise_on_error=False)
    values: dict[str, int] = {}
    for name, raw in zip(names, results, strict=True):
        try:
            if isinstance(raw, Exception):
                raise ValueError(str(raw))
            values[name] = 0 if raw is None else int(raw)
        except ValueError as exc:
            raise ValueError(f"counter {name!r} does not hold an integer ({exc})") from None
    return values
