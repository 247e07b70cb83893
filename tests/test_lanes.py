"""Lock lanes (docs/design-lock-lanes.md): replicas lock a counter per consumer name, so they
do not queue on a hot counter, and an entry is still applied at most once when it moves
between replicas."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from helpers import (
    GROUP,
    STREAM,
    IdleWatch,
    Logs,
    MakeConsumer,
    apply_events,
    bookkeeping_keys,
    delivered_to,
    drained,
    log_lines,
    push,
    turn_until,
    values,
)

from worker import counters, stream
from worker.connection import ensure_group
from worker.consumer import Consumer
from worker.events import parse


def owner_of(r: redis.Redis, entry: bytes) -> bytes:
    (info,) = r.xpending_range(STREAM, GROUP, entry, entry, 1)
    return bytes(info["consumer"])


def in_hand_behind_our_busy_lane(
    r: redis.Redis, make_consumer: MakeConsumer, amount: int, **settings: Any
) -> tuple[Consumer, bytes]:
    """A consumer "live" that read one entry of counter "hot" and keeps it in hand, because
    someone holds live's lane on "hot"."""
    r.set(counters.lane_key("hot", "live"), "someone-else", px=60_000)
    x = push(r, "hot", amount)
    consumer = make_consumer(lock_wait_ms=0, **settings)
    consumer.turn()
    assert [e.entry_id for e in consumer.hand.waiting] == [x]
    return consumer, x


def claimed_away_and_back(r: redis.Redis, x: bytes, s_lane_ms: int | None = None) -> None:
    """S claims X (and, with ``s_lane_ms``, holds its lane, X confirmed), then X comes back
    to our name (say, by a twin): two more deliveries."""
    r.xclaim(STREAM, GROUP, "S", 0, [x])
    if s_lane_ms is not None:
        r.set(counters.lane_key("hot", "S"), "s-token", px=s_lane_ms)
    r.xclaim(STREAM, GROUP, "live", 0, [x])


def s_writes(r: redis.Redis, x: bytes, amount: int) -> None:
    """S's apply of X, under its lane, as S would send it after its confirm."""
    event = parse(x, [b"counter", b"hot", b"amount", str(amount).encode()])
    result = apply_events(r, "hot", "s-token", [event], lanes=("S",))
    assert result.outcome is counters.Written.APPLIED


def test_replica_applies_its_own_entries_while_another_replica_holds_its_lane_on_the_counter(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    r.set(counters.lane_key("hot", "other"), "other-replica", px=60_000)
    push(r, "hot", 3)
    push(r, "hot", 4)
    consumer = make_consumer()
    consumer.turn()
    assert values(r, {"hot"}) == {"hot": 7}
    assert drained(r)
    assert consumer.stats.lock_busy == 0
    assert r.get(counters.lane_key("hot", "other")) == b"other-replica"  # not touched


def test_entry_claimed_from_a_replica_waits_for_that_replicas_lane_and_counts_once(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    entry = delivered_to(r, "stuck", "c", 5)
    # "stuck" holds its lane: it may still be writing the entry it confirmed.
    r.set(counters.lane_key("c", "stuck"), "stuck-token", px=60_000)
    time.sleep(0.15)  # idle for CLAIM_IDLE_MS
    consumer = make_consumer(lock_wait_ms=20)
    turn_until(consumer, lambda: owner_of(r, entry) == b"live")  # claimed...
    assert values(r, {"c"}) == {"c": 0}  # ...but not applied under stuck's nose
    assert [e.owner for e in consumer.hand.waiting] == ["stuck"]
    r.delete(counters.lane_key("c", "stuck"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"c"}) == {"c": 5}
    assert consumer.stats.reclaimed == 1


def test_keeping_entries_ours_never_claims_an_entry_pending_for_another_consumer(
    r: redis.Redis,
) -> None:
    ensure_group(r, STREAM, GROUP)
    theirs = push(r, "x", 1)
    r.xreadgroup(GROUP, "other", {STREAM: ">"}, count=10)
    mine = push(r, "x", 1)
    r.xreadgroup(GROUP, "live", {STREAM: ">"}, count=10)
    got = stream.claim_own(r, STREAM, GROUP, "live", [theirs, mine])
    assert got.counts == {mine: 1}
    assert got.deleted == []
    assert owner_of(r, theirs) == b"other"


@pytest.mark.parametrize("busy", [False, True], ids=["our-lane-free", "our-lane-busy"])
def test_entry_claimed_away_and_back_while_in_hand_is_held_until_old_lanes_expire(
    r: redis.Redis, make_consumer: MakeConsumer, busy: bool
) -> None:
    # We keep X in hand behind our busy lane; S claims X and confirms it under its lane;
    # X comes back to our name (say, by a twin). Without the hold we would apply, ack and
    # clear the marker, and S's write would then count X a second time. If our lane is
    # still busy when we see X came back, X is held all the same, not retried a moment
    # later with its new delivery count looking unchanged.
    consumer, x = in_hand_behind_our_busy_lane(
        r, make_consumer, 6, lock_ttl_ms=300, claim_idle_ms=600_000
    )
    claimed_away_and_back(r, x, s_lane_ms=300)
    if not busy:
        r.delete(counters.lane_key("hot", "live"))
    consumer.turn()
    assert [e.entry_id for e in consumer.hand.held_entries] == [x]
    assert consumer.hand.waiting == []
    if busy:
        r.delete(counters.lane_key("hot", "live"))
        consumer.turn()
    assert values(r, {"hot"}) == {"hot": 0}  # held: S may still write it
    s_writes(r, x, 6)
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot"}) == {"hot": 6}
    assert consumer.stats.duplicates == 1


def test_entry_in_hand_claimed_back_from_another_replica_then_needs_that_replicas_lane(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    consumer, x = in_hand_behind_our_busy_lane(r, make_consumer, 2)
    r.xclaim(STREAM, GROUP, "S", 0, [x])  # S took it, then stalled with its lane held
    r.set(counters.lane_key("hot", "S"), "s-token", px=60_000)
    r.delete(counters.lane_key("hot", "live"))
    time.sleep(1.05)  # CLAIM_IDLE_MS
    consumer.reclaimer.restart()
    consumer.turn()  # our sweep claims it back: now S's lane is needed too
    assert owner_of(r, x) == b"live"
    assert [e.owner for e in consumer.hand.waiting + consumer.hand.held_entries] == ["S"]
    assert values(r, {"hot"}) == {"hot": 0}
    r.delete(counters.lane_key("hot", "S"))
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot"}) == {"hot": 2}


def test_claimed_and_own_entries_of_one_counter_count_once_and_leave_no_lane_or_marker(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    delivered_to(r, "gone", "two", 4)
    push(r, "two", 1)
    time.sleep(0.15)
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"two"}) == {"two": 5}
    assert bookkeeping_keys(r) == []


def test_entry_kept_in_hand_found_delivered_again_by_the_keep_ours_claim_is_held(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    consumer, x = in_hand_behind_our_busy_lane(
        r, make_consumer, 1, lock_ttl_ms=300, claim_idle_ms=1200
    )
    claimed_away_and_back(r, x)
    time.sleep(0.4)  # CLAIM_IDLE_MS / 3: the next keep-ours claim is due
    before = time.monotonic()
    consumer.turn()
    assert consumer.hand.waiting == []
    (held,) = consumer.hand.held_entries
    assert (held.entry_id, held.deliveries) == (x, 3)
    assert consumer.hand.next_due() >= before + 0.3  # held one lock TTL from that reply


def test_waiter_key_of_a_counter_whose_name_contains_lock_names_that_counter(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    name = "a:lock:b"
    r.set(counters.lane_key(name, "live"), "someone-else", px=60_000)
    push(r, name, 1)
    consumer = make_consumer(lock_wait_ms=50)
    consumer.turn()  # busy, then busy again on a retry: in line for it
    assert r.get(counters.waiter_key(name, "live")) == b"live"
    assert r.get("sc:{a:lock:b}:next:live") == b"live"
    assert r.exists("sc:{a:next:b}:lock:live") == 0  # not some other counter's lane


def test_markers_of_a_finish_that_lost_its_lane_expire_one_lock_ttl_later_even_if_it_dies(
    r: redis.Redis, make_consumer: MakeConsumer, logs: Logs
) -> None:
    push(r, "c", 2)
    push(r, "c", 3)
    consumer = make_consumer(lock_ttl_ms=200, claim_idle_ms=600_000)
    send = consumer.pipe.send
    lost = []

    def lose_lane_before_finish(rounds: Any) -> None:
        if not lost and any(r.stage == "finish" for r in rounds):
            lost.append(r.delete(counters.lane_key("c", "live")))  # as if it expired
        send(rounds)

    consumer.pipe.send = lose_lane_before_finish  # type: ignore[method-assign]
    turn_until(consumer, lambda: drained(r))
    assert lost == [1]
    assert values(r, {"c"}) == {"c": 5}
    assert r.zcard(counters.applied_key("c")) == 2  # kept: a writer may still hold a lane
    assert log_lines(logs, "lock lane lost before the finish")
    del consumer  # the replica dies: Redis' clock ends the markers, not its memory
    assert 0 < r.pttl(counters.applied_key("c")) <= 210
    time.sleep(0.25)
    assert bookkeeping_keys(r) == []


def test_after_a_lost_connection_only_entries_delivered_more_than_once_wait(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # A claim whose reply was lost put `claimed` in our name with an owner we never saw.
    ensure_group(r, STREAM, GROUP)
    claimed = push(r, "a", 5)
    r.xreadgroup(GROUP, "w0", {STREAM: ">"}, count=10)
    r.xclaim(STREAM, GROUP, "live", 0, [claimed])
    ours = push(r, "b", 7)
    r.xreadgroup(GROUP, "live", {STREAM: ">"}, count=10)
    consumer = make_consumer(lock_ttl_ms=300, claim_idle_ms=600_000)
    consumer.start_over()  # as after a connection error: refetch, no delivery counted
    consumer.turn()
    assert values(r, {"a", "b"}) == {"a": 0, "b": 7}
    assert [e.entry_id for e in consumer.hand.held_entries] == [claimed]
    assert ours not in [e.entry_id for e in consumer.hand.held_entries]
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"a", "b"}) == {"a": 5, "b": 7}


@pytest.mark.parametrize("block_ms", [50, 5_000], ids=["short-reads", "long-reads"])
def test_held_entry_on_an_idle_stream_never_looks_idle_and_is_counted_when_due(
    r: redis.Redis, make_consumer: MakeConsumer, block_ms: int
) -> None:
    # Held a little longer than CLAIM_IDLE_MS, with nothing new to read: keep-ours claims
    # go on while the read waits, and the read wakes up for them rather than blocking
    # BLOCK_MS or until the entry is due.
    ensure_group(r, STREAM, GROUP)
    x = push(r, "a", 4)
    r.xreadgroup(GROUP, "w0", {STREAM: ">"}, count=10)
    r.xclaim(STREAM, GROUP, "live", 0, [x])
    options = {"lock_ttl_ms": 950, "claim_idle_ms": 1000}  # held for 1.055 s
    consumer = make_consumer(block_ms=block_ms, shutdown_grace_ms=10_000, **options)
    consumer.start_over()
    started = time.monotonic()
    with IdleWatch(r) as watch:
        consumer.turn()
        assert [e.entry_id for e in consumer.hand.held_entries] == [x]
        turn_until(consumer, lambda: drained(r))
    assert time.monotonic() - started < 3.0
    assert 0 < watch.longest < 1000 * 2 / 3  # CLAIM_IDLE_MS / 3, and a turn at most
    assert values(r, {"a"}) == {"a": 4}


def test_entry_claimed_away_and_back_between_two_batches_in_flight_is_held(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # The back-to-back flow: the entry changes hands just before its batch's lock round.
    for _ in range(100):
        push(r, "hot", 1)
    consumer = make_consumer(batch_size=20, lock_ttl_ms=300, claim_idle_ms=600_000)
    send = consumer.pipe.send
    locks: list[bytes] = []

    def claim_one_before_the_third_lock(rounds: Any) -> None:
        if any(r.stage == "take_lanes" for r in rounds):
            if len(locks) == 2:
                newest = r.xpending_range(STREAM, GROUP, "-", "+", 1000, "live")[-1]
                claimed_away_and_back(r, newest["message_id"], s_lane_ms=300)
            locks.append(b"")
        send(rounds)

    consumer.pipe.send = claim_one_before_the_third_lock  # type: ignore[method-assign]
    consumer.turn()  # batches back to back: all but the entry that came back
    (held,) = consumer.hand.held_entries
    assert held.deliveries == 3
    s_writes(r, held.entry_id, 1)  # S, which confirmed it, writes it now
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"hot"}) == {"hot": 100}
    assert consumer.stats.duplicates == 1


def test_keeping_thousands_of_entries_ours_claims_them_all(r: redis.Redis) -> None:
    # More ids than one script call can unpack into one XCLAIM.
    ensure_group(r, STREAM, GROUP)
    pipe = r.pipeline(transaction=False)
    for _ in range(9_000):
        pipe.xadd(STREAM, {"counter": "many", "amount": 1})
    ids = pipe.execute()
    r.xreadgroup(GROUP, "live", {STREAM: ">"}, count=10_000)
    time.sleep(0.3)
    got = stream.claim_own(r, STREAM, GROUP, "live", ids).counts
    assert len(got) == 9_000
    assert set(got.values()) == {1}
    # Every one of them was claimed again, not only the first of each chunk: none has
    # been idle since the read.
    pending = r.xpending_range(STREAM, GROUP, "-", "+", 10_000, idle=250)
    assert pending == []


def test_entry_back_in_hand_after_an_outage_is_claimed_ours_at_once(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # Idle through the outage, nearly CLAIM_IDLE_MS: our first keep-ours claim must not
    # wait another CLAIM_IDLE_MS / 3, or another replica takes it (a delivery more).
    ensure_group(r, STREAM, GROUP)
    x = delivered_to(r, "w0", "a", 4)
    r.xclaim(STREAM, GROUP, "live", 0, [x])  # two deliveries: held after a reset
    options = {"lock_ttl_ms": 600, "claim_idle_ms": 1000}
    consumer = make_consumer(**options)
    other = make_consumer(consumer="other", **options)
    time.sleep(0.8)  # the outage
    consumer.start_over()
    consumer.turn()
    assert [e.entry_id for e in consumer.hand.held_entries] == [x]
    time.sleep(0.3)  # 1.1 s since the claim, had nobody touched it
    assert other.reclaimer.claim(10).claimed == []
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"a"}) == {"a": 4}


def test_held_entries_filling_a_batch_neither_stop_new_entries_nor_spin(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    # After a lost connection, a whole batch of our pending entries is held (delivered
    # twice, past owners unknown): new entries are still read and counted meanwhile, and
    # the loop waits in its read rather than turning as fast as it can.
    ensure_group(r, STREAM, GROUP)
    held = [push(r, "old", 1) for _ in range(5)]
    r.xreadgroup(GROUP, "w0", {STREAM: ">"}, count=10)
    r.xclaim(STREAM, GROUP, "live", 0, held)
    consumer = make_consumer(batch_size=5, lock_ttl_ms=400, claim_idle_ms=600_000)
    consumer.start_over()
    consumer.turn()
    assert len(consumer.hand.held_entries) == 5
    push(r, "new", 7)
    turns, until = 0, time.monotonic() + 0.3
    while time.monotonic() < until:
        consumer.turn()
        turns += 1
    assert values(r, {"old", "new"}) == {"old": 0, "new": 7}
    assert turns < 50, f"{turns} turns in 0.3 s: spinning"
    turn_until(consumer, lambda: drained(r))
    assert values(r, {"old"}) == {"old": 5}
