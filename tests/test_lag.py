"""The group's lag, as ``status``, the metrics and external scalers read it (worker/lag.py)."""

from __future__ import annotations

from typing import Any

import redis
from helpers import GROUP, STREAM, Logs, MakeConsumer, drained, log_lines, push, turn_until

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


def test_worker_repairs_a_wrong_lag_after_redis_restarts_from_its_aof(
    aof_redis: Any, make_consumer: MakeConsumer, logs: Logs
) -> None:
    r = aof_redis.client()
    for i in range(3000):
        push(r, f"c{i % 7}", 1)
    consumer = make_consumer(redis_url=aof_redis.url)
    turn_until(consumer, lambda: drained(r), turns=500)
    for _ in range(3):  # killed and restarted from the AOF, a few times
        aof_redis.restart()
    r = aof_redis.client()
    r.execute_command("XGROUP", "SETID", STREAM, GROUP, "$", "ENTRIESREAD", 1)  # wrong
    consumer.start_over()  # as after the lost connection
    consumer.turn()
    assert redis_lag(r) == 0
    assert log_lines(logs, "redis reported a wrong lag for the drained group; repaired")
