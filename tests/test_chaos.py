"""Exactly-once under faults: several worker processes on one group, killed, frozen, cut off.

Every test ends the same way: the group drains, each counter equals the sum of its valid
events, each invalid entry is in the dead-letter stream exactly once, and no lock or entry
marker is left behind.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections import Counter
from typing import Any

import pytest
import redis
from helpers import (
    STREAM,
    bookkeeping_keys,
    dead_letters,
    drained,
    free_port,
    push_random,
    scrape,
    values,
    wait_drained,
    wait_until,
)

from worker import replicas

pytestmark = pytest.mark.chaos

FAST = {
    "claim_idle_ms": 1000,
    "lock_ttl_ms": 300,
    "lock_wait_ms": 200,
    "block_ms": 100,
    "batch_size": 50,
}


def push_with_invalid(r: redis.Redis, n: int, every: int = 50) -> tuple[Counter[str], set[bytes]]:
    """``n`` valid events with an invalid one after every ``every``: each batch has some."""
    expected: Counter[str] = Counter()
    invalid: set[bytes] = set()
    for chunk in range(n // every):
        expected.update(push_random(r, every, names=20, seed=chunk))  # keeps negatives
        invalid.add(bytes(r.xadd(STREAM, {"counter": f"c{chunk % 20}", "amount": "-1"})))
    return expected, invalid


def stop_cleanly(*workers: Any) -> None:
    """SIGTERM: every worker finishes its turn and exits 0."""
    for worker in workers:  # a process still starting up has no handler yet
        worker.wait_for_log('"starting"')
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait(10) == 0


def faulty(
    spawn_worker: Any,
    url: str,
    stage: str,
    *,
    when: str = "before",
    action: str = "kill",
    nth: int = 3,
    **settings: Any,
) -> Any:
    """A worker with a fault at its ``nth`` round trip carrying ``stage`` (faulty_worker.py),
    once the fault has happened."""
    fault = {
        "FAULT_STAGE": stage,
        "FAULT_WHEN": when,
        "FAULT_NTH": str(nth),
        "FAULT_ACTION": action,
    }
    worker = spawn_worker(url, fault=fault, **{**FAST, **settings})
    worker.wait_for_log("fault injected")
    return worker


def assert_exact(
    r: redis.Redis, expected: Counter[str], invalid: frozenset[bytes] | set[bytes] = frozenset()
) -> None:
    assert values(r, set(expected)) == dict(expected)
    sources = [d[b"source_id"] for d in dead_letters(r)]
    assert sorted(sources) == sorted(invalid)  # each one, exactly once
    wait_until(lambda: bookkeeping_keys(r) == [], 5, "locks and entry markers to go")


@pytest.mark.parametrize(
    ("stage", "when"),
    [
        ("take_lanes", "after"),  # lanes taken, entries confirmed, next batch read
        ("write", "before"),  # lanes taken and confirmed, nothing written
        ("write", "after"),  # counters written, entries not acknowledged
        ("finish", "before"),  # same point, seen from the finish side; nothing dead-lettered
        ("finish", "after"),  # acknowledged, released, invalid entries dead-lettered
    ],
)
def test_exactly_once_when_a_replica_is_killed_at_a_protocol_stage(
    redis_server: Any, spawn_worker: Any, stage: str, when: str
) -> None:
    r = redis_server.client()
    expected, invalid = push_with_invalid(r, 3000)
    victim = faulty(spawn_worker, redis_server.url, stage, when=when)
    assert victim.wait(10) == -signal.SIGKILL
    survivor = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, 60)
    assert_exact(r, expected, invalid)
    stop_cleanly(survivor)


@pytest.mark.parametrize("when", ["before", "after"])
def test_frozen_replica_resumed_after_its_lock_expired_cannot_write(
    redis_server: Any, spawn_worker: Any, when: str
) -> None:
    r = redis_server.client()
    expected = push_random(r, 2000, names=10)
    port = free_port()
    frozen = faulty(
        spawn_worker, redis_server.url, "write", when=when, action="stop", nth=2, metrics_port=port
    )
    time.sleep(0.2)
    other = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, 60)  # the live replica claimed the frozen one's entries
    frozen.signal(signal.SIGCONT)
    if when == "before":  # its write comes late, after its lock expired: refused
        frozen.wait_for_log("write refused")
        lost = "stream_counter_lock_lost_total"
        wait_until(lambda: scrape(port).get(lost, 0) > 0, 5, "the refused write in the metrics")
    time.sleep(1.0)  # let it finish its turn: acks and releases of a late replica
    assert_exact(r, expected)
    stop_cleanly(frozen, other)


def test_replica_killed_right_after_a_finish_that_lost_its_lane_leaves_no_marker_behind(
    redis_server: Any, spawn_worker: Any
) -> None:
    # Frozen past its lock's lifetime just before its ack + release: the finish finds its
    # lane gone and cuts the markers short, and the replica is killed right after. The
    # markers must go by Redis' clock, not wait for the dead process (or 30 days).
    r = redis_server.client()
    expected = push_random(r, 3000, names=10)
    frozen = faulty(spawn_worker, redis_server.url, "finish", action="stop")
    time.sleep(0.5)  # LOCK_TTL_MS is 300: every lane it holds has expired
    frozen.signal(signal.SIGCONT)
    frozen.wait_for_log("lock lane lost before the finish")
    frozen.kill()
    survivor = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, 60)
    assert_exact(r, expected)  # no marker left, well before the 30 days
    stop_cleanly(survivor)


def test_two_processes_under_one_consumer_name_count_every_event_once(
    redis_server: Any, spawn_worker: Any
) -> None:
    # A pod restarted under a fixed name while the old one was cut off (frozen here), then
    # the old one resumes: both read and apply as "twin" for a while.
    r = redis_server.client()
    expected = push_random(r, 8000, names=20)
    old = spawn_worker(redis_server.url, consumer="twin", **FAST)
    old.wait_for_log('"batch"')
    old.signal(signal.SIGSTOP)
    new = spawn_worker(redis_server.url, consumer="twin", **FAST)
    new.wait_for_log('"batch"')
    time.sleep(0.5)  # past the old one's lock TTL
    old.signal(signal.SIGCONT)
    wait_drained(r, 90)
    assert_exact(r, expected)
    stop_cleanly(old, new)


def test_exactly_once_across_a_redis_restart_with_aof(aof_redis: Any, spawn_worker: Any) -> None:
    r = aof_redis.client()
    expected = push_random(r, 6000, names=30)
    workers = [spawn_worker(aof_redis.url, **FAST) for _ in range(2)]
    wait_until(
        lambda: (
            r.xinfo_groups(STREAM)
            and r.xinfo_groups(STREAM)[0]["entries-read"]
            and r.xinfo_groups(STREAM)[0]["entries-read"] > 1000
        ),
        30,
        "some progress",
    )
    aof_redis.kill()  # SIGKILL: no chance to flush anything beyond what AOF already has
    time.sleep(0.5)
    aof_redis.start()
    r = aof_redis.client()
    wait_drained(r, 90)
    assert_exact(r, expected)
    for worker in workers:
        assert "redis unavailable" in worker.log()
    stop_cleanly(*workers)


def test_connection_lost_between_the_xack_and_the_marker_removal_leaves_no_marker_behind(
    redis_server: Any, spawn_worker: Any
) -> None:
    # Redis read the round trip's XACK, not the finish after it (a network failure mid-
    # round): the entries are acknowledged and their markers must not stay 30 days.
    r = redis_server.client()
    expected = push_random(r, 3000, names=10)
    worker = faulty(spawn_worker, redis_server.url, "finish", action="cut")
    wait_drained(r, 60)
    assert_exact(r, expected)  # counted once, and no marker left
    assert "redis unavailable; retrying" in worker.log()
    stop_cleanly(worker)


def test_entries_applied_before_an_outage_longer_than_the_dedupe_window_count_once(
    aof_redis: Any, spawn_worker: Any
) -> None:
    # Killed between the apply and the XACK, then Redis is down for twice the window: the
    # entry markers must outlive it, or the survivor counts the applied batch again.
    r = aof_redis.client()
    expected = push_random(r, 3000, names=10)
    window = {"dedupe_window_ms": 1000}
    victim = faulty(spawn_worker, aof_redis.url, "write", when="after", **window)
    assert victim.wait(10) == -signal.SIGKILL
    aof_redis.kill()
    time.sleep(2.0)
    aof_redis.start()
    r = aof_redis.client()
    survivor = spawn_worker(aof_redis.url, **FAST, **window)
    wait_drained(r, 60)
    assert_exact(r, expected)
    stop_cleanly(survivor)
    (stopped,) = [json.loads(line) for line in survivor.log().splitlines() if '"stopped"' in line]
    assert stopped["duplicates"] > 0  # the applied batch was found by its markers, not redone


def test_producer_retries_with_the_same_event_id_are_counted_once(
    redis_server: Any, spawn_worker: Any
) -> None:
    r = redis_server.client()
    expected = push_random(r, 1500, names=10, seed=7, with_event_ids=True)
    entries = r.xrange(STREAM)
    rng = random.Random(3)
    for _id, fields in rng.sample(entries, 400):  # the producer's XADD retried
        r.xadd(STREAM, fields)  # type: ignore[arg-type]
    workers = [spawn_worker(redis_server.url, **FAST) for _ in range(2)]
    wait_drained(r, 60)
    assert values(r, set(expected)) == dict(expected)
    assert dead_letters(r) == []
    stop_cleanly(*workers)


def test_exactly_once_while_replicas_are_killed_at_random(
    redis_server: Any, spawn_worker: Any
) -> None:
    r = redis_server.client()
    expected, invalid = push_with_invalid(r, 8000)
    rng = random.Random(11)
    workers = [spawn_worker(redis_server.url, **FAST) for _ in range(3)]
    deadline = time.monotonic() + 5
    kills = 0
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 0.4))
        victim = workers.pop(rng.randrange(len(workers)))
        victim.kill()
        kills += 1
        workers.append(spawn_worker(redis_server.url, **FAST))
    wait_drained(r, 90)
    assert kills >= 10
    assert_exact(r, expected, invalid)


def test_valid_events_are_kept_not_dead_lettered_while_redis_refuses_writes_for_oom(
    redis_server: Any, spawn_worker: Any
) -> None:
    r = redis_server.client()
    expected = push_random(r, 20_000, names=10)
    worker = spawn_worker(redis_server.url, max_deliveries=2, **FAST)
    worker.wait_for_log('"batch"')  # mid-stream
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", 1)  # every write that may grow memory is refused: OOM
    try:
        worker.wait_for_log("maxmemory")
        time.sleep(1.0)  # several refused attempts, more than MAX_DELIVERIES
    finally:
        r.config_set("maxmemory", 0)
    wait_drained(r, 60)
    assert_exact(r, expected)  # nothing dead-lettered, nothing lost
    assert worker.log().count("redis unavailable; retrying") >= 3
    stop_cleanly(worker)


def test_connection_cuts_neither_lose_nor_dead_letter_valid_events(
    redis_server: Any, spawn_worker: Any
) -> None:
    r = redis_server.client()
    expected = push_random(r, 20_000, names=20)
    workers = [spawn_worker(redis_server.url, max_deliveries=2, **FAST) for _ in range(2)]
    cuts = 0
    while not drained(r) and cuts < 40:
        time.sleep(0.1)
        cuts += int(r.client_kill_filter(_type="normal", skipme=True))
    wait_drained(r, 60)
    assert cuts >= 5
    assert_exact(r, expected)
    for worker in workers:
        assert "redis unavailable; retrying" in worker.log()
    stop_cleanly(*workers)


def test_three_replicas_at_the_smallest_accepted_settings_dead_letter_no_valid_event(
    redis_server: Any, spawn_worker: Any
) -> None:
    # No fault at all, but every timing at the edge the settings accept and three replicas
    # on three hot counters: entries wait in hand behind busy lanes, are held and carried;
    # none may look idle to another replica (each claim counts a delivery, and the second
    # one would dead-letter a valid event).
    r = redis_server.client()
    expected = push_random(r, 30_000, names=3)
    smallest = {
        "claim_idle_ms": 1000,
        "lock_ttl_ms": 100,
        "lock_wait_ms": 250,
        "block_ms": 1,
        "shutdown_grace_ms": 1251,
        "max_deliveries": 2,
        "dedupe_window_ms": 1000,
        "batch_size": 10,
    }
    workers = [spawn_worker(redis_server.url, **smallest) for _ in range(3)]
    wait_drained(r, 120)
    assert_exact(r, expected)  # nothing dead-lettered
    for worker in workers:
        assert "claimed idle entries" not in worker.log()
    stop_cleanly(*workers)


def test_three_idle_replicas_on_a_quiet_stream_stay_in_the_group_and_listed_live(
    redis_server: Any, spawn_worker: Any
) -> None:
    # Seen on Redis 7.0: quiet for longer than 10 x CLAIM_IDLE_MS, idle replicas removed
    # each other from the group (an empty read does not reset a consumer's idle time).
    r = redis_server.client()
    expected = push_random(r, 300, names=3)
    workers = [spawn_worker(redis_server.url, **FAST) for _ in range(3)]
    wait_drained(r, 20)
    assert values(r, expected) == dict(expected)
    names = {bytes(c["name"]) for c in r.xinfo_consumers(STREAM, "stream-counter")}
    time.sleep(10 * FAST["claim_idle_ms"] / 1000 + 1.5)  # quiet, past the pruning age
    after = {bytes(c["name"]) for c in r.xinfo_consumers(STREAM, "stream-counter")}
    assert names <= after  # none removed (a replica's claim page may add its own name)
    assert set(replicas.live(r, STREAM, 5_000)) == {"worker-0", "worker-1", "worker-2"}
    assert not any("removed idle consumers" in w.log() for w in workers)
    stop_cleanly(*workers)
