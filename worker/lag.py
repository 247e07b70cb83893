"""The group's lag: how many entries of the stream were never delivered to the group.

Redis keeps a ``lag`` field per group (XINFO GROUPS), but on Redis 7.0 it can be NULL for a
while after a restart, a trim or a SETID, and after restarts from the AOF it was seen to stay
wrong (69,344 with nothing left to deliver): a scaler on it would keep every replica up.
``group_lag.lua`` tells how sure the number is, and puts Redis' field right when the group
is drained (see the script). Entries delivered but not acknowledged are *pending*, not lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from worker import scripts

GROUP_LAG = scripts.Script.load("group_lag")

COUNT_CAP = 1_000
"""Entries counted one by one (inside Redis, entries and all: keep it small) when Redis'
lag is unknown; beyond, the lag is a lower bound."""


@dataclass(frozen=True, slots=True)
class Lag:
    entries: int
    how: str
    """'drained' or 'redis' (exact), 'counted' (exact, counted now), 'capped' (at least)."""
    repaired: bool = False
    """Redis' own lag field was wrong and has been put right."""

    @property
    def exact(self) -> bool:
        return self.how != "capped"


def group_lag(
    client: redis.Redis, stream: str, group: str, repair: bool = True, cap: int = COUNT_CAP
) -> Lag | None:
    """The lag of ``group`` (None if the stream or the group does not exist); with
    ``repair``, Redis' own field is put right if the group is drained."""
    try:
        entries, how, repaired = GROUP_LAG(client, [stream], [group, cap, int(repair)])
    except redis.ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    if entries < 0:
        return None
    return Lag(int(entries), how.decode() if isinstance(how, bytes) else how, bool(repaired))
