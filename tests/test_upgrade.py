"""Safe upgrades: replicas that do not work on the same terms (protocol version, LOCK_TTL_MS,
CLAIM_IDLE_MS) never apply side by side (worker/replicas.py). Real worker processes."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from helpers import STREAM, cli, free_port, push_random, values, wait_drained, wait_until

from worker import replicas

pytestmark = pytest.mark.chaos

FAST = {"claim_idle_ms": 1000, "lock_ttl_ms": 300, "lock_wait_ms": 200, "block_ms": 100}
WAITING = "replicas of this group work on other terms; not applying until they agree"


@contextmanager
def replica_beating(r: redis.Redis, name: str, terms: str) -> Iterator[None]:
    """A live replica that says it works on ``terms`` (as a replica of another version of
    stream-counter would), for as long as the block lasts."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            replicas.beat(r, STREAM, name, 10_000, terms, 2_500)
            stop.wait(0.2)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def applied(r: redis.Redis, names: Any) -> int:
    return sum(abs(v) for v in values(r, names).values())


def test_rolling_upgrade_new_replica_waits_while_an_old_protocol_replica_lives(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    # A Deployment rolled the Kubernetes way: old and new replicas side by side for a while.
    old = spawn_worker(redis_server.url, protocol=replicas.PROTOCOL - 1, **FAST)
    old.wait_for_log('"connected"')
    wait_until(lambda: bool(replicas.live(r, STREAM, 2_500)), 5, "the old replica's beat")
    port = free_port()
    new = spawn_worker(redis_server.url, metrics_port=port, **FAST)
    new.wait_for_log(WAITING)
    old.wait_for_log(WAITING)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
        assert reply.status == 200  # ready while waiting, so that the rollout goes on
    expected = push_random(r, 2000, names=10)
    time.sleep(1.0)
    assert applied(r, expected) == 0  # never side by side with another protocol
    status = json.loads(cli(redis_server.url, "status", "--json").stdout)
    assert status["replicas_agree"] is False
    assert status["replica_terms"]["worker-0"].startswith(f"protocol={replicas.PROTOCOL - 1} ")
    old.signal(signal.SIGTERM)  # the rollout stops the old replica
    assert old.wait(10) == 0
    wait_drained(r, 20)  # the new one carries on alone
    assert values(r, expected) == dict(expected)
    assert json.loads(cli(redis_server.url, "status", "--json").stdout)["replicas_agree"]
    new.signal(signal.SIGTERM)
    assert new.wait(10) == 0


def test_a_new_replica_waits_for_a_live_replica_that_only_beats_with_older_terms(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    old_terms = replicas.terms(300, 1000).replace(f"protocol={replicas.PROTOCOL}", "protocol=1")
    expected = push_random(r, 2000, names=10)
    with replica_beating(r, "old-replica", old_terms):
        new = spawn_worker(redis_server.url, **FAST)
        new.wait_for_log(WAITING)
        time.sleep(1.0)
        assert applied(r, expected) == 0
    wait_drained(r, 20)  # the old replica is gone: the new one carries on
    assert values(r, expected) == dict(expected)


def test_replicas_with_a_different_lock_ttl_never_apply_until_one_is_gone(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    first = spawn_worker(redis_server.url, **FAST)
    first.wait_for_log('"connected"')
    wait_until(lambda: bool(replicas.live(r, STREAM, 2_500)), 5, "the first replica's beat")
    second = spawn_worker(redis_server.url, **{**FAST, "lock_ttl_ms": 400})
    second.wait_for_log(WAITING)
    first.wait_for_log(WAITING)
    expected = push_random(r, 2000, names=10)  # while they disagree
    time.sleep(1.5)
    assert applied(r, expected) == 0  # both wait: nothing applied
    (line, *_) = [json.loads(x) for x in second.log().splitlines() if WAITING in x]
    assert "lock_ttl_ms=300" in json.dumps(line["theirs"])
    second.signal(signal.SIGTERM)
    assert second.wait(10) == 0
    wait_drained(r, 20)
    assert values(r, expected) == dict(expected)
