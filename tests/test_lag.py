"""The group's lag, as ``status``, the metrics and external scalers read it (worker/lag.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis
from helpers import GROUP, STREAM, Logs, MakeConsumer, drained, log_lines, push, turn_until, values

from worker.connection import ensure_group
from worker.lag import Lag, group_lag


def redis_lag(r: redis.Redis) -> int | None:
    (info,) = r.xinfo_groups(STREAM)
    return info["lag"]


def test_lag_counts_entries_never_delivered_to_the_group(r: redis.Redis) -> None:
    for _ in range(5):
        push(r, "a", 1)
    ensure_group(r, STREAM, GROUP)
    assert group_lag(r, STREAM, GROUP) == Lag(5, "redis")
    r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=2)
    assert group_lag(r, STREAM, GROUP) == Lag(3, "redis")  # pending entries are not lag


def test_drained_group_has_lag_zero_and_a_wrong_redis_lag_is_repaired(r: redis.Redis) -> None:
    for _ in range(5):
        push(r, "a", 1)
    ensure_group(r, STREAM, GROUP)
    r.xreadgroup(GROUP, "c", {STREAM: ">"}, count=10)
    r.execute_command("XGROUP", "SETID", STREAM, GROUP, "$", "ENTRIESREAD", 1)
    assert redis_lag(r) == 4  # wrong, as seen after restarts from the AOF
    assert group_lag(r, STREAM, GROUP, repair=False) == Lag(0, "drained")
    assert redis_lag(r) == 4
    assert group_lag(r, STREAM, GROUP) == Lag(0, "drained", repaired=True)
    assert redis_lag(r) == 0  # what KEDA's lagCount reads
    assert group_lag(r, STREAM, GROUP) == Lag(0, "drained")  # nothing left to repair


def test_lag_unknown_to_redis_is_counted_then_capped_and_flagged(r: redis.Redis) -> None:
    ids = [push(r, "a", 1) for _ in range(6)]
    ensure_group(r, STREAM, GROUP)
    r.xdel(STREAM, ids[2])  # a deletion past the last delivered id: Redis cannot tell
    assert redis_lag(r) is None
    counted = group_lag(r, STREAM, GROUP)
    assert counted == Lag(5, "counted")
    assert counted.exact
    capped = group_lag(r, STREAM, GROUP, cap=3)
    assert capped == Lag(3, "capped")
    assert not capped.exact


def test_no_lag_without_the_stream_or_the_group(r: redis.Redis) -> None:
    assert group_lag(r, STREAM, GROUP) is None
    push(r, "a", 1)
    assert group_lag(r, STREAM, GROUP) is None


def rewrite_aof(r: redis.Redis) -> None:
    r.bgrewriteaof()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = r.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            return
        time.sleep(0.05)
    raise AssertionError("the AOF rewrite did not finish")


def test_worker_repairs_the_wrong_lag_redis_reports_after_an_aof_rewrite_and_a_restart(
    aof_redis: Any, make_consumer: MakeConsumer, logs: Logs
) -> None:
    """No injection: on Redis 7.0 the rewritten AOF keeps the group's entries-read, and the
    reads logged after it do not move it, so a restart brings back a lag of every entry
    read since the rewrite, with nothing left to deliver (as seen from outside)."""
    r = aof_redis.client()
    consumer = make_consumer(redis_url=aof_redis.url)
    for _ in range(2):
        for i in range(3000):
            push(r, f"c{i % 7}", 1)
        turn_until(consumer, lambda: drained(r), turns=500)
        rewrite_aof(r)  # as Redis does by itself when the AOF grows (auto-aof-rewrite)
    for i in range(3000):
        push(r, f"c{i % 7}", 1)
    turn_until(consumer, lambda: drained(r), turns=500)
    aof_redis.restart()
    r = aof_redis.client()
    wrong = redis_lag(r)
    if wrong == 0:
        pytest.skip("this server keeps the group's lag across AOF restarts (Redis >= 7.2?)")
    assert wrong == 3000, "Redis 7.0's own fault, reproduced"
    consumer.start_over()  # as after the lost connection
    consumer.turn()
    assert redis_lag(r) == 0  # what KEDA's lagCount reads
    assert log_lines(logs, "redis reported a wrong lag for the drained group; repaired")
    assert sum(values(r, {f"c{i}" for i in range(7)}).values()) == 9000
