"""The Lua scripts on a real Redis: fenced exactly-once apply, finish, reload, dead-letter."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import apply_events, bookkeeping_keys, run_calls, take_locks

from worker import counters, deadletter
from worker.counters import (
    ApplyResult,
    Written,
    applied_key,
    event_ids_key,
    lane_key,
    value_key,
)
from worker.deadletter import Rejected
from worker.events import Event
from worker.lock import Locks
from worker.scripts import Call, Pipe, Round, Script

NAME = "hits"
SRC = b"events"  # the stream the entries came from (part of entry markers)
V, LOCK, APPLIED = value_key(NAME), lane_key(NAME, "me"), applied_key(NAME)
EVENT_IDS = event_ids_key(NAME)
LANES = {NAME: [LOCK]}
TTL_MS = 60_000
LOCK_TTL_MS = 10_000
I64 = 2**63 - 1


def ev(n: int, delta: int = 1, event_id: str | None = None) -> Event:
    return Event(f"{n}-0".encode(), NAME, delta, None if event_id is None else event_id.encode())


def take_lock(r: redis.Redis) -> str:
    return take_locks(r, Locks(10_000), [LOCK])[LOCK]


def apply(r: redis.Redis, token: str, events: list[Event], ttl_ms: int = TTL_MS) -> ApplyResult:
    return apply_events(r, NAME, token, events, ttl_ms, stream=SRC)


def finish(r: redis.Redis, token: str, events: list[Event], lanes: list[str] | None = None) -> int:
    ids = [e.entry_id for e in events]
    call = counters.finish_call(SRC, token, [(NAME, lanes or [LOCK], ids)], LOCK_TTL_MS)
    (raw,) = run_calls(r, [call])
    (reply,) = raw
    return int(reply)


def markers(r: redis.Redis) -> dict[bytes, float]:
    """Entry markers and event_id markers (two keys), with their expiry times."""
    found = dict(r.zrange(APPLIED, 0, -1, withscores=True))
    return found | dict(r.zrange(EVENT_IDS, 0, -1, withscores=True))


def state(r: redis.Redis) -> tuple[object, ...]:
    """Everything the apply script may write."""
    return r.type(V), r.dump(V), markers(r)


@pytest.fixture
def earlier(r: redis.Redis) -> None:
    """A counter that already has a value (5) and markers from an earlier apply."""
    token = take_lock(r)
    assert apply(r, token, [ev(1, 5, "first")]).outcome is Written.APPLIED
    r.delete(LOCK)


@pytest.mark.usefixtures("earlier")
@pytest.mark.parametrize("holder", [None, "someone-else"])
def test_apply_without_holding_the_lock_is_refused_and_writes_nothing(
    r: redis.Redis, holder: str | None
) -> None:
    if holder is not None:
        r.set(LOCK, holder)
    before = state(r)
    result = apply(r, "my-stale-token", [ev(2, 7), ev(3, 1, "new")])
    assert result.outcome is Written.LOCK_LOST
    assert state(r) == before
    assert r.get(V) == b"5"


def test_apply_with_a_token_whose_lock_expired_and_was_retaken_is_refused(r: redis.Redis) -> None:
    stale = take_locks(r, Locks(50), [LOCK])[LOCK]
    time.sleep(0.12)
    fresh = take_lock(r)
    assert apply(r, stale, [ev(1, 3)]).outcome is Written.LOCK_LOST
    assert r.exists(V, APPLIED) == 0
    assert r.get(LOCK) == fresh.encode()


def test_apply_with_the_lock_adds_the_exact_sum_and_markers_with_a_ttl(r: redis.Redis) -> None:
    token = take_lock(r)
    before_ms = r.time()[0] * 1000
    result = apply(r, token, [ev(1, 4), ev(2, -1, "ev-a"), ev(3, 10)])
    assert result.outcome is Written.APPLIED
    assert r.get(V) == b"13"
    got = markers(r)
    assert set(got) == {b"x:events|1-0", b"x:events|2-0", b"k:ev-a", b"x:events|3-0"}
    for member, score in got.items():  # expiry time in ms: the window, or an entry's life
        life = TTL_MS if member.startswith(b"k:") else counters.ENTRY_MARKER_TTL_MS
        assert before_ms + life - 1_000 <= score <= before_ms + life + 2_000
    assert 0 < r.pttl(APPLIED) <= counters.ENTRY_MARKER_TTL_MS
    assert r.get(LOCK) == token.encode()  # apply does not release the lock


EXACT = [  # start value, deltas of one apply, expected value
    (None, [I64, -(I64 - 1)], 1), (None, [2**53 + 1], 2**53 + 1), (I64 - 1, [1], I64),
    (-I64, [-1], -(2**63)), (2**53, [1, 1, 1], 2**53 + 3),
]  # fmt: skip


@pytest.mark.parametrize(("start", "deltas", "expected"), EXACT)
def test_apply_is_exact_beyond_double_precision(
    r: redis.Redis, start: int | None, deltas: list[int], expected: int
) -> None:
    if start is not None:
        r.set(V, start)
    token = take_lock(r)
    result = apply(r, token, [ev(i + 1, d) for i, d in enumerate(deltas)])
    assert result.outcome is Written.APPLIED
    assert r.get(V) == str(expected).encode()


def test_reapplying_the_same_entries_is_already_applied_and_writes_nothing(r: redis.Redis) -> None:
    token = take_lock(r)
    assert apply(r, token, [ev(1, 2), ev(2, 3, "k2"), ev(3, 4)]).outcome is Written.APPLIED
    before = state(r)
    again = apply(r, token, [ev(1, 2), ev(2, 3, "k2"), ev(3, 4)])
    assert again.outcome is Written.ALREADY_APPLIED
    assert again.skipped == (0, 1, 2)  # each once, though ev 2 has two markers
    mixed = apply(r, token, [ev(9, 100), ev(3, 4), ev(8, 100), ev(1, 2)])
    assert mixed.outcome is Written.ALREADY_APPLIED
    assert mixed.skipped == (1, 3)
    assert state(r) == before
    assert r.get(V) == b"9"


def test_event_id_retry_under_a_new_entry_id_is_already_applied(r: redis.Redis) -> None:
    token = take_lock(r)
    assert apply(r, token, [ev(1, 5, "order-17")]).outcome is Written.APPLIED
    assert finish(r, token, [ev(1)]) == 1  # entry marker cleared, event_id marker stays
    token = take_lock(r)
    before = state(r)
    result = apply(r, token, [ev(2, 1), ev(3, 5, "order-17"), ev(4, 1, "order-18")])
    assert result.outcome is Written.ALREADY_APPLIED
    assert result.skipped == (1,)
    assert state(r) == before
    assert r.get(V) == b"5"


@pytest.mark.usefixtures("earlier")
@pytest.mark.parametrize(
    ("setup", "deltas", "error"),
    [
        (lambda r: r.set(V, "abc"), [1], "ERR value is not an integer or out of range"),
        (lambda r: r.set(V, I64), [1], "ERR increment or decrement would overflow"),
        (lambda r: r.set(V, -(2**63)), [-1], "ERR increment or decrement would overflow"),
        (lambda r: None, [I64, 1], "ERR value is not an integer or out of range"),
        (lambda r: (r.delete(V), r.rpush(V, "x")), [1], "WRONGTYPE Operation against a key"),
    ],
    ids=["not-an-integer", "overflow-up", "overflow-down", "sum-beyond-int64", "wrongtype"],
)
def test_failed_write_returns_failed_with_redis_error_and_writes_no_marker(
    r: redis.Redis, setup: Callable[[redis.Redis], object], deltas: list[int], error: str
) -> None:
    setup(r)
    before = state(r)
    events = [ev(10 + i, d, f"id-{i}") for i, d in enumerate(deltas)]
    result = apply(r, take_lock(r), events)
    assert result.outcome is Written.FAILED
    assert result.error.startswith(error)
    assert state(r) == before
    assert set(markers(r)) == {b"x:events|1-0", b"k:first"}  # only the earlier apply's markers


@pytest.mark.parametrize(
    ("holder", "code", "left"),
    [
        ("me", 1, {b"k:k1", b"x:events|3-0"}),
        (None, 0, {b"x:events|1-0", b"k:k1", b"x:events|2-0", b"x:events|3-0"}),
        ("other-holder", 0, {b"x:events|1-0", b"k:k1", b"x:events|2-0", b"x:events|3-0"}),
    ],
    ids=["owner-releases", "lane-expired-clears-nothing", "other-holder-clears-nothing"],
)
def test_finish_clears_only_listed_entry_markers_and_only_while_it_holds_its_lane(
    r: redis.Redis, holder: str | None, code: int, left: set[bytes]
) -> None:
    token = take_lock(r)
    apply(r, token, [ev(1, 1, "k1"), ev(2), ev(3)])
    if holder is None:
        r.delete(LOCK)  # expired
    elif holder != "me":
        r.set(LOCK, holder)
    assert finish(r, token, [ev(1), ev(2)]) == code
    assert set(markers(r)) == left  # event_id markers and unlisted entries stay
    assert r.get(LOCK) == (b"other-holder" if holder == "other-holder" else None)
    assert r.get(V) == b"3"


def test_apply_needing_two_lanes_is_refused_when_it_holds_only_one(r: redis.Redis) -> None:
    theirs = lane_key(NAME, "previous-owner")
    token = take_lock(r)  # our lane only
    r.set(theirs, "previous-owner-token")
    result = apply_events(r, NAME, token, [ev(1, 3)], stream=SRC, lanes=("me", "previous-owner"))
    assert result.outcome is Written.LOCK_LOST
    assert r.exists(V, APPLIED) == 0
    r.set(theirs, token)  # now we hold both
    result = apply_events(r, NAME, token, [ev(1, 3)], stream=SRC, lanes=("me", "previous-owner"))
    assert result.outcome is Written.APPLIED
    assert r.get(V) == b"3"


def test_finish_with_one_of_two_lanes_lost_keeps_markers_and_releases_only_its_own(
    r: redis.Redis,
) -> None:
    theirs = lane_key(NAME, "previous-owner")
    token = take_lock(r)
    r.set(theirs, token)
    apply_events(r, NAME, token, [ev(1), ev(2)], stream=SRC, lanes=("me", "previous-owner"))
    r.set(theirs, "their-new-token")  # ours expired, and its owner took it again
    assert finish(r, token, [ev(1), ev(2)], [LOCK, theirs]) == 0
    assert set(markers(r)) == {b"x:events|1-0", b"x:events|2-0"}  # kept: they may apply them
    now_ms = r.time()[0] * 1000
    for score in markers(r).values():  # ...for one lock TTL, by Redis' clock
        assert now_ms - 1_000 <= score <= now_ms + LOCK_TTL_MS + 2_000
    assert 0 < r.pttl(APPLIED) <= LOCK_TTL_MS + 10
    assert r.get(LOCK) is None  # ours released
    assert r.get(theirs) == b"their-new-token"  # theirs untouched


def test_markers_cut_short_do_not_outlive_their_life_in_a_key_another_apply_kept_alive(
    r: redis.Redis,
) -> None:
    # X's finish lost its lane (X's marker cut short); Y is applied (the key would live 30
    # days) and finished while X's marker is still alive: the key must go with X's marker.
    token = take_lock(r)
    apply(r, token, [ev(1)])
    r.set(LOCK, "someone-else")
    short = counters.finish_call(SRC, token, [(NAME, [LOCK], [b"1-0"])], 200)
    assert run_calls(r, [short]) == [[0]]
    r.delete(LOCK)
    token = take_lock(r)
    apply(r, token, [ev(2)])
    assert finish(r, token, [ev(2)]) == 1
    assert 0 < r.pttl(APPLIED) <= 210
    time.sleep(0.25)
    assert bookkeeping_keys(r) == []


def test_finish_without_any_lane_cuts_markers_short_and_never_lengthens_them(
    r: redis.Redis,
) -> None:
    # No lane proves that nobody still writes these entries (markers of entries found gone
    # from the pending list): they expire one lock TTL later, never at once.
    token = take_lock(r)
    apply(r, token, [ev(1), ev(2)])
    short = counters.finish_call(SRC, "no-token", [(NAME, [], [b"1-0"])], 200)
    assert run_calls(r, [short]) == [[0]]
    assert set(markers(r)) == {b"x:events|1-0", b"x:events|2-0"}
    longer = counters.finish_call(SRC, "no-token", [(NAME, [], [b"1-0"])], LOCK_TTL_MS)
    assert run_calls(r, [longer]) == [[0]]
    time.sleep(0.3)
    assert apply(r, token, [ev(1, 5), ev(2, 5)]).skipped == (1,)  # 1-0's marker is over
    assert r.get(V) == b"2"


@pytest.mark.parametrize("lane_kept", [True, False], ids=["removed", "cut-short"])
def test_finish_of_thousands_of_entries_of_one_counter_ends_every_marker(
    r: redis.Redis, lane_kept: bool
) -> None:
    # More ids than one Lua call can unpack (entries held in hand come back all at once).
    token = take_lock(r)
    events = [ev(i) for i in range(1, 9001)]
    for i in range(0, len(events), 1000):
        assert apply(r, token, events[i : i + 1000]).outcome is Written.APPLIED
    if not lane_kept:
        r.set(LOCK, "someone-else")
    assert finish(r, token, events) == (1 if lane_kept else 0)
    if lane_kept:
        assert r.exists(APPLIED) == 0
    else:
        assert r.zcard(APPLIED) == 9000
        assert 0 < r.pttl(APPLIED) <= LOCK_TTL_MS + 10
    assert r.get(V) == b"9000"


def test_finish_that_lost_its_lane_cuts_markers_short_even_when_redis_is_out_of_memory(
    own_redis: Any,
) -> None:
    r = own_redis.client()
    token = take_lock(r)
    apply(r, token, [ev(1), ev(2)])
    r.delete(LOCK)  # expired
    r.config_set("maxmemory", 1)  # every write that may grow memory is refused
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("probe", "x")
        assert finish(r, token, [ev(1), ev(2)]) == 0
    finally:
        r.config_set("maxmemory", 0)
    assert 0 < r.pttl(APPLIED) <= LOCK_TTL_MS + 10


def test_event_id_markers_live_for_the_window_in_a_key_of_their_own(r: redis.Redis) -> None:
    # An entry marker lives until its XACK (30 days at most): it must not make the event_id
    # markers of its counter live that long too.
    token = take_lock(r)
    apply(r, token, [ev(1, 1, "k1")])
    assert r.pttl(APPLIED) > TTL_MS
    assert 0 < r.pttl(EVENT_IDS) <= TTL_MS
    assert finish(r, token, [ev(1)]) == 1
    assert r.exists(APPLIED) == 0
    assert set(markers(r)) == {b"k:k1"}
    assert 0 < r.pttl(EVENT_IDS) <= TTL_MS


def test_expired_event_id_marker_no_longer_skips_a_retry_and_is_removed_when_met(
    r: redis.Redis,
) -> None:
    token = take_lock(r)
    assert apply(r, token, [ev(9, 1, "k9")]).outcome is Written.APPLIED  # the key lives on
    assert apply(r, token, [ev(1, 1, "k1")], ttl_ms=300).outcome is Written.APPLIED
    time.sleep(0.45)
    stale = r.zscore(EVENT_IDS, b"k:k1")
    assert stale is not None  # expired by score, still stored
    assert apply(r, token, [ev(2, 1, "k1")]).outcome is Written.APPLIED  # its window is over
    assert r.get(V) == b"3"
    fresh = r.zscore(EVENT_IDS, b"k:k1")
    assert fresh is not None
    assert fresh > stale + 1000  # the stale marker was pruned, a new one written


def test_event_id_marker_written_by_an_older_worker_in_the_entry_markers_key_still_counts(
    r: redis.Redis,
) -> None:
    # Workers before the two-key layout kept event_id markers with the entry markers.
    r.zadd(APPLIED, {b"k:old": r.time()[0] * 1000 + TTL_MS})
    token = take_lock(r)
    assert apply(r, token, [ev(1, 4, "old"), ev(2, 5)]).skipped == (0,)
    assert apply(r, token, [ev(2, 5)]).outcome is Written.APPLIED
    assert r.get(V) == b"5"


def test_entry_marker_outlives_the_dedupe_window_so_a_late_redelivery_is_skipped(
    r: redis.Redis,
) -> None:
    # Applied, then nobody acknowledges the entry for longer than the window (Redis down,
    # every replica stopped): its redelivery must still find the marker.
    token = take_lock(r)
    assert apply(r, token, [ev(1, 7, "k1")], ttl_ms=300).outcome is Written.APPLIED
    time.sleep(0.45)
    assert apply(r, token, [ev(1, 7, "k1")], ttl_ms=300).skipped == (0,)
    assert r.get(V) == b"7"


def test_apply_then_finish_without_event_ids_leaves_no_bookkeeping(r: redis.Redis) -> None:
    events = [ev(i, i) for i in range(1, 21)]
    token = take_lock(r)
    assert apply(r, token, events).outcome is Written.APPLIED
    assert finish(r, token, events) == 1
    assert bookkeeping_keys(r) == []
    assert r.keys("*") == [V.encode()]
    assert r.get(V) == b"210"


def sha(script: Script) -> str:
    """The SHA1 Redis caches a script under (SCRIPT EXISTS)."""
    return hashlib.sha1(script.source, usedforsecurity=False).hexdigest()


def test_scripts_reload_after_script_flush_and_nothing_runs_twice(r: redis.Redis) -> None:
    token = take_lock(r)
    assert apply(r, token, [ev(1, 2)]).outcome is Written.APPLIED
    r.script_flush()
    assert r.script_exists(sha(counters.APPLY)) == [False]
    calls = [
        Call.command("INCR", "side"),
        counters.apply_call(SRC, token, [counters.Write(NAME, [ev(2, 3)])], TTL_MS, LANES),
        Call.command("INCR", "side"),
        counters.apply_call(SRC, token, [counters.Write(NAME, [ev(3, 4)])], TTL_MS, LANES),
        counters.finish_call(SRC, token, [(NAME, [LOCK], [b"1-0", b"2-0", b"3-0"])], 10_000),
    ]
    results = run_calls(r, calls)
    assert [results[0], results[2], results[4]] == [1, 2, [1]]  # finish ran after the applies
    assert [counters.parse_apply(results[i], 1)[0].outcome for i in (1, 3)] == [Written.APPLIED] * 2
    assert r.get("side") == b"2"  # each INCR ran exactly once
    assert r.get(V) == b"9"  # each apply ran exactly once
    assert r.exists(LOCK, APPLIED) == 0
    assert r.script_exists(sha(counters.APPLY), sha(counters.FINISH)) == [True, True]


# -- dead-letter move ---------------------------------------------------------------------

STREAM, DEAD, GROUP = "events", "events:dead", "g"


def deliver(r: redis.Redis, consumer: str, **fields: str) -> tuple[bytes, list[bytes]]:
    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: already created
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    entry_id = r.xadd(STREAM, fields)  # type: ignore[arg-type]
    got = r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1)
    assert got[0][1][0][0] == entry_id
    flat = [x for k, v in fields.items() for x in (k.encode(), v.encode())]
    return entry_id, flat


def move(r: redis.Redis, consumer: str, rejected: list[Rejected]) -> list[bytes]:
    """Dead-letter ``rejected`` as ``consumer`` (deadletter.lua): the ids moved."""
    call = deadletter.dead_letter_call(STREAM, DEAD, GROUP, consumer, rejected)
    (moved,) = run_calls(r, [call])
    return [bytes(i) for i in moved]


def test_dead_letter_of_a_valid_entry_copies_its_fields_from_the_stream(r: redis.Redis) -> None:
    # A valid entry whose write failed MAX_DELIVERIES times: its fields were not kept.
    entry_id, flat = deliver(r, "c1", counter="x", amount="5", note="hi")
    assert move(r, "c1", [Rejected(entry_id, None, "ERR overflow")]) == [entry_id]
    [(_, fields)] = r.xrange(DEAD)
    pairs = [*zip(flat[::2], flat[1::2], strict=True)]
    assert list(fields.items()) == [*pairs, (b"error", b"ERR overflow"), (b"source_id", entry_id)]


def test_dead_letter_copied_from_the_stream_keeps_at_most_max_fields(r: redis.Redis) -> None:
    extra = {f"f{i}": "v" for i in range(deadletter.MAX_FIELDS + 500)}
    entry_id, _ = deliver(r, "c1", counter="x", **extra)
    assert move(r, "c1", [Rejected(entry_id, None, "worn")]) == [entry_id]
    [(_, fields)] = r.xrange(DEAD)
    assert len(fields) == deadletter.MAX_FIELDS + 3  # + fields_truncated, error, source_id
    kept = f"{deadletter.MAX_FIELDS} of {deadletter.MAX_FIELDS + 501} fields kept"
    assert fields[b"fields_truncated"] == kept.encode()


def test_dead_letter_move_keeps_fields_adds_reason_and_acks_exactly_once(r: redis.Redis) -> None:
    entry_id, flat = deliver(r, "c1", counter="x", amount="1.5", note="hi")
    item = Rejected(entry_id, flat, "field 'amount' must be a whole number, got '1.5'")
    assert move(r, "c1", [item]) == [entry_id]
    [(_, fields)] = r.xrange(DEAD)
    original = [(b"counter", b"x"), (b"amount", b"1.5"), (b"note", b"hi")]
    added = [(b"error", item.reason.encode()), (b"source_id", entry_id)]
    assert list(fields.items()) == original + added
    assert r.xpending(STREAM, GROUP)["pending"] == 0
    assert move(r, "c1", [item]) == []
    assert r.xlen(DEAD) == 1


def test_dead_letter_move_leaves_an_entry_pending_for_another_consumer(r: redis.Redis) -> None:
    theirs, their_flat = deliver(r, "c2", counter="")
    mine, my_flat = deliver(r, "c1", op="INCR", counter="a", amount="2")
    rejected = [Rejected(theirs, their_flat, "empty"), Rejected(mine, my_flat, "bad op")]
    assert move(r, "c1", rejected) == [mine]
    [(_, fields)] = r.xrange(DEAD)
    pairs = [*zip(my_flat[::2], my_flat[1::2], strict=True), (b"error", b"bad op")]
    assert list(fields.items()) == [*pairs, (b"source_id", mine)]
    pending = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(theirs, b"c2")]


def test_round_trips_on_one_pipe_are_answered_in_order_sent(r: redis.Redis) -> None:
    pipe = Pipe(r)
    pipe.send([Round("one", [Call.command("SET", "k", "1"), Call.command("INCR", "k")])])
    pipe.send([Round("two", [Call.command("GET", "k")])])
    assert pipe.recv() == [[b"OK", 2]]
    assert pipe.recv() == [[b"2"]]


def test_pipe_reset_after_a_failure_between_send_and_recv_never_yields_stale_replies(
    r: redis.Redis,
) -> None:
    r.set("k", "old")
    pipe = Pipe(r)
    pipe.send([Round("", [Call.command("SET", "k", "new")])])  # its reply would be b"OK"
    pipe.reset()  # the caller failed before reading it
    ((reply,),) = pipe.exchange([Round("", [Call.command("GET", "k")])])
    assert reply in (b"old", b"new")  # a GET's answer, not the SET's
