"""What recording metrics costs the worker, measured apart from the noise of a full run.

    python -m bench.metrics_cost

A replica with METRICS_PORT does two things more: after each batch, ``Metrics.batch``
(counters and two histograms), and at each check-in (every reclaim interval: CLAIM_IDLE_MS
/ 2, within 50 ms .. 5 s) it reads the gauges from Redis (``read_status``: a few XINFO
calls, XPENDING, XLEN, the live replicas). Both are timed here in a loop, on a stream of
100,000 entries with 50,000 pending, and compared with a batch of 1,000 events at the
worker's measured rate. The full benchmark's "worker + metrics" row says the same within
its run-to-run spread (docs/bench-results.md).
"""

from __future__ import annotations

import sys
import time

if __package__ in (None, ""):  # python bench/metrics_cost.py
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from bench.harness import GROUP, STREAM, RedisServer
from config import Settings
from worker.batch import Outcome
from worker.metrics import Metrics
from worker.status import read_status


def main() -> None:
    metrics, outcome, n = Metrics(), Outcome(applied=1_000), 20_000
    start = time.perf_counter()
    for _ in range(n):
        metrics.batch(outcome)
    per_batch = (time.perf_counter() - start) / n

    server = RedisServer().start()
    try:
        client = server.client()
        pipe = client.pipeline(transaction=False)
        for i in range(100_000):
            pipe.xadd(STREAM, {"counter": f"c{i % 100}"})
        pipe.execute()
        client.xgroup_create(STREAM, GROUP, "0")
        client.xreadgroup(GROUP, "elsewhere", {STREAM: ">"}, count=50_000)
        settings = Settings(redis_url=server.url, stream=STREAM, group=GROUP)
        k = 200
        start = time.perf_counter()
        for _ in range(k):
            read_status(client, settings)
        per_check = (time.perf_counter() - start) / k
    finally:
        server.stop()

    batch_s = 1_000 / 90_000  # a batch of 1,000 events at ~90,000 events/s
    print(f"Metrics.batch: {per_batch * 1e6:.1f} us per batch ({per_batch / batch_s:.2%})")
    print(
        f"read_status: {per_check * 1e3:.2f} ms per check-in "
        f"({per_check / 0.5:.2%} at a 0.5 s interval, {per_check / 5:.2%} at 5 s)"
    )


if __name__ == "__main__":
    main()
