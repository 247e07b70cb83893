"""Producing events with known sums, and waiting for the group to drain."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

from config import ENV_PREFIX
from worker import counters, replicas
from worker.consumer import Consumer
from worker.events import parse
from worker.lock import Locks
from worker.scripts import Call, Pipe, Round
from worker.server import NoServer, find_binary
from worker.server import free_port as free_port  # for the tests

MakeConsumer = Callable[..., Consumer]
"""The ``make_consumer`` fixture: a Consumer driven in the test's process, one turn at a time."""


def _server() -> str:
    try:
        return str(find_binary())
    except NoServer:
        return "redis-server"  # the fixtures then say how to get a Redis


SERVER = os.environ.get("STREAM_COUNTER_TEST_SERVER") or _server()
"""The server binary the tests start: the one STREAM_COUNTER_TEST_SERVER names (CI runs the
suite again on the embedded valkey-server), else the demo's choice: redis-server on PATH,
valkey-server on PATH, the embedded one (the test extra installs it)."""

STREAM = "events"
GROUP = "stream-counter"


def push(
    r: redis.Redis,
    counter: str,
    delta: int = 1,
    event_id: str | None = None,
    stream: str = STREAM,
    **extra: str,
) -> bytes:
    fields: dict[str, str | int] = {"counter": counter}
    if delta < 0:
        fields["op"] = "decr"
    if abs(delta) != 1:
        fields["amount"] = abs(delta)
    if event_id is not None:
        fields["event_id"] = event_id
    fields.update(extra)
    return bytes(r.xadd(stream, fields))  # type: ignore[arg-type]


def delivered_to(r: redis.Redis, consumer: str, name: str, amount: int) -> bytes:
    """An event for counter ``name``, read by ``consumer`` (pending for it, once delivered)."""
    entry = push(r, name, amount)
    counters_group(r)
    got = r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1000)
    assert entry in [i for i, _ in got[0][1]]
    return entry


def applied_then_crashed(r: redis.Redis, consumer: str, name: str, amount: int) -> bytes:
    """An entry of counter ``name`` delivered to ``consumer``, which applied it under its
    lane and died before its XACK (the lane expires 50 ms later)."""
    entry = delivered_to(r, consumer, name, amount)
    r.set(counters.lane_key(name, consumer), "t-crashed", px=50)
    fields = [b"counter", name.encode(), b"amount", str(amount).encode()]
    result = apply_events(r, name, "t-crashed", [parse(entry, fields)], lanes=(consumer,))
    assert result.outcome is counters.Written.APPLIED
    return entry


def take_locks(r: redis.Redis, locks: Locks, keys: list[str]) -> dict[str, str]:
    """One lock attempt over ``keys``, as a replica makes it (lock_acquire.lua, one fresh
    token): key -> token of the locks taken."""
    token = locks.tokens.next()
    (taken,) = run_calls(r, [locks.acquire_call(keys, token)])
    return {key: token for key, ok in zip(keys, taken, strict=True) if ok == 1}


def counters_group(r: redis.Redis) -> None:
    """The consumer group, created from the start of the stream if missing."""
    try:
        r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def push_random(
    r: redis.Redis,
    n: int,
    names: int = 10,
    seed: int = 1,
    stream: str = STREAM,
    with_event_ids: bool = False,
) -> Counter[str]:
    """Push ``n`` valid events over ``names`` counters in pipelined chunks; return the sums."""
    rng = random.Random(seed)
    expected: Counter[str] = Counter()
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        name = f"c{rng.randrange(names)}"
        delta = rng.choice([1, 1, 1, 2, 5, -1, -3, 1000])
        expected[name] += delta
        fields: dict[str, str | int] = {"counter": name}
        if delta < 0:
            fields["op"] = "decr"
        if abs(delta) != 1:
            fields["amount"] = abs(delta)
        if with_event_ids:
            fields["event_id"] = f"ev-{seed}-{i}"
        pipe.xadd(stream, fields)  # type: ignore[arg-type]
        if len(pipe) >= 500:
            pipe.execute()
    pipe.execute()
    return expected


def values(r: redis.Redis, names: list[str] | set[str]) -> dict[str, int]:
    return counters.read_values(r, sorted(names))


def drained(r: redis.Redis, stream: str = STREAM, group: str = GROUP) -> bool:
    """Every entry of the stream delivered to the group and acknowledged."""
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return False
    for g in groups:
        if g["name"] in (group, group.encode()):
            last = r.xinfo_stream(stream)["last-generated-id"]
            return bool(g["pending"] == 0 and g["last-delivered-id"] == last)
    return False


def wait_until(condition: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def wait_drained(r: redis.Redis, timeout: float = 60, stream: str = STREAM) -> None:
    wait_until(lambda: drained(r, stream), timeout, f"group on {stream!r} to drain")


def bookkeeping_keys(r: redis.Redis) -> list[bytes]:
    """Locks and markers left in Redis (values and streams are not bookkeeping)."""
    return sorted(k for k in r.scan_iter(match="sc:*") if not k.endswith(b":v"))


def dead_letters(r: redis.Redis, stream: str = STREAM + ":dead") -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in r.xrange(stream)]


def apply_events(
    r: redis.Redis,
    name: str,
    token: str,
    events: list[Any],
    ttl_ms: int = 60_000,
    stream: bytes = STREAM.encode(),
    lanes: tuple[str, ...] = ("me",),
) -> counters.ApplyResult:
    """The apply script for one counter, as a replica that holds ``token`` on the lanes of
    ``lanes`` (consumer names) would call it."""
    keys = [counters.lane_key(name, c) for c in lanes]
    call = counters.apply_call(stream, token, [counters.Write(name, events)], ttl_ms, {name: keys})
    (raw,) = run_calls(r, [call])
    (result,) = counters.parse_apply(raw, 1)
    return result


def turn_until(consumer: Consumer, condition: Callable[[], bool], turns: int = 200) -> None:
    for _ in range(turns):
        consumer.turn()
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def pending_ids(r: redis.Redis) -> list[bytes]:
    return [p["message_id"] for p in r.xpending_range(STREAM, GROUP, "-", "+", 1000)]


Logs = list[dict[str, Any]]
"""The ``logs`` fixture: captured log lines, as structlog event dicts."""


def log_lines(logs: Logs, event: str) -> list[dict[str, Any]]:
    """The captured log lines (the ``logs`` fixture) whose event starts with ``event``."""
    return [line for line in logs if str(line.get("event", "")).startswith(event)]


class IdleWatch:
    """Samples, from another thread and connection, how long the pending entries have been
    idle, as another replica's reclaim sweep would see them at any moment."""

    def __init__(self, r: redis.Redis) -> None:
        self.client = redis.Redis(
            connection_pool=redis.ConnectionPool(**r.connection_pool.connection_kwargs)
        )
        self.longest = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            pending = self.client.xpending_range(STREAM, GROUP, "-", "+", 100)
            self.longest = max([self.longest, *(p["time_since_delivered"] for p in pending)])

    def __enter__(self) -> IdleWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_calls(r: redis.Redis, calls: list[Call]) -> list[Any]:
    """``calls`` sent as one pipeline (Redis runs them in order): one reply each, errors
    as values."""
    return Pipe(r).exchange([Round("", calls)])[0]


ROOT = Path(__file__).parent.parent


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env[ENV_PREFIX + "REDIS_URL"] = url
    env.update({ENV_PREFIX + k.upper(): v for k, v in extra.items()})
    return env


def cli(url: str, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``stream-counter ARGS`` in a process of its own, with ``STREAM_COUNTER_<KEY>`` set
    from ``extra_env`` and no other setting from the environment."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=cli_env(url, **extra_env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def beat(r: redis.Redis, name: str, keep_ms: int = 60_000) -> None:
    """A heartbeat of replica ``name`` on the default terms, as its loop sends one."""
    replicas.beat(r, STREAM, name, keep_ms, replicas.terms(10_000, 30_000), 5_000)


def scrape(port: int) -> dict[str, float]:
    """A worker's /metrics on ``port``, sample name -> value (unlabelled samples only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }
