"""Exponential backoff with full jitter: no fixed-interval polling, never unbounded."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """A uniform random delay in [0, min(cap, base * 2**attempt)] (attempt counts from 0)."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** min(attempt, 62)))


class Backoff:
    """Delays for retrying within a total budget of ``wait_ms``.

    ``delays()`` yields one delay per retry and ends once the budget is spent; no delay
    reaches past it.
    """

    def __init__(
        self,
        wait_ms: int,
        base_ms: float = 1.0,
        cap_ms: float = 100.0,
        rng: random.Random | None = None,
    ) -> None:
        self.wait_ms = wait_ms
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self._rng = rng or random.Random()

    def delays(self) -> Iterator[float]:
        deadline = time.monotonic() + self.wait_ms / 1000
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            delay = full_jitter(attempt, self.base_ms / 1000, self.cap_ms / 1000, self._rng)
            yield min(left, delay)
            attempt += 1


def reconnect_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (from 1): 50 ms doubling, capped at 5 s,
    jittered so that replicas do not stampede a restarted Redis."""
    return max(0.01, full_jitter(attempt - 1, 0.05, 5.0, rng or random.Random()))
