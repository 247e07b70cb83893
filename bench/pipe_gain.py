"""What ``worker.scripts.Pipe`` buys on the hot path, against redis-py's own pipeline.

    python -m bench.pipe_gain [--events N] [--counters K] [--repeat R]

One in-process consumer drains the same preloaded events twice per repeat, alternating:
once with ``Pipe`` (calls packed while Redis works, a round trip sent before this process
prepares the next one, replies read later), once with the same rounds sent through a redis-py
``Pipeline`` (``execute_command`` per call, ``execute`` per round trip: packed and read at
once, nothing overlaps). Both runs go through the same driver and stages; only the round
trips' transport differs. Every counter is checked after every drain. Prints events/s and
the ratio; docs/pipe.md keeps the numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
import structlog

if __package__ in (None, ""):  # python bench/pipe_gain.py
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from bench import harness
from bench.harness import GROUP, STREAM, Dataset, RedisServer
from config import Settings
from worker.connection import connect
from worker.consumer import Consumer
from worker.scripts import Call, Round


class RedisPyRounds:
    """The driver's ``send``/``recv`` over a redis-py Pipeline: a round trip runs at
    ``recv``, as ``Pipeline.execute`` does. Replies come back raw, errors as values."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.client.response_callbacks.clear()  # raw replies, as the stages expect
        self.lost_acks: list[Any] = []
        self._waiting: list[Sequence[Round]] = []

    def send(self, rounds: Sequence[Round]) -> None:
        self._waiting.append(rounds)

    def recv(self) -> list[list[Any]]:
        rounds = self._waiting.pop(0)
        pipe = self.client.pipeline(transaction=False)
        for r in rounds:
            for call in r.calls:
                pipe.execute_command(*_args(call))
        flat = iter(pipe.execute(raise_on_error=False))
        return [[next(flat) for _ in r.calls] for r in rounds]

    def reset(self) -> None:
        self._waiting.clear()


def _args(call: Call) -> tuple[Any, ...]:
    if call.script is None:
        return call.args
    return ("EVAL", call.script.source, len(call.keys), *call.keys, *call.args)


def drain(server: RedisServer, data: Dataset, n: int, redis_py: bool) -> float:
    r = server.client()
    harness.preload(r, data, n)
    harness.release(r, data, n)
    settings = Settings(
        redis_url=server.url, stream=STREAM, group=GROUP, consumer="pipe-gain", batch_size=1000
    )
    consumer = Consumer(connect(settings), settings, structlog.get_logger())
    if redis_py:
        consumer.driver.pipe = RedisPyRounds(connect(settings))  # type: ignore[assignment]
    started = time.perf_counter()
    while True:
        consumer.turn()
        read, pending = harness.group_state(r)
        if read >= n and pending == 0:
            break
    seconds = time.perf_counter() - started
    harness.check(r, data, n, "pipe-gain")
    return n / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--counters", type=int, default=100)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    server = RedisServer().start()
    data = Dataset(args.counters, args.events)
    rates: dict[str, list[float]] = {"Pipe": [], "redis-py Pipeline": []}
    try:
        for i in range(args.repeat):
            for name in list(rates)[:: 1 if i % 2 == 0 else -1]:
                rate = drain(server, data, args.events, name != "Pipe")
                rates[name].append(rate)
                print(f"{name}: {rate:,.0f} events/s", file=sys.stderr)
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{args.events:,} events, {args.counters:,} counters, median of {args.repeat}:")
    for k, v in med.items():
        print(f"  {k}: {v:,.0f} events/s  {[round(x) for x in rates[k]]}")
    print(f"  Pipe / redis-py Pipeline: {med['Pipe'] / med['redis-py Pipeline']:.2f}")


if __name__ == "__main__":
    main()
