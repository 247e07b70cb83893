"""Operator-facing faults: a deleted consumer group, dead replicas' names, mixed windows, a
Redis that may evict keys."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import redis
from helpers import (
    GROUP,
    STREAM,
    Logs,
    MakeConsumer,
    apply_events,
    beat,
    delivered_to,
    drained,
    log_lines,
    push,
    push_random,
    turn_until,
    values,
    wait_drained,
)
from hypothesis import given
from hypothesis import strategies as st

from config import Settings
from config.settings import MIN_CLAIM_IDLE_MS
from worker import counters, replicas
from worker.connection import connect, ensure_group
from worker.errors import ExitCode
from worker.events import parse
from worker.reclaim import Reclaimer


def consumers(r: redis.Redis) -> set[bytes]:
    return {bytes(c["name"]) for c in r.xinfo_consumers(STREAM, GROUP)}


def test_deleted_group_is_not_recreated_from_the_start_and_nothing_is_counted_twice(
    redis_server: Any, spawn_worker: Any
) -> None:
    r = redis_server.client()
    expected = push_random(r, 300, names=5)
    worker = spawn_worker(redis_server.url, block_ms=100)
    wait_drained(r, 30)
    r.xgroup_destroy(STREAM, GROUP)  # an operator's mistake
    worker.wait_for_log("consumer group deleted; waiting for an operator")
    time.sleep(0.5)
    assert values(r, set(expected)) == dict(expected)  # not counted a second time
    assert not r.xinfo_groups(STREAM)
    r.xgroup_create(STREAM, GROUP, "$")  # the fix the log line suggests
    push(r, "c0", 10)
    wait_drained(r, 30)
    assert values(r, {"c0"}) == {"c0": expected["c0"] + 10}
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0


def test_group_lost_with_the_data_of_a_fresh_redis_is_created_again(r: redis.Redis) -> None:
    assert ensure_group(r, STREAM, GROUP) is True
    r.flushall()  # Redis restarted without persistence: group and marker are both gone
    assert ensure_group(r, STREAM, GROUP) is True


def test_names_of_dead_replicas_with_nothing_pending_are_removed_from_the_group(
    r: redis.Redis, redis_server: Any
) -> None:
    push(r, "a", 1)
    push(r, "b", 1)
    ensure_group(r, STREAM, GROUP)
    ((entry_a, _),) = r.xreadgroup(GROUP, "dead-idle", {STREAM: ">"}, count=1)[0][1]
    r.xack(STREAM, GROUP, entry_a)  # dead-idle: nothing pending
    r.xreadgroup(GROUP, "dead-busy", {STREAM: ">"}, count=1)  # dead-busy: one pending
    settings = Settings(redis_url=redis_server.url, consumer="live")
    reclaimer = Reclaimer(connect(settings), STREAM, GROUP, "live", 100)
    assert reclaimer.prune_consumers() == []  # not idle long enough yet
    time.sleep(1.1)  # 10 x CLAIM_IDLE_MS
    assert reclaimer.prune_consumers() == [b"dead-idle"]
    names = {c["name"] for c in r.xinfo_consumers(STREAM, GROUP)}
    assert names == {b"dead-busy"}  # its pending entry keeps it until someone claims it


def test_idle_replicas_that_say_they_are_alive_are_never_removed_from_the_group(
    r: redis.Redis, redis_server: Any
) -> None:
    # Redis 7.0: a read that returns nothing does not reset a consumer's idle time, so a
    # live replica on a quiet stream looks as idle as a dead one; its heartbeat keeps it.
    ensure_group(r, STREAM, GROUP)
    for name in ("dead-idle", "live-idle"):
        push(r, "a", 1)
        ((entry, _),) = r.xreadgroup(GROUP, name, {STREAM: ">"}, count=1)[0][1]
        r.xack(STREAM, GROUP, entry)
    settings = Settings(redis_url=redis_server.url, consumer="live")
    reclaimer = Reclaimer(connect(settings), STREAM, GROUP, "live", 100)
    time.sleep(1.1)  # both idle for 10 x CLAIM_IDLE_MS
    beat(r, "live-idle", 10_000)  # as it does every reclaim interval
    assert reclaimer.prune_consumers() == [b"dead-idle"]
    assert consumers(r) == {b"live-idle"}
    assert set(replicas.live(r, STREAM, 5_000)) == {"live-idle"}


@given(claim_idle_ms=st.integers(MIN_CLAIM_IDLE_MS, 10**9))
def test_a_replica_in_the_longest_turn_its_settings_allow_still_counts_as_alive(
    claim_idle_ms: int,
) -> None:
    # Between two heartbeats a replica may sweep (the interval) and then finish batches
    # whose busy entries wait up to LOCK_WAIT_MS, which the settings cap at CLAIM_IDLE_MS / 4.
    # (The first window, 3 intervals + 1 s, missed it from CLAIM_IDLE_MS = 40 s on.)
    wait = claim_idle_ms // 4
    settings = Settings(
        claim_idle_ms=claim_idle_ms,
        lock_ttl_ms=100,
        lock_wait_ms=wait,
        shutdown_grace_ms=wait + 5000,
    )
    longest_gap_ms = replicas.interval_s(claim_idle_ms) * 1000 + settings.lock_wait_ms
    assert replicas.live_window_ms(claim_idle_ms) >= longest_gap_ms + 1000


def test_a_turn_waiting_the_longest_lock_wait_is_alive_for_the_liveness_probe(
    make_consumer: MakeConsumer,
) -> None:
    consumer = make_consumer(claim_idle_ms=600_000, lock_wait_ms=150_000, shutdown_grace_ms=160_000)
    consumer.turn()
    consumer.last_progress = time.monotonic() - 120  # 2 minutes on busy locks, within 150 s
    healthy, why = consumer.alive()
    assert healthy, why


def test_a_running_replica_is_listed_live_and_leaves_the_list_on_shutdown(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    consumer = make_consumer()
    consumer.turn()
    (age,) = replicas.live(r, STREAM, 5_000).values()
    assert 0 <= age < 1_000
    consumer.hand_back()
    assert replicas.live(r, STREAM, 5_000) == {}


def test_replicas_set_shares_the_streams_cluster_slot() -> None:
    assert replicas.replicas_key("events") == "{events}:replicas"
    assert replicas.replicas_key("{tenant-1}:events") == "{tenant-1}:events:replicas"
    assert replicas.replicas_key("odd{name") == "{odd{name}:replicas"  # tag: "odd{name"


def test_a_replica_with_a_shorter_window_does_not_shorten_existing_markers(
    r: redis.Redis,
) -> None:
    r.set(counters.lane_key("w", "me"), "t", px=10_000)
    day = 86_400_000
    first = parse(b"1-0", [b"counter", b"w", b"event_id", b"k1"])
    second = parse(b"2-0", [b"counter", b"w", b"event_id", b"k2"])
    apply_events(r, "w", "t", [first], day)
    apply_events(r, "w", "t", [second], 1_000)
    assert r.pttl(counters.event_ids_key("w")) > day - 60_000
    time.sleep(1.1)  # the short-window marker is gone; the day-long one must not be
    retry = parse(b"3-0", [b"counter", b"w", b"event_id", b"k1"])
    assert apply_events(r, "w", "t", [retry], 1_000).outcome is counters.Written.ALREADY_APPLIED
    assert values(r, {"w"}) == {"w": 2}


def test_replica_with_nothing_pending_leaves_the_group_on_shutdown(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    push(r, "a", 1)
    consumer = make_consumer()
    turn_until(consumer, lambda: drained(r))
    assert b"live" in consumers(r)
    consumer.hand_back()
    assert b"live" not in consumers(r)


def test_shutdown_keeps_the_name_when_a_same_name_process_has_an_entry_pending(
    r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    consumer = make_consumer()
    entry = push(r, "a", 1)
    r.xreadgroup(GROUP, "live", {STREAM: ">"}, count=10)  # a twin with our name took it
    consumer.hand_back()
    assert b"live" in consumers(r)
    (info,) = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert (info["message_id"], info["consumer"]) == (entry, b"live")  # not lost


# -- Redis that may evict keys ---------------------------------------------------------------

FAST = {"claim_idle_ms": 1000, "lock_ttl_ms": 300, "lock_wait_ms": 200, "block_ms": 100}


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_worker_refuses_to_start_on_a_redis_that_may_evict_keys(
    own_redis: Any, spawn_worker: Any, policy: str
) -> None:
    r, redis_server = own_redis.client(), own_redis  # its configuration is changed
    r.config_set("maxmemory-policy", policy)
    push(r, "a", 1)
    worker = spawn_worker(redis_server.url, **FAST)
    assert worker.wait(10) == ExitCode.REDIS
    (refused,) = [line for line in worker.log().splitlines() if "cannot run" in line]
    assert f"maxmemory-policy is {policy}" in refused
    assert "noeviction" in refused
    assert r.get(counters.value_key("a")) is None


def test_worker_stops_applying_while_redis_may_evict_keys_and_resumes_when_it_cannot(
    own_redis: Any, spawn_worker: Any
) -> None:
    r, redis_server = own_redis.client(), own_redis  # its configuration is changed
    expected = push_random(r, 500, names=5, seed=1)
    worker = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, 30)
    r.config_set("maxmemory-policy", "volatile-lru")  # an operator's change, at run time
    worker.wait_for_log("redis may evict keys; not applying until it cannot", timeout=5)
    before = values(r, set(expected))
    expected.update(push_random(r, 500, names=5, seed=2))
    time.sleep(1.5)  # several checks: still refused, nothing applied
    assert values(r, set(expected)) == before
    assert worker.proc.poll() is None
    r.config_set("maxmemory-policy", "noeviction")
    wait_drained(r, 30)
    assert values(r, set(expected)) == dict(expected)
    assert worker.log().count("redis may evict keys") >= 2  # said again while it lasted
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == ExitCode.OK


def test_search_for_deleted_entries_refused_by_an_acl_gives_up_and_counting_goes_on(
    r: redis.Redis, own_redis: Any, make_consumer: MakeConsumer, logs: Logs
) -> None:
    # A user that may not SCAN: the search for a deleted entry's marker fails for good.
    r.acl_setuser("noscan", enabled=True, nopass=True, keys=["*"], commands=["+@all", "-scan"])
    gone = delivered_to(r, "dead", "d", 5)
    r.xdel(STREAM, gone)
    push(r, "d", 2)
    time.sleep(1.05)  # CLAIM_IDLE_MS
    url = f"redis://noscan@127.0.0.1:{own_redis.port}/0"
    consumer = make_consumer(redis_url=url)
    turn_until(consumer, lambda: drained(r) and not consumer.deleted.busy())
    assert values(r, {"d"}) == {"d": 2}
    (gave_up,) = log_lines(logs, "could not look for the markers of deleted entries")
    assert gave_up["ids"] == [gone.decode()]
    assert "NOPERM" in gave_up["error"] or "permission" in gave_up["error"]
