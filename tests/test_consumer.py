"""The consumer loop, driven one turn at a time in this process against a real Redis."""

from __future__ import annotations

import time

import pytest
import redis
from helpers import (
    GROUP,
    STREAM,
    IdleWatch,
    Logs,
    MakeConsumer,
    applied_then_crashed,
    apply_events,
    bookkeeping_keys,
    dead_letters,
    delivered_to,
    drained,
    log_lines,
    pending_ids,
    push,
    push_random,
    turn_until,
    values,
    wait_until,
)

from worker import batch, counters
from worker.connection import ensure_group
from worker.events import parse
from worker.stream import Delivery


def test_events_pushed_before_the_group_existed_are_counted(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    expected = push_random(r, 700, names=7)
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, set(expected)) == dict(expected)


def test_second_replica_creating_the_group_tolerates_busygroup(r: redis.Redis) -> None:
    assert ensure_group(r, STREAM, GROUP) is True
    assert ensure_group(r, STREAM, GROUP) is False
    assert [g["name"] for g in r.xinfo_groups(STREAM)] == [GROUP.encode()]


def test_invalid_entries_are_dead_lettered_once_with_error_and_source_id(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    good = push(r, "ok", 2)
    bad_amount = push(r, "ok", extra_field="kept", amount="1.5")
    no_counter = r.xadd(STREAM, {"op": "incr"})
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"ok"}) == {"ok": 2}
    dead = dead_letters(r)
    assert [d[b"source_id"] for d in dead] == [bad_amount, no_counter]
    assert dead[0][b"extra_field"] == b"kept"
    assert dead[0][b"amount"] == b"1.5"
    assert b"'amount' must be a whole number" in dead[0][b"error"]
    assert b"missing required field 'counter'" in dead[1][b"error"]
    assert good not in [d[b"source_id"] for d in dead]
    assert pending_ids(r) == []


def test_producer_retry_with_same_event_id_is_counted_once_within_and_across_batches(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    push(r, "q", 5, event_id="order-1")
    push(r, "q", 5, event_id="order-1")  # retry in the same batch
    push(r, "q", 1, event_id="order-2")
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    push(r, "q", 5, event_id="order-1")  # retry in a later batch
    push(r, "other", 5, event_id="order-1")  # event ids are scoped per counter
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"q", "other"}) == {"q": 6, "other": 5}
    assert consumer.stats.duplicates == 2


def test_failed_write_stays_pending_then_is_dead_lettered_with_the_redis_error(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.value_key("broken"), "abc")
    bad = push(r, "broken", 3)
    push(r, "fine", 1)
    consumer = make_consumer(max_deliveries=3)
    consumer.turn()
    assert values(r, {"fine"}) == {"fine": 1}  # the rest of the batch is not held back
    assert pending_ids(r) == [bad]  # not acknowledged: the write failed
    assert r.get(counters.value_key("broken")) == b"abc"
    turn_until(consumer, lambda: drained(r))
    (dead,) = dead_letters(r)
    assert dead[b"source_id"] == bad
    assert dead[b"counter"] == b"broken"
    assert dead[b"amount"] == b"3"
    assert b"not an integer" in dead[b"error"]
    assert consumer.stats.write_failures == 3


def test_overflowing_batch_applies_what_fits_and_holds_back_the_rest(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    r.set(counters.value_key("big"), 2**63 - 10)
    push(r, "big", 5)
    too_much = push(r, "big", 100)
    consumer = make_consumer()
    consumer.turn()
    assert values(r, {"big"}) == {"big": 2**63 - 5}
    assert pending_ids(r) == [too_much]  # left for a retry (dead-lettered at MAX_DELIVERIES)
    assert dead_letters(r) == []
    (failed,) = log_lines(logs, "counter write failed")
    assert "would overflow" in failed["error"]


def test_entries_pending_for_a_dead_consumer_are_claimed_by_a_live_one(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    expected = push_random(r, 300, names=5)
    ensure_group(r, STREAM, GROUP)
    r.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=1000)  # delivered, then the reader died
    consumer = make_consumer()
    consumer.turn()
    assert values(r, set(expected)) != dict(expected)  # not idle long enough yet
    time.sleep(1.05)  # CLAIM_IDLE_MS
    turn_until(consumer, lambda: drained(r))
    assert values(r, set(expected)) == dict(expected)
    assert consumer.stats.reclaimed == 300


def test_entries_deleted_while_pending_for_a_dead_consumer_do_not_block_the_group(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    push(r, "d", 1)
    gone = push(r, "d", 10)
    delivered_to(r, "dead", "d", 100)
    r.xdel(STREAM, gone)
    time.sleep(1.05)  # CLAIM_IDLE_MS
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r) and not consumer.deleted.busy())
    assert values(r, {"d"}) == {"d": 101}
    (lost,) = log_lines(logs, "entry deleted from the stream before it was counted")
    assert lost["entry_id"] == gone.decode()
    assert dead_letters(r) == []


def test_applied_entry_deleted_before_its_ack_is_reported_counted_and_its_marker_goes(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    # A replica applied the entry and died before its XACK; then the entry was trimmed away.
    entry = applied_then_crashed(r, "crashed", "t", 4)
    r.xdel(STREAM, entry)
    time.sleep(1.05)  # CLAIM_IDLE_MS
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r) and not consumer.deleted.busy())
    assert values(r, {"t"}) == {"t": 4}
    (counted,) = log_lines(logs, "entry deleted from the stream had been counted")
    assert (counted["entry_id"], counted["counter"]) == (entry.decode(), "t")
    assert not log_lines(logs, "entry deleted from the stream before it was counted")
    assert 0 < r.pttl(counters.applied_key("t")) <= 110  # one lock TTL, not 30 days
    wait_until(lambda: bookkeeping_keys(r) == [], 2, "the marker to expire")


def test_entry_in_hand_deleted_from_the_stream_is_reported_when_kept_ours(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    # In hand behind a busy lock, then trimmed away: the keep-ours claim takes it off the
    # pending list (Redis >= 7.0), and it is reported, not silently dropped.
    r.set(counters.lane_key("hot", "live"), "someone-else", px=10_000)
    entry = push(r, "hot", 3)
    consumer = make_consumer(lock_wait_ms=0)
    consumer.turn()
    assert pending_ids(r) == [entry]
    r.xdel(STREAM, entry)
    turn_until(
        consumer,
        lambda: bool(log_lines(logs, "entry deleted from the stream before it was counted")),
    )
    (lost,) = log_lines(logs, "entry deleted from the stream before it was counted")
    assert lost["entry_id"] == entry.decode()
    assert pending_ids(r) == []
    assert values(r, {"hot"}) == {"hot": 0}


@pytest.mark.parametrize("applied", [True, False], ids=["counted", "not-counted"])
def test_deleted_entry_in_our_own_backlog_is_acknowledged_and_reported_not_dead_lettered(
    r: redis.Redis, make_consumer: MakeConsumer, applied: bool, logs: Logs
) -> None:
    # Our predecessor (same name) was killed holding the entry, applied or not; the entry
    # was deleted from the stream before we started.
    setup = applied_then_crashed if applied else delivered_to
    entry = setup(r, "w1", "own", 6)
    r.xdel(STREAM, entry)
    consumer = make_consumer(consumer="w1")
    turn_until(consumer, lambda: drained(r) and not consumer.deleted.busy())
    assert values(r, {"own"}) == {"own": 6 if applied else 0}
    assert dead_letters(r) == []  # nothing left to dead-letter: its fields are gone
    if applied:
        assert log_lines(logs, "entry deleted from the stream had been counted")
    else:
        assert log_lines(logs, "entry deleted from the stream before it was counted")


def test_busy_counter_is_retried_later_without_holding_the_other_locks(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.lane_key("hot", "live"), "someone-else", px=10_000)
    push(r, "cold", 1)
    hot = push(r, "hot", 7)
    consumer = make_consumer(lock_wait_ms=30)
    consumer.turn()
    assert values(r, {"cold", "hot"}) == {"cold": 1, "hot": 0}
    assert r.exists(counters.lane_key("cold", "live")) == 0  # released before waiting on "hot"
    assert pending_ids(r) == [hot]  # still ours, still pending: nothing lost
    assert r.get(counters.lane_key("hot", "live")) == b"someone-else"  # never stolen
    r.delete(counters.lane_key("hot", "live"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot"}) == {"hot": 7}
    assert consumer.stats.lock_busy >= 1


def test_producer_retry_waiting_behind_a_busy_counter_is_kept_once_and_counted_once(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.lane_key("hot", "live"), "someone-else", px=10_000)
    push(r, "cold", 1)
    first = push(r, "hot", 5, event_id="order-1")
    retry = push(r, "hot", 5, event_id="order-1")
    consumer = make_consumer(lock_wait_ms=30)
    consumer.turn()
    assert sorted(e.entry_id for e in consumer.hand.waiting) == [first, retry]  # once each
    r.delete(counters.lane_key("hot", "live"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot", "cold"}) == {"hot": 5, "cold": 1}
    assert consumer.stats.duplicates == 1


def test_batches_back_to_back_on_one_counter_never_find_its_lock_busy(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # Each batch releases the counter in the same round trip that locks it for the next.
    expected = push_random(r, 500, names=1)
    consumer = make_consumer(batch_size=20)
    turn_until(consumer, lambda: drained(r))
    assert values(r, set(expected)) == dict(expected)
    assert consumer.stats.applied == 500
    assert consumer.stats.lock_busy == 0
    assert bookkeeping_keys(r) == []


def test_counter_held_by_another_replica_mid_stream_is_counted_once_released(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # Batches go on while a few entries wait for their counter (tried again later).
    expected = push_random(r, 300, names=9)
    for _ in range(3):
        push(r, "held", 2)
    expected += push_random(r, 300, names=9, seed=2)
    r.set(counters.lane_key("held", "live"), "someone-else", px=60_000)
    consumer = make_consumer(batch_size=20, lock_wait_ms=100, claim_idle_ms=5000)
    turn_until(consumer, lambda: values(r, set(expected)) == dict(expected))
    assert values(r, {"held"}) == {"held": 0}  # nothing written under someone else's lock
    assert r.get(counters.lane_key("held", "live")) == b"someone-else"  # never stolen
    assert consumer.stats.lock_busy >= 1
    r.delete(counters.lane_key("held", "live"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"held", *expected}) == {"held": 6, **expected}
    assert consumer.stats.applied == 603
    wait_until(lambda: bookkeeping_keys(r) == [], 2, "our claim on the next turn to expire")


def test_entry_applied_but_not_acknowledged_by_a_crashed_replica_is_not_counted_again(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    applied_then_crashed(r, "crashed", "once", 4)
    time.sleep(1.05)  # lock expired, entry idle for CLAIM_IDLE_MS: a live replica claims it
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"once"}) == {"once": 4}
    assert consumer.stats.duplicates == 1
    assert bookkeeping_keys(r) == []  # the marker was cleared after the XACK


def test_own_pending_entries_after_a_restart_are_counted_at_once_without_a_claim_wait(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # Delivered once, to our name only: no other replica's lane can matter.
    delivered_to(r, "w1", "mine", 2)
    consumer = make_consumer(consumer="w1", claim_idle_ms=600_000, lock_ttl_ms=300)
    consumer.turn()  # reads its own pending list first
    assert values(r, {"mine"}) == {"mine": 2}
    assert drained(r)


def test_own_pending_entry_claimed_by_a_predecessor_waits_one_lock_ttl_after_a_restart(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    # Our predecessor claimed it from w0, which may still hold its lane: it waits until
    # every lock taken before the restart has expired, not CLAIM_IDLE_MS.
    entry = delivered_to(r, "w0", "mine", 2)
    r.xclaim(STREAM, GROUP, "w1", 0, [entry])
    r.set(counters.lane_key("mine", "w0"), "a-replica-w1-claimed-from", px=300)
    consumer = make_consumer(consumer="w1", claim_idle_ms=600_000, lock_ttl_ms=300)
    started = time.monotonic()
    consumer.turn()  # reads its own pending list first, and holds it
    assert values(r, {"mine"}) == {"mine": 0}
    assert [e.event.counter for e in consumer.hand.held_entries] == ["mine"]
    turn_until(consumer, lambda: drained(r))
    assert time.monotonic() - started >= 0.3
    assert values(r, {"mine"}) == {"mine": 2}
    assert log_lines(logs, "entries held until every lock taken before them has expired")


def test_entry_delivered_more_than_max_deliveries_is_dead_lettered(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    poison = push(r, "p", 1)
    ensure_group(r, STREAM, GROUP)
    for n in range(3):  # three replicas took it and died
        r.xreadgroup(GROUP, f"dead-{n}", {STREAM: "0" if n else ">"}, count=10)
        if n:
            r.xclaim(STREAM, GROUP, f"dead-{n}", 0, [poison])
    time.sleep(1.05)  # CLAIM_IDLE_MS
    consumer = make_consumer(max_deliveries=3)
    turn_until(consumer, lambda: drained(r))
    (dead,) = dead_letters(r)
    assert dead[b"source_id"] == poison
    assert b"more than MAX_DELIVERIES=3" in dead[b"error"]
    assert values(r, {"p"}) == {"p": 0}


def test_bookkeeping_returns_to_zero_after_the_group_drains(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    expected = push_random(r, 2000, names=50)
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, set(expected)) == dict(expected)
    assert bookkeeping_keys(r) == []


def test_event_id_markers_expire_after_the_dedupe_window(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    push(r, "w", 1, event_id="k")
    window = 20_000  # the smallest window CLAIM_IDLE_MS=2000 accepts
    consumer = make_consumer(dedupe_window_ms=window, claim_idle_ms=2000)
    turn_until(consumer, lambda: drained(r))
    key = counters.event_ids_key("w")
    assert window - 2000 < r.pttl(key) <= window
    # The apply script's own expiry, with a window short enough to wait for:
    retry = parse(b"9-9", [b"counter", b"w", b"event_id", b"k"])
    r.set(counters.lane_key("w", "me"), "t", px=60_000)
    assert apply_events(r, "w", "t", [retry], ttl_ms=60_000).outcome is (
        counters.Written.ALREADY_APPLIED
    )
    r.pexpire(key, 200)  # as if the window were over
    time.sleep(0.25)
    assert r.exists(key) == 0  # nothing left behind
    assert apply_events(r, "w", "t", [retry], ttl_ms=300).outcome is counters.Written.APPLIED
    assert values(r, {"w"}) == {"w": 2}  # a retry after the window counts again (documented)


def test_same_entry_id_on_two_streams_feeding_one_counter_counts_both(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.xadd("s1", {"counter": "shared", "amount": 5}, id="1-0")
    r.xadd("s2", {"counter": "shared", "amount": 7}, id="1-0")
    ensure_group(r, "s1", GROUP)
    r.xreadgroup(GROUP, "crashed", {"s1": ">"}, count=10)
    # The s1 replica applied its entry 1-0, then died before XACK.
    r.set(counters.lane_key("shared", "me"), "t-crashed", px=50)
    parsed = parse(b"1-0", [b"counter", b"shared", b"amount", b"5"])
    result = apply_events(r, "shared", "t-crashed", [parsed], stream=b"s1")
    assert result.outcome is counters.Written.APPLIED
    time.sleep(0.15)
    on_s2 = make_consumer(stream="s2", consumer="s2-live")
    turn_until(on_s2, lambda: drained(r, "s2"))
    assert values(r, {"shared"}) == {"shared": 12}  # s2's 1-0 is not s1's 1-0
    on_s1 = make_consumer(stream="s1", consumer="s1-live")
    turn_until(on_s1, lambda: drained(r, "s1"))
    assert values(r, {"shared"}) == {"shared": 12}  # s1's redelivery is still a no-op
    assert on_s1.stats.duplicates == 1


def test_entry_with_thousands_of_fields_is_dead_lettered_without_blocking_the_batch(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    fields: dict[str, str] = {f"f{i}": "v" for i in range(5000)}
    huge = r.xadd(STREAM, {"counter": "", **fields})
    push(r, "fine", 2)
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"fine"}) == {"fine": 2}
    (dead,) = dead_letters(r)
    assert dead[b"source_id"] == huge
    assert b"field 'counter' is empty" in dead[b"error"]
    assert dead[b"fields_truncated"] == b"1000 of 5001 fields kept"


def test_over_delivered_entry_that_was_already_applied_is_acknowledged_not_dead_lettered(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    entry = push(r, "worn", 5)
    ensure_group(r, STREAM, GROUP)
    for n in range(3):  # three deliveries; the last replica applied it, then died
        r.xreadgroup(GROUP, f"dead-{n}", {STREAM: "0" if n else ">"}, count=10)
        if n:
            r.xclaim(STREAM, GROUP, f"dead-{n}", 0, [entry])
    r.set(counters.lane_key("worn", "me"), "t-dead", px=50)
    parsed = parse(entry, [b"counter", b"worn", b"amount", b"5"])
    assert apply_events(r, "worn", "t-dead", [parsed]).outcome is counters.Written.APPLIED
    time.sleep(0.15)
    consumer = make_consumer(max_deliveries=3)
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"worn"}) == {"worn": 5}
    assert dead_letters(r) == []  # it was counted: dead-lettering it would invite a replay
    assert bookkeeping_keys(r) == []


def test_busy_lock_with_zero_lock_wait_does_not_spin_on_redis(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.lane_key("held", "live"), "someone-else", px=60_000)
    push(r, "held", 1)
    consumer = make_consumer(lock_wait_ms=0)
    consumer.turn()
    before = int(r.info("stats")["total_commands_processed"])
    deadline = time.monotonic() + 1.0
    turns = 0
    while time.monotonic() < deadline:
        consumer.turn()
        turns += 1
    commands = int(r.info("stats")["total_commands_processed"]) - before
    assert values(r, {"held"}) == {"held": 0}
    # Backing off, a turn waits up to 50 ms; spinning would be thousands of turns. (Scripts'
    # inner commands count too: a turn with a keep-ours claim and a reclaim page is ~10.)
    assert turns < 200, f"{turns} turns in 1 s: spinning"
    assert commands < 1000, f"{commands} commands in 1 s over {turns} turns: spinning"


def test_entry_handed_to_a_batch_twice_is_counted_once(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    entry = delivered_to(r, "live", "twice", 3)
    consumer = make_consumer(claim_idle_ms=600_000)
    fields = [b"counter", b"twice", b"amount", b"3"]
    twice = batch.parse([Delivery(entry, fields, 1), Delivery(entry, fields, 1)])
    outcomes = consumer.driver.drive(twice, 2, False, 0, lambda: False)
    assert sum(o.applied + o.duplicates for o in outcomes) == 1
    assert values(r, {"twice"}) == {"twice": 3}
    assert drained(r)


@pytest.mark.parametrize("lock_wait_ms", [20, 250], ids=["short-wait", "longest-wait"])
def test_every_entry_kept_in_hand_behind_a_busy_lock_is_kept_ours_not_claimed_away(
    r: redis.Redis, make_consumer: MakeConsumer, lock_wait_ms: int
) -> None:
    # Several entries in hand: each must be claimed ours again, not only the first (a
    # claimed-away entry bounces between replicas and ends dead-lettered).
    r.set(counters.lane_key("hot", "live"), "someone-else", px=10_000)
    entries = [push(r, "hot", amount) for amount in (1, 10, 100)]
    options = {"claim_idle_ms": 1000, "lock_ttl_ms": 200}
    consumer = make_consumer(lock_wait_ms=lock_wait_ms, **options)
    other = make_consumer(consumer="other", **options)
    deadline = time.monotonic() + 2.5  # more than twice CLAIM_IDLE_MS in hand
    with IdleWatch(r) as watch:
        while time.monotonic() < deadline:
            consumer.turn()
            assert other.reclaimer.claim(10).claimed == []  # never idle long enough
    assert watch.longest < 1000
    pending = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert [p["message_id"] for p in pending] == entries
    assert {p["consumer"] for p in pending} == {b"live"}
    assert {p["times_delivered"] for p in pending} == {1}  # no delivery counted meanwhile
    r.delete(counters.lane_key("hot", "live"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot"}) == {"hot": 111}
