"""Lua scripts read once from ``worker/lua/*.lua``, and pipelines of calls.

Scripts are sent with EVAL, not EVALSHA: Redis compiles a script once and afterwards only
hashes the body it receives (a few microseconds), and a script cache emptied by a restart
or a SCRIPT FLUSH can never answer NOSCRIPT. That matters for order: the worker relies on
Redis running a pipeline's calls in the order sent (take the locks, then confirm the
entries; acknowledge, then clear the markers), and re-sending only the calls refused with
NOSCRIPT would run them after the ones that followed them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from hiredis import pack_command
from redis.exceptions import ResponseError

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: str
    """The SHA1 Redis caches the script under (SCRIPT EXISTS)."""

    @classmethod
    def load(cls, name: str) -> Script:
        source = resources.files("worker").joinpath("lua", f"{name}.lua").read_bytes()
        return cls(name, source, hashlib.sha1(source, usedforsecurity=False).hexdigest())


@dataclass(frozen=True, slots=True)
class Call:
    """One command in a pipeline: a script call, or a plain command when ``script`` is None."""

    script: Script | None
    args: tuple[Arg, ...]
    keys: tuple[str | bytes, ...] = ()

    @classmethod
    def command(cls, *args: Arg) -> Call:
        return cls(None, args)

    @classmethod
    def eval(cls, script: Script, keys: Sequence[str | bytes], args: Sequence[Arg]) -> Call:
        return cls(script, tuple(args), tuple(keys))


def run(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Send ``calls`` in one pipeline; return one result per call, errors as values.

    Connection errors are raised: whether the calls ran is then unknown, and the caller
    must treat every call as possibly done.
    """
    if not calls:
        return []
    return _send(client, calls)


def command(client: redis.Redis, *args: Arg) -> Any:
    """One command, its raw reply; an error reply is raised."""
    (result,) = _send(client, [Call(None, args)])
    if isinstance(result, Exception):
        raise result
    return result


def _pack(call: Call) -> bytes:
    # (hiredis' stub types the argument as a 1-tuple; it takes any length)
    if call.script is None:
        return bytes(pack_command(call.args))  # type: ignore[arg-type]
    script = call.script
    args = ("EVAL", script.source, len(call.keys), *call.keys, *call.args)
    return bytes(pack_command(args))  # type: ignore[arg-type]


def _send(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Write every call in one go, then read one raw reply per call.

    redis-py's Pipeline does the same with more work per command (argument encoding, reply
    callbacks); the replies here are Redis' own (b"OK", ints, nested lists), and the worker
    reads them as such. A connection error closes the connection and is raised.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(  # type: ignore[no-untyped-call]
            [b"".join(_pack(call) for call in calls)]
        )
        results: list[Any] = []
        for _ in calls:
            try:
                results.append(conn.read_response())
            except ResponseError as exc:
                results.append(exc)
        return results
    except BaseException:
        conn.disconnect()  # type: ignore[no-untyped-call]
        raise
    finally:
        pool.release(conn)
