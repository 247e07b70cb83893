"""The token lock (worker.lock) against a real Redis, and the backoff (worker.backoff)."""

from __future__ import annotations

import functools
import random
import time

import pytest
import redis
from helpers import run_calls, take_locks

from worker.backoff import Backoff, full_jitter, reconnect_delay
from worker.lock import Locks, Tokens
from worker.scripts import Call

TTL_MS = 10_000


class CountingConnection(redis.Connection):
    """A real connection that counts the packets (round trips) it sends."""

    sends = 0

    def send_packed_command(self, command: object, check_health: bool = True) -> None:
        type(self).sends += 1
        super().send_packed_command(command, check_health)


def counting_client(r: redis.Redis) -> redis.Redis:
    kwargs = {**r.connection_pool.connection_kwargs, "connection_class": CountingConnection}
    client = redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))
    client.ping()  # connect (handshake) before counting
    CountingConnection.sends = 0
    return client


def test_one_attempt_takes_free_keys_in_one_round_trip_and_skips_held_ones(r: redis.Redis) -> None:
    client = counting_client(r)
    locks = Locks(TTL_MS)
    r.set("held-1", "someone")
    r.set("held-2", "someone-else")
    keys = [f"free-{i}" for i in range(50)] + ["held-1", "held-2"]
    take_locks(client, locks, ["warm-up"])  # the first call also loads the script
    CountingConnection.sends = 0
    r.config_resetstat()
    got = take_locks(client, locks, keys)
    assert CountingConnection.sends == 1
    assert r.info("commandstats")["cmdstat_set"]["calls"] == 52
    assert set(got) == {f"free-{i}" for i in range(50)}
    for key, token in got.items():
        assert r.get(key) == token.encode()
        assert 0 < r.pttl(key) <= TTL_MS
    assert r.get("held-1") == b"someone"
    assert r.get("held-2") == b"someone-else"


def test_attempt_on_a_held_lock_does_not_overwrite_it_or_its_ttl(r: redis.Redis) -> None:
    first, second = Locks(TTL_MS), Locks(60_000)
    token = take_locks(r, first, ["k"])["k"]
    assert take_locks(r, second, ["k"]) == {}
    assert r.get("k") == token.encode()
    assert r.pttl("k") <= TTL_MS


def test_every_acquisition_gets_a_token_never_used_before(r: redis.Redis) -> None:
    seen: list[str] = []
    for _ in range(3):
        locks = Locks(TTL_MS)
        for round_ in range(20):
            got = take_locks(r, locks, [f"k{round_}-{i}" for i in range(10)])
            assert len(got) == 10
            assert len(set(got.values())) == 1  # one token per attempt, for all its keys
            seen += set(got.values())
        r.flushall()
    assert len(seen) == 60
    assert len(set(seen)) == 60  # never reused, across attempts and Locks instances


def test_token_generator_never_repeats() -> None:
    tokens = Tokens()
    assert len({tokens.next() for _ in range(10_000)}) == 10_000


# -- backoff ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_full_jitter_stays_within_zero_and_the_capped_exponential(seed: int) -> None:
    rng = random.Random(seed)
    for attempt in range(80):
        ceiling = min(0.1, 0.001 * 2 ** min(attempt, 62))
        for _ in range(20):
            assert 0 <= full_jitter(attempt, 0.001, 0.1, rng) <= ceiling


def test_backoff_delays_are_bounded_by_a_growing_capped_ceiling_and_jittered() -> None:
    backoff = Backoff(wait_ms=3_600_000, base_ms=1, cap_ms=100, rng=random.Random(7))
    delays = [d for _, d in zip(range(200), backoff.delays(), strict=False)]
    assert len(delays) == 200
    for k, d in enumerate(delays):
        assert 0 <= d <= min(0.1, 0.001 * 2**k)
    assert len(set(delays)) > 150  # jittered, not a fixed interval
    # the ceiling grows: late delays are on average far larger than the first ones
    assert sum(delays[:3]) / 3 < 0.004
    assert sum(delays[-100:]) / 100 > 0.02


def test_backoff_is_jittered_between_two_waiters_with_different_seeds() -> None:
    a = list(zip(range(30), Backoff(60_000, rng=random.Random(1)).delays(), strict=False))
    b = list(zip(range(30), Backoff(60_000, rng=random.Random(2)).delays(), strict=False))
    assert a != b


def test_backoff_stops_once_the_wait_budget_is_spent() -> None:
    start = time.monotonic()
    slept = 0.0
    for n, delay in enumerate(Backoff(wait_ms=150, base_ms=5, cap_ms=40).delays()):
        time.sleep(delay)
        slept += delay
        assert n < 1_000, "backoff never ended"
    elapsed = time.monotonic() - start
    assert slept <= 0.150 + 1e-9  # no delay reaches past the budget
    assert elapsed < 1.0


def test_backoff_with_zero_budget_yields_nothing() -> None:
    assert list(Backoff(wait_ms=0).delays()) == []


@pytest.mark.parametrize("attempt", [1, 2, 5, 10, 50, 1_000, 10**6])
def test_reconnect_delay_is_positive_and_capped_at_five_seconds(attempt: int) -> None:
    rng = random.Random(attempt)
    for _ in range(50):
        assert 0.01 <= reconnect_delay(attempt, rng) <= 5.0


def test_reconnect_delay_starts_small_and_grows() -> None:
    rng = random.Random(3)
    first = [reconnect_delay(1, rng) for _ in range(200)]
    late = [reconnect_delay(20, rng) for _ in range(200)]
    assert max(first) <= 0.05
    assert sum(late) / len(late) > 1.5


def take_turn(r: redis.Redis, me: str, token: str) -> int:
    """One attempt at lock "k" with waiter key "k:next", as replica ``me``."""
    call = Locks(TTL_MS).acquire_call(["k"], token, waiters=["k:next"], me=me)
    ((taken,),) = run_calls(r, [call])
    return int(taken)


def test_replica_coming_back_to_a_busy_lock_leaves_it_to_the_one_waiting(
    r: redis.Redis,
) -> None:
    attempt = functools.partial(take_turn, r)
    assert attempt("A", "a-1") == 1
    assert attempt("B", "b-1") == 0  # busy: B is now the waiter
    assert r.get("k:next") == b"B"
    assert 0 < r.pttl("k:next") <= 500
    assert r.delete("k")  # A releases it
    assert attempt("A", "a-2") == 0  # free, but B has been waiting: A lets it have it
    assert r.exists("k") == 0
    assert attempt("B", "b-2") == 1  # B's turn; its claim is cleared
    assert r.get("k") == b"b-2"
    assert r.exists("k:next") == 0


def test_waiting_replica_renews_its_turn_while_the_lock_stays_busy(r: redis.Redis) -> None:
    attempt = functools.partial(take_turn, r)
    assert attempt("A", "a-1") == 1
    assert attempt("B", "b-1") == 0
    time.sleep(0.3)
    assert attempt("C", "c-1") == 0  # a second waiter does not take B's place
    assert attempt("B", "b-2") == 0  # B, still waiting, renews its place
    assert r.get("k:next") == b"B"
    assert r.pttl("k:next") > 400


def test_locks_are_taken_before_a_later_read_in_the_same_pipeline_after_script_flush(
    r: redis.Redis,
) -> None:
    locks = Locks(TTL_MS)
    r.script_flush()  # as after a Redis restart
    taken, seen = run_calls(r, [locks.acquire_call(["k"], "t-1"), Call.command("GET", "k")])
    assert taken == [1]
    assert seen == b"t-1"  # the read ran after the lock was taken, as sent
