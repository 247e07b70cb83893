"""``stream-counter dlq``: list, show, replay and purge dead-lettered entries (worker/dlq.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import redis
from helpers import STREAM, MakeConsumer, cli, drained, push, turn_until, values

from worker.errors import ExitCode

ROOT = Path(__file__).parent.parent
DEAD = f"{STREAM}:dead"


def dlq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return cli(url, "dlq", *args)


def dead_letter(r: redis.Redis, source_id: str, error: str, **fields: str) -> str:
    """An entry as deadletter.lua writes it: the original fields, then error, source_id."""
    flat = {**fields}
    entry_id = r.execute_command(
        "XADD", DEAD, "*", *[x for kv in flat.items() for x in kv], "error", error,
        "source_id", source_id,
    )  # fmt: skip
    return bytes(entry_id).decode()


def test_list_and_show_give_the_original_fields_the_reason_and_the_source_id(
    redis_server: Any, r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    bad = r.xadd(STREAM, {"counter": "a", "amount": "1.5", "note": "[x]"}).decode()
    push(r, "a", 2)
    turn_until(make_consumer(), lambda: drained(r))
    proc = dlq(redis_server.url, "list", "--json")
    assert proc.returncode == ExitCode.OK, proc.stderr
    (item,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert item["source_id"] == bad
    assert item["fields"] == [["counter", "a"], ["amount", "1.5"], ["note", "[x]"]]
    assert "whole number" in item["error"]
    shown = dlq(redis_server.url, "show", item["id"])
    assert "note = '[x]'" in shown.stdout  # shown as it is, not as markup
    table = dlq(redis_server.url, "list")
    assert bad in table.stdout
    missing = dlq(redis_server.url, "show", "1-1")
    assert missing.returncode == ExitCode.FAILURE


def test_replay_puts_entries_back_once_and_the_worker_counts_them(
    redis_server: Any, r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    first = dead_letter(r, "5-0", "ERR value is not an integer", counter="fixed", amount="4")
    second = dead_letter(r, "6-0", "ERR overflow", counter="fixed", amount="6", event_id="k")
    proc = dlq(redis_server.operator_url, "replay", first, second, "9-9")
    assert proc.returncode == ExitCode.FAILURE  # one id was not there
    assert proc.stderr.strip() == f"stream-counter: no entry 9-9 in {DEAD}"
    assert [line.split()[1] for line in proc.stdout.splitlines()] == [first, second]
    assert r.xlen(DEAD) == 0
    again = dlq(redis_server.operator_url, "replay", first)
    assert again.returncode == ExitCode.FAILURE  # already replayed: nothing twice
    assert r.xlen(STREAM) == 2
    entries = [fields for _, fields in r.xrange(STREAM)]
    assert entries[1] == {b"counter": b"fixed", b"amount": b"6", b"event_id": b"k"}
    turn_until(make_consumer(), lambda: drained(r))
    assert values(r, {"fixed"}) == {"fixed": 10}


def test_replay_all_moves_thousands_of_entries_exactly_once(
    redis_server: Any, r: redis.Redis
) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(2500):
        pipe.execute_command(
            "XADD", DEAD, "*", "counter", f"c{i}", "error", "e", "source_id", f"{i}-0"
        )
    pipe.execute()
    proc = dlq(redis_server.operator_url, "replay", "--all")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert (r.xlen(DEAD), r.xlen(STREAM)) == (0, 2500)
    names = {fields[b"counter"] for _, fields in r.xrange(STREAM)}
    assert len(names) == 2500


def test_purge_asks_for_yes_and_deletes_only_what_is_older(
    redis_server: Any, r: redis.Redis
) -> None:
    r.execute_command("XADD", DEAD, "1000-0", "counter", "old", "error", "e", "source_id", "1-0")
    recent = dead_letter(r, "2-0", "e", counter="new")
    dry = dlq(redis_server.operator_url, "purge", "--older-than", "7d")
    assert dry.returncode == ExitCode.FAILURE
    assert dry.stdout.startswith(f"would delete 1 entries from {DEAD}")
    assert r.xlen(DEAD) == 2
    done = dlq(redis_server.operator_url, "purge", "--older-than", "7d", "--yes")
    assert done.returncode == ExitCode.OK
    assert [bytes(i).decode() for i, _ in r.xrange(DEAD)] == [recent]
    assert dlq(redis_server.operator_url, "purge", recent, "--yes").returncode == ExitCode.OK
    assert r.xlen(DEAD) == 0


def test_dlq_usage_errors_exit_2_with_one_line(redis_server: Any) -> None:
    for args in (
        ["replay"],
        ["purge"],
        ["purge", "--older-than", "soon"],
        ["replay", "1-0", "--all"],
    ):
        proc = dlq(redis_server.url, *args)
        assert proc.returncode == ExitCode.CONFIG, args
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_entry_dead_lettered_with_its_fields_cut_short_is_not_replayed(
    redis_server: Any, r: redis.Redis
) -> None:
    # Its lost fields may be what made it invalid: replayed, it could be counted.
    cut = r.execute_command(
        "XADD", DEAD, "*", "counter", "a", "fields_truncated", "1000 of 1500 fields kept",
        "error", "field 'counter' appears more than once", "source_id", "7-0",
    ).decode()  # fmt: skip
    proc = dlq(redis_server.operator_url, "replay", cut)
    assert proc.returncode == ExitCode.FAILURE
    assert (
        proc.stderr.strip()
        == f"stream-counter: not replayed {cut}: it lost fields when dead-lettered"
    )
    assert (r.xlen(DEAD), r.exists(STREAM)) == (1, 0)


def test_a_replicas_user_cannot_delete_dead_letters_and_is_told_what_it_lacks(
    own_redis: Any, r: redis.Redis
) -> None:
    # Replicas never delete an entry: their ACL has no XDEL (worker/acl.py); dlq needs it.
    first = dead_letter(r, "1-0", "e", counter="a")
    for args in (["purge", first, "--yes"], ["replay", first]):
        proc = dlq(own_redis.url, *args)  # the replica's user: our own server has it
        assert proc.returncode == ExitCode.FAILURE, proc
        assert "xdel" in proc.stderr.lower(), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (r.xlen(DEAD), r.exists(STREAM)) == (1, 0)  # nothing moved, nothing lost
