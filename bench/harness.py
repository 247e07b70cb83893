"""The bench's Redis, its data, the preload with an armed start, and the correctness check.

Every measurement starts from FLUSHALL and the same events (seeded RNG). The first N-1
events are preloaded with pipelined XADD and the group is created at ``$``; once every
consumer process is up and blocked in XREADGROUP, the group is moved back to ``0``
(``XGROUP SETID ... 0 ENTRIESREAD 0``) and the N-th event is added, which wakes all of
them at once. So the group consumes the whole stream from 0, and replicas that take
different times to import start on the same instant (a fair 2- or 4-replica race).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property

import redis

from worker import server
from worker.server import free_port

STREAM = "events"
GROUP = "bench"
DEAD_LETTER = f"{STREAM}:dead"
PRELOAD_CHUNK = 5000


class BenchFailure(Exception):
    """A wrong result or a broken consumer: the benchmark stops and says why."""


def value_key(name: str) -> str:
    """Same layout as worker/counters.py ``value_key``."""
    return f"sc:{{{name}}}:v"


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence, temp --dir."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="stream-counter-bench-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, protocol=2)

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        r = self.client()
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchFailure(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def version(self) -> str:
        return str(self.client().info("server")["redis_version"])

    def stop(self) -> None:
        if self.proc is not None:
            server.stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Dataset:
    """``size`` counters, events drawn uniformly; amounts 1..9, about 20% decrements."""

    size: int
    events: int
    seed: int = 1
    _expected: dict[int, dict[str, int]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.size:,} counter" + ("" if self.size == 1 else "s")

    def name(self, i: int) -> str:
        return "hot" if self.size == 1 else f"c{i}"

    @cached_property
    def entries(self) -> list[tuple[bytes, ...]]:
        """XADD field/value lists, in stream order (generated once, then reused)."""
        rng = random.Random(self.seed * 1_000_003 + self.size)
        out: list[tuple[bytes, ...]] = []
        for _ in range(self.events):
            name = self.name(rng.randrange(self.size)).encode()
            amount = str(rng.randint(1, 9)).encode()
            roll = rng.random()
            if roll < 0.2:
                out.append((b"counter", name, b"op", b"decr", b"amount", amount))
            elif roll < 0.3:
                out.append((b"counter", name, b"op", b"incr", b"amount", amount))
            else:
                out.append((b"counter", name, b"amount", amount))
        return out

    def expected(self, n: int) -> dict[str, int]:
        """Counter name -> sum of the first ``n`` events (every counter they touch)."""
        if n not in self._expected:
            sums: dict[str, int] = {}
            for fields in self.entries[:n]:
                name = fields[1].decode()
                sign = -1 if fields[3] == b"decr" else 1
                sums[name] = sums.get(name, 0) + sign * int(fields[-1])
            self._expected[n] = sums
        return self._expected[n]


def preload(r: redis.Redis, data: Dataset, n: int) -> None:
    """FLUSHALL, XADD the first n-1 events, create the group at the end (armed, see top)."""
    if not 2 <= n <= data.events:
        raise ValueError(f"need 2 <= n <= {data.events}, got {n}")
    r.flushall()
    pipe = r.pipeline(transaction=False)
    for fields in data.entries[: n - 1]:
        pipe.execute_command("XADD", STREAM, "*", *fields)
        if len(pipe) >= PRELOAD_CHUNK:
            pipe.execute()
    pipe.execute()
    r.execute_command("XGROUP", "CREATE", STREAM, GROUP, "$")


def release(r: redis.Redis, data: Dataset, n: int) -> None:
    """Rewind the group to 0 and add the n-th event: every blocked consumer wakes now."""
    r.execute_command("XGROUP", "SETID", STREAM, GROUP, "0", "ENTRIESREAD", "0")
    r.execute_command("XADD", STREAM, "*", *data.entries[n - 1])


def blocked_readers(r: redis.Redis) -> int:
    """Clients blocked in XREADGROUP (a consumer ready for the armed start)."""
    return sum(
        1 for c in r.client_list() if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "")
    )


def group_state(r: redis.Redis) -> tuple[int, int]:
    """(entries-read, pending) of the bench group."""
    for g in r.xinfo_groups(STREAM):
        if g["name"] in (GROUP, GROUP.encode()):
            return int(g.get("entries-read") or 0), int(g["pending"])
    raise BenchFailure(f"consumer group {GROUP!r} vanished")


def scan_keys(r: redis.Redis, pattern: str) -> list[bytes]:
    return list(r.scan_iter(match=pattern, count=10_000))


def bookkeeping_keys(r: redis.Redis) -> list[str]:
    """Keys ``sc:*`` that are not counter values: locks, markers (exactly-once bookkeeping)."""
    return sorted(k.decode() for k in scan_keys(r, "sc:*") if not k.endswith(b":v"))


def other_keys(r: redis.Redis) -> list[str]:
    """Keys outside ``sc:*`` other than the stream itself (informational)."""
    keys = (k.decode() for k in r.scan_iter(count=10_000))
    return sorted(k for k in keys if not k.startswith("sc:") and k != STREAM)


def check(r: redis.Redis, data: Dataset, n: int, who: str) -> None:
    """Every counter must equal the sum of its events; nothing pending, nothing dead-lettered,
    no counter that should not exist. Raises BenchFailure naming what is wrong."""
    read, pending = group_state(r)
    problems: list[str] = []
    if read != n or pending:
        problems.append(f"group: entries-read={read} (want {n}), pending={pending} (want 0)")
    dead = r.xlen(DEAD_LETTER) if r.exists(DEAD_LETTER) else 0
    if dead:
        problems.append(f"{dead} entries in the dead-letter stream {DEAD_LETTER!r}")
    expected = data.expected(n)
    names = list(expected)
    wrong: list[str] = []
    for start in range(0, len(names), 10_000):
        chunk = names[start : start + 10_000]
        for name, raw in zip(chunk, r.mget([value_key(x) for x in chunk]), strict=True):
            got = None if raw is None else int(raw)
            if got != expected[name]:
                wrong.append(f"{name}: expected {expected[name]}, got {got}")
    if wrong:
        problems.append(
            f"{len(wrong)} of {len(names)} counters WRONG, e.g. " + "; ".join(wrong[:5])
        )
    stray = [k for k in scan_keys(r, "sc:*:v") if k.decode()[4:-3] not in expected]
    if stray:
        problems.append(f"{len(stray)} counters that no event names, e.g. {stray[:3]}")
    if problems:
        raise BenchFailure(f"{who} on {data.label}, {n:,} events: " + " | ".join(problems))
