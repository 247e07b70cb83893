"""Token locks: many keys taken in one script call (SET NX PX each), taking turns on busy ones.

Every acquisition attempt gets a fresh token that is never reused (the locks taken in one
attempt share it), so once a holder's lock has expired or been released its token can
never become current again: the scripts that check the token (the fenced counter write and
the release in ``counters``' finish, both compare-and-act) refuse a late holder.

Nobody waits while holding a lock: an attempt takes what is free in one round trip and
reports the rest as busy; the caller finishes with what it holds, releases it, and only then
waits (``worker.backoff.Backoff``) before trying the busy ones again. The TTL is never
extended: a holder that outlives it is refused by fencing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import count

from worker import scripts
from worker.scripts import Call

ACQUIRE = scripts.Script.load("lock_acquire")
WAITER_TTL_MS = 500
"""How long a waiter's claim on its turn lasts unless renewed (a dead waiter delays a lock
by at most this long)."""


class Tokens:
    """Fresh, never-repeated lock tokens: a random per-process prefix and a sequence."""

    def __init__(self) -> None:
        self._prefix = os.urandom(12).hex()
        self._seq = count(1)

    def next(self) -> str:
        return f"{self._prefix}:{next(self._seq)}"


class Locks:
    """Token locks on arbitrary keys of one Redis."""

    def __init__(self, ttl_ms: int, tokens: Tokens | None = None) -> None:
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
