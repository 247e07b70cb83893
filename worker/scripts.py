"""Lua scripts loaded once from ``worker/lua/*.lua`` and called by EVALSHA, in pipelines.

A pipeline of calls runs in one round trip. If Redis lost its script cache (a restart, a
SCRIPT FLUSH), the calls answered NOSCRIPT did not run: the scripts are loaded and only
those calls are sent again, in their original order. Nothing that did run is repeated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from hiredis import pack_command
from redis.exceptions import NoScriptError, ResponseError

Arg = str | bytes | int


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = resources.files("worker").joinpath("lua", f"{name}.lua").read_text("utf-8")
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


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
    results = _send(client, calls)
    retry = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if retry:
        for script in {id(calls[i].script): calls[i].script for i in retry}.values():
            assert script is not None
            client.script_load(script.source)
        again = _send(client, [calls[i] for i in retry])
        for i, result in zip(retry, again, strict=True):
            results[i] = result
    return results


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
    args = ("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
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
