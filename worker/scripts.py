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
from redis.exceptions import NoScriptError

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
    """One raw command (redis-py's execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _send(client: redis.Redis, calls: Sequence[Call]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for call in calls:
        if call.script is None:
            pipe.execute_command(*call.args)  # type: ignore[no-untyped-call]
        else:
            keys = call.keys
            pipe.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", call.script.sha, len(keys), *keys, *call.args
            )
    return list(pipe.execute(raise_on_error=False))
