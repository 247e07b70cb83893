"""A token lock per key: acquire with SET NX PX, release and extend by compare-and-act scripts.

Every acquisition attempt gets a fresh token that is never reused (the locks taken in one
attempt share it), so once a holder's lock has expired or been released its token can
never become current again: a script that checks the token (release, extend, and the
counter write in ``counters``) refuses a late holder.

Nobody waits while holding a lock: ``try_acquire`` takes what is free in one round trip and
reports the rest as busy; the caller finishes with what it holds, releases it, and only then
waits (``worker.backoff.Backoff``) before trying the busy ones again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import count

import redis

from worker import scripts
from worker.scripts import Call

ACQUIRE = scripts.Script.load("lock_acquire")
WAITER_TTL_MS = 500
"""How long a waiter's claim on its turn lasts unless renewed (a dead waiter delays a lock
by at most this long)."""
RELEASE = scripts.Script.load("lock_release")
EXTEND = scripts.Script.load("lock_extend")


class Tokens:
    """Fresh, never-repeated lock tokens: a random per-process prefix and a sequence."""

    def __init__(self) -> None:
        self._prefix = os.urandom(12).hex()
        self._seq = count(1)

    def next(self) -> str:
        return f"{self._prefix}:{next(self._seq)}"


class Locks:
    """Token locks on arbitrary keys of one Redis."""

    def __init__(self, client: redis.Redis, ttl_ms: int, tokens: Tokens | None = None) -> None:
        self.client = client
        self.ttl_ms = ttl_ms
        self.tokens = tokens or Tokens()

    def acquire_call(
        self,
        keys: Sequence[str],
        token: str,
        *,
        waiters: Sequence[str] = (),
        me: str = "",
    ) -> Call:
        """SET NX PX of every key with ``token``, as one script call (see lock_acquire.lua);
        its reply has 1 for each lock taken, 0 for each busy one.

        With ``waiters`` (waiter keys of the first ``len(waiters)`` lock keys) callers take
        turns on those: a busy lock records ``me`` as its waiter, and a free lock whose
        waiter is someone else is left to them.
        """
        args: list[str | int] = [token, self.ttl_ms, len(keys), me, WAITER_TTL_MS]
        return Call.eval(ACQUIRE, [*keys, *waiters], args)

    def try_acquire(self, keys: Sequence[str]) -> dict[str, str]:
        """Take every free lock among ``keys`` in one round trip; return key -> token."""
        token = self.tokens.next()
        taken = _one(self.client, self.acquire_call(keys, token))
        assert isinstance(taken, list)
        return {key: token for key, ok in zip(keys, taken, strict=True) if ok == 1}

    def release(self, key: str, token: str) -> bool:
        """Delete the lock only if ``token`` still holds it."""
        return bool(_one(self.client, Call.eval(RELEASE, [key], [token])))

    def extend(self, key: str, token: str, ttl_ms: int | None = None) -> bool:
        """Reset the lock's TTL only if ``token`` still holds it."""
        ttl = self.ttl_ms if ttl_ms is None else ttl_ms
        return bool(_one(self.client, Call.eval(EXTEND, [key], [token, ttl])))

    def extend_many(self, held: dict[str, str]) -> set[str]:
        """Extend several locks in one round trip; return the keys still held."""
        keys = list(held)
        results = scripts.run(
            self.client, [Call.eval(EXTEND, [k], [held[k], self.ttl_ms]) for k in keys]
        )
        return {k for k, r in zip(keys, results, strict=True) if r == 1}


def _one(client: redis.Redis, call: Call) -> object:
    (result,) = scripts.run(client, [call])
    if isinstance(result, Exception):
        raise result
    return result
