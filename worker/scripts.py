"""Lua scripts read once from ``worker/lua/*.lua``, and the hot path's round trips (``Pipe``).

A batch's rounds go through ``Pipe``: sent now, read later, so that this process prepares
the next round while Redis runs one (1.4x to 1.7x the throughput of redis-py's Pipeline on
the same rounds: docs/pipe.md). Everything else goes through redis-py's client API (a
script on its own: ``Script.__call__``), but for stream reads, which need the entries raw
(``raw``).

Scripts are sent with EVAL, not EVALSHA: Redis compiles a script once and afterwards only
hashes the body it receives (a few microseconds), and a script cache emptied by a restart
or a SCRIPT FLUSH can never answer NOSCRIPT. That matters for order: the worker relies on
Redis running a pipeline's calls in the order sent (take the locks, then confirm the
entries; acknowledge, then clear the markers), and re-sending only the calls refused with
NOSCRIPT would run them after the ones that followed them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import redis
from hiredis import pack_command
from redis.exceptions import ResponseError

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes

    @classmethod
    def load(cls, name: str) -> Script:
        source = resources.files("worker").joinpath("lua", f"{name}.lua").read_bytes()
        return cls(name, source)

    def __call__(
        self, client: redis.Redis, keys: Sequence[str | bytes], args: Sequence[Arg]
    ) -> Any:
        """A call on its own, through redis-py (an error reply is raised)."""
        return client.eval(self.source.decode(), len(keys), *keys, *args)


@dataclass(frozen=True, slots=True)
class Call:
    """One command in a pipeline: a script call, or a plain command when ``script`` is None."""

    script: Script | None
    args: tuple[Arg, ...]
    keys: tuple[str | bytes, ...] = ()
    wire: bytes = b""
    """The call as sent, when packed ahead of time (``packed``)."""

    @classmethod
    def command(cls, *args: Arg) -> Call:
        return cls(None, args)

    @classmethod
    def eval(cls, script: Script, keys: Sequence[str | bytes], args: Sequence[Arg]) -> Call:
        return cls(script, tuple(args), tuple(keys))

    def packed(self) -> Call:
        """The same call, encoded now rather than when sent."""
        return Call(self.script, self.args, self.keys, _pack(self))


class Round(NamedTuple):
    """The calls of one protocol stage, sent together; Redis runs them in order."""

    stage: str
    """What they do: 'take_lanes', 'confirm', 'write', 'finish', 'read' ('' for others)."""
    calls: list[Call]
    acked: Sequence[tuple[str, Sequence[str], Sequence[bytes]]] = ()
    """finish: (counter, lanes, entry ids acknowledged) of its finish script. Should its
    replies be lost, its XACK may have run without the removal of the entries' markers that
    follows it (``Pipe.lost_acks``)."""


class Pipe:
    """Round trips on one connection, sent now and answered later.

    ``send`` writes rounds and returns at once; ``recv`` reads the replies of the oldest
    unanswered send. In between the caller can do other work while Redis runs the calls,
    and rounds sent one after the other on this pipe run in the order sent. A connection
    error closes the connection, forgets every unanswered send (but what they acknowledged,
    ``lost_acks``) and is raised: whether their calls ran is unknown.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Any = None
        self._waiting: deque[Sequence[Round]] = deque()
        self.lost_acks: list[tuple[str, Sequence[str], Sequence[bytes]]] = []
        """What the rounds whose replies were lost with a connection acknowledged
        (``Round.acked``): their XACK may have run, and the removal of markers after it
        not. Whoever settles them empties the list."""

    def send(self, rounds: Sequence[Round]) -> None:
        if self._conn is None:
            self._conn = self._pool.get_connection()
        self._waiting.append(rounds)
        try:
            self._conn.send_packed_command([b"".join(_pack(c) for r in rounds for c in r.calls)])
        except BaseException:
            self._drop()
            raise

    def recv(self) -> list[list[Any]]:
        """One list of replies per round of the oldest send, errors as values."""
        rounds = self._waiting[0]
        replies: list[list[Any]] = []
        try:
            for r in rounds:
                results: list[Any] = []
                for _ in r.calls:
                    try:
                        results.append(self._conn.read_response())
                    except ResponseError as exc:
                        results.append(exc)
                replies.append(results)
        except BaseException:
            self._drop()
            raise
        self._waiting.popleft()
        if not self._waiting:
            self._pool.release(self._conn)
            self._conn = None
        return replies

    def exchange(self, rounds: Sequence[Round]) -> list[list[Any]]:
        self.send(rounds)
        return self.recv()

    def reset(self) -> None:
        """Forget unanswered sends (closing the connection): for a caller that fails
        between a send and its recv, so that no later recv reads stale replies."""
        if self._waiting:
            self._drop()

    def _drop(self) -> None:
        self.lost_acks += (acked for rounds in self._waiting for r in rounds for acked in r.acked)
        self._waiting.clear()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)


def raw(client: redis.Redis, *args: Arg) -> Any:
    """One command, its reply as Redis sent it (an error reply is raised). For stream
    reads: redis-py's own parsers turn entries into dicts, losing the order and repeats
    of their fields, which the event contract judges (a repeated field is rejected)."""
    ((result,),) = Pipe(client).exchange([Round("", [Call.command(*args)])])
    if isinstance(result, Exception):
        raise result
    return result


def _pack(call: Call) -> bytes:
    # (hiredis' stub types the argument as a 1-tuple; it takes any length)
    if call.wire:
        return call.wire
    if call.script is None:
        return bytes(pack_command(call.args))  # type: ignore[arg-type]
    script = call.script
    args = ("EVAL", script.source, len(call.keys), *call.keys, *call.args)
    return bytes(pack_command(args))  # type: ignore[arg-type]
