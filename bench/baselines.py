"""The baselines the worker is measured against, each a consumer process of its own.

    python -m bench.baselines KIND --port PORT [--consumer NAME]

Like the worker, a baseline reads the bench stream through the bench group until SIGTERM,
then exits 0. They write the same ``sc:{<name>}:v`` keys, so one checker serves all.

  ceiling         XREADGROUP COUNT 1000, then one pipeline: INCRBY per message and one XACK
                  of the batch. Batched, no lock, no exactly-once: a ceiling, not a worker.
  ceiling-summed  the same, but one INCRBY per counter with the batch's sum (informational).
  plain           per message: INCRBY, then XACK; one round trip each (read COUNT 100).
  naive           the seed's algorithm, per message: lock with SET NX EX 5 polled every
                  0.1 s until acquired, GET, SET value+delta, DEL the lock, XACK (read COUNT
                  100). One process never waits for its own lock.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

if __package__ in (None, ""):  # python bench/baselines.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import GROUP, STREAM

Entry = tuple[bytes, dict[bytes, bytes]]


def delta(fields: dict[bytes, bytes]) -> int:
    amount = int(fields.get(b"amount", b"1"))
    return -amount if fields.get(b"op") == b"decr" else amount


def key(name: bytes) -> bytes:
    return b"sc:{" + name + b"}:v"


def ceiling(r: redis.Redis, entries: list[Entry]) -> None:
    pipe = r.pipeline(transaction=False)
    for _id, fields in entries:
        pipe.incrby(key(fields[b"counter"]), delta(fields))
    pipe.xack(STREAM, GROUP, *[entry_id for entry_id, _ in entries])
    pipe.execute()


def ceiling_summed(r: redis.Redis, entries: list[Entry]) -> None:
    sums: dict[bytes, int] = {}
    for _id, fields in entries:
        name = fields[b"counter"]
        sums[name] = sums.get(name, 0) + delta(fields)
    pipe = r.pipeline(transaction=False)
    for name, total in sums.items():
        pipe.incrby(key(name), total)
    pipe.xack(STREAM, GROUP, *[entry_id for entry_id, _ in entries])
    pipe.execute()


def plain(r: redis.Redis, entries: list[Entry]) -> None:
    for entry_id, fields in entries:
        r.incrby(key(fields[b"counter"]), delta(fields))
        r.xack(STREAM, GROUP, entry_id)


def naive(r: redis.Redis, entries: list[Entry]) -> None:
    for entry_id, fields in entries:
        name = fields[b"counter"]
        lock = b"sc:{" + name + b"}:lock"
        while not r.set(lock, b"1", nx=True, ex=5):
            time.sleep(0.1)
        value = int(r.get(key(name)) or 0)
        r.set(key(name), value + delta(fields))
        r.delete(lock)
        r.xack(STREAM, GROUP, entry_id)


KINDS: dict[str, tuple[Callable[[redis.Redis, list[Entry]], None], int]] = {
    "ceiling": (ceiling, 1000),
    "ceiling-summed": (ceiling_summed, 1000),
    "plain": (plain, 100),
    "naive": (naive, 100),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--consumer", default="baseline")
    args = parser.parse_args()
    handle, count = KINDS[args.kind]
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    r = redis.Redis(host="127.0.0.1", port=args.port, protocol=2)
    while not stopping:
        reply = r.xreadgroup(GROUP, args.consumer, {STREAM: ">"}, count=count, block=100)
        if reply:
            handle(r, reply[0][1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
