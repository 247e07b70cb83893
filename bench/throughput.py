"""Throughput of one worker process against baselines, on the same data, in one run.

    python bench/throughput.py [--events 200000] [--counters 100] [--repeat 3]

Starts its own redis-server on a free loopback port; for every measurement it flushes Redis,
preloads the same events, consumes them, checks every counter (a fast wrong consumer is not
fast) and reports the median events/s and our ratio to each baseline.

Consumers:
  worker   ``stream-counter run`` as users run it, every guarantee on
  ceiling  batched pipeline: XREADGROUP COUNT 1000, INCRBY per counter, one XACK; no lock,
           no exactly-once (a ceiling, not a worker)
  plain    INCRBY + XACK per message
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis

STREAM, GROUP = "events", "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preload(r: redis.Redis, events: int, counters: int, seed: int = 1) -> Counter[str]:
    r.flushall()
    rng = random.Random(seed)
    expected: Counter[str] = Counter()
    pipe = r.pipeline(transaction=False)
    for _ in range(events):
        name = f"n{rng.randrange(counters)}"
        amount = rng.randint(1, 9)
        expected[name] += amount
        pipe.xadd(STREAM, {"counter": name, "amount": amount})
        if len(pipe) >= 2000:
            pipe.execute()
    pipe.execute()
    r.xgroup_create(STREAM, GROUP, "0")
    return expected


def check(r: redis.Redis, expected: Counter[str], key: Callable[[str], str]) -> None:
    names = sorted(expected)
    got = r.mget([key(n) for n in names])
    wrong = [n for n, v in zip(names, got, strict=True) if int(v or 0) != expected[n]]
    if wrong:
        raise SystemExit(f"WRONG counts for {len(wrong)} counters, e.g. {wrong[:3]}")


def run_worker(url: str, r: redis.Redis, events: int) -> float:
    env = dict(
        os.environ,
        STREAM_COUNTER_REDIS_URL=url,
        STREAM_COUNTER_STREAM=STREAM,
        STREAM_COUNTER_GROUP=GROUP,
        STREAM_COUNTER_LOG_LEVEL="WARNING",
        STREAM_COUNTER_BATCH_SIZE=os.environ.get("BENCH_BATCH", "1000"),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run"], env=env, stdout=subprocess.DEVNULL
    )
    try:
        start = None
        while True:
            info = r.xinfo_groups(STREAM)[0]
            read = info.get("entries-read") or 0
            if start is None and read > 0:
                start = time.perf_counter()
            if read >= events and info["pending"] == 0:
                assert start is not None
                return events / (time.perf_counter() - start)
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait(30)


def run_ceiling(r: redis.Redis, events: int) -> float:
    start = time.perf_counter()
    done = 0
    while done < events:
        reply = r.xreadgroup(GROUP, "ceiling", {STREAM: ">"}, count=1000)
        entries = reply[0][1]
        sums: Counter[bytes] = Counter()
        for _id, fields in entries:
            sums[fields[b"counter"]] += int(fields.get(b"amount", 1))
        pipe = r.pipeline(transaction=False)
        for name, total in sums.items():
            pipe.incrby(b"sc:{" + name + b"}:v", total)
        pipe.xack(STREAM, GROUP, *[i for i, _ in entries])
        pipe.execute()
        done += len(entries)
    return events / (time.perf_counter() - start)


def run_plain(r: redis.Redis, events: int) -> float:
    start = time.perf_counter()
    done = 0
    while done < events:
        reply = r.xreadgroup(GROUP, "plain", {STREAM: ">"}, count=100)
        for entry_id, fields in reply[0][1]:
            r.incrby(b"sc:{" + fields[b"counter"] + b"}:v", int(fields.get(b"amount", 1)))
            r.xack(STREAM, GROUP, entry_id)
            done += 1
    return events / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--counters", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--plain-events",
        type=int,
        default=20_000,
        help="the per-message loop is slow: fewer events for it",
    )
    args = parser.parse_args()

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    key = lambda n: f"sc:{{{n}}}:v"  # noqa: E731
    results: dict[str, list[float]] = {"worker": [], "ceiling": [], "plain": []}
    try:
        for _ in range(args.repeat):
            for name in results:
                n = args.plain_events if name == "plain" else args.events
                expected = preload(r, n, args.counters)
                if name == "worker":
                    rate = run_worker(url, r, n)
                elif name == "ceiling":
                    rate = run_ceiling(r, n)
                else:
                    rate = run_plain(r, n)
                check(r, expected, key)
                results[name].append(rate)
                print(f"  {name:8s} {rate:>10,.0f} events/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    medians = {k: statistics.median(v) for k, v in results.items()}
    ours = medians["worker"]
    print(f"\n{args.events:,} events, {args.counters} counters, median of {args.repeat}\n")
    print("| consumer | events/s | worker / this |")
    print("| --- | ---: | ---: |")
    for name, rate in medians.items():
        print(f"| {name} | {rate:,.0f} | {ours / rate:.2f} |")
    Path("bench/results").mkdir(parents=True, exist_ok=True)


if __name__ == "__main__":
    main()
