"""Producing events: the Python API (sync and asyncio) and ``produce --file`` / ``--events``.

Every event is checked against the contract before it is sent; what is sent is counted
exactly by a real worker."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import (
    ROOT,
    STREAM,
    MakeConsumer,
    cli,
    cli_env,
    drained,
    turn_until,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

from worker.errors import ExitCode, InvalidEvent
from worker.producer import AsyncProducer, Producer, event, from_json


def fields_sent(r: redis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in r.xrange(STREAM)]


# -- the Python API ------------------------------------------------------------------------


def test_event_gives_the_contracts_fields() -> None:
    assert event("page-views") == {"counter": "page-views", "amount": "1"}
    assert event("stock", 7, decr=True, event_id="order-1") == {
        "counter": "stock",
        "amount": "7",
        "op": "decr",
        "event_id": "order-1",
    }


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: event(""), "'counter' is empty"),
        (lambda: event("x" * 257), "257 bytes long"),
        (lambda: event("a", 0), "at least 1"),
        (lambda: event("a", -3), "whole number"),
        (lambda: event("a", 2**63), "at most"),
        (lambda: event("a", True), "whole number"),
        (lambda: event("a", 1.5), "whole number"),  # type: ignore[arg-type]
        (lambda: event("a", event_id=""), "'event_id' is empty"),
        (lambda: event("\ud800"), "lone surrogate"),
    ],
)
def test_an_invalid_event_is_refused_with_its_reason(make: Any, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        make()


def test_a_producer_refuses_an_invalid_event_and_sends_nothing_of_its_chunk(
    r: redis.Redis, redis_server: Any
) -> None:
    with Producer.connect(redis_server.url) as producer:
        with pytest.raises(InvalidEvent, match="'op' must be"):
            producer.send({"counter": "a", "op": "add"})
        with pytest.raises(InvalidEvent, match="must be strings"):
            producer.send({"counter": "a", "amount": 3})  # type: ignore[dict-item]
        with pytest.raises(InvalidEvent):
            list(producer.send_many([event("a"), {"counter": ""}]))
    assert r.exists(STREAM) == 0


def test_events_sent_many_per_round_trip_are_counted_exactly(
    r: redis.Redis, redis_server: Any, make_consumer: MakeConsumer
) -> None:
    with Producer.connect(redis_server.url) as producer:
        first = producer.send(event("a", 5, event_id="k1"))
        rounds = list(producer.send_many(event(f"c{i % 3}") for i in range(2_500)))
        producer.send(event("a", 5, event_id="k1"))  # a retry: counted once
    assert [len(ids) for ids in rounds] == [1_000, 1_000, 500]
    ids = [first, *(i for ids in rounds for i in ids)]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert r.xlen(STREAM) == 2_502
    turn_until(make_consumer(), lambda: drained(r), turns=500)
    assert values(r, {"a", "c0", "c1", "c2"}) == {"a": 5, "c0": 834, "c1": 833, "c2": 833}


def test_the_asyncio_producer_sends_the_same_events(redis_server: Any, r: redis.Redis) -> None:
    async def produce() -> list[str]:
        async with AsyncProducer.connect(redis_server.url) as producer:
            one = await producer.send(event("a", 2))
            many = [ids async for ids in producer.send_many([event("b")] * 1_500)]
            with pytest.raises(InvalidEvent):
                await producer.send({"counter": "a", "amount": "1.5"})
            return [one, *(i for ids in many for i in ids)]

    ids = asyncio.run(produce())
    assert len(ids) == 1_501
    assert fields_sent(r)[0] == {"counter": "a", "amount": "2"}
    assert r.xlen(STREAM) == 1_501


def test_from_json_reads_the_contracts_fields() -> None:
    assert from_json('{"counter": "a"}') == {"counter": "a"}
    assert from_json('{"counter": "a", "amount": 3, "op": "decr", "event_id": "e"}') == {
        "counter": "a",
        "amount": "3",
        "op": "decr",
        "event_id": "e",
    }
    assert from_json('{"counter": "a", "amount": "12"}') == {"counter": "a", "amount": "12"}


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"counter": "a", "amount": 1.5}', "must be a string"),
        ('{"counter": "a", "amount": true}', "must be a string"),
        ('{"counter": "a", "amount": "1.5"}', "whole number"),
        ('{"counter": "a", "colour": "red"}', 'unknown field "colour"'),
        ('{"counter": "a", "counter": "b"}', 'field "counter" appears more than once'),
        ('{"counter": "a", "amount": ' + "9" * 5000 + "}", "not JSON: Exceeds the limit"),
        ("[" * 100_000, "not JSON"),
        ('{"counter": null}', "must be a string"),
        ('{"amount": 3}', "missing required field 'counter'"),
        ('{"counter": "\\ud800"}', "lone surrogate"),
    ],
)
def test_from_json_refuses_a_line_that_is_not_an_event_with_its_reason(
    line: str, reason: str
) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        from_json(line)


@given(st.text(max_size=200))
def test_from_json_gives_an_event_or_a_reason_never_another_error(line: str) -> None:
    reason = ""
    try:
        fields = from_json(line)
    except InvalidEvent as exc:
        reason = exc.reason
    assert reason or fields["counter"]


# -- produce --file and --events -----------------------------------------------------------


def produce_stdin(url: str, text: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "produce", "--file", "-"],
        input=text,
        env=cli_env(url),
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_produce_file_sends_every_valid_line_and_reports_the_others_by_number(
    tmp_path: Path, redis_server: Any, r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    lines = [json.dumps({"counter": f"c{i % 4}", "amount": 2}) for i in range(2_000)]
    lines[9] = '{"counter": "c0", "amount": 0}'  # line 10
    lines[99] = "not json"  # line 100
    lines[1_499] = ""  # a blank line: skipped, not invalid
    path = tmp_path / "events.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"counter": "\xff"}\n')  # 2,001
    proc = cli(redis_server.url, "produce", "--file", str(path))
    assert proc.returncode == ExitCode.FAILURE
    assert proc.stderr.splitlines() == [
        "line 10: field 'amount' must be at least 1, got 0",
        "line 100: not JSON: Expecting value at column 1",
        "line 2001: not UTF-8",
    ]
    assert proc.stdout == f"sent 1997 events to {STREAM}; 3 invalid lines\n"
    turn_until(make_consumer(), lambda: drained(r), turns=500)
    assert sum(values(r, {"c0", "c1", "c2", "c3"}).values()) == 2 * 1_997


def test_produce_file_from_standard_input(redis_server: Any, r: redis.Redis) -> None:
    proc = produce_stdin(redis_server.url, b'{"counter": "a"}\n{"counter": "b", "op": "decr"}\n')
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert fields_sent(r) == [{"counter": "a"}, {"counter": "b", "op": "decr"}]


def test_produce_file_from_a_pipe_is_read_once_and_sent(redis_server: Any, r: redis.Redis) -> None:
    # A pipe cannot be read twice: its lines are not counted first (else nothing is sent).
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", "produce", "--file", "/dev/stdin"],
        input=b'{"counter": "a"}\n' * 2500,
        env=cli_env(redis_server.url),
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert r.xlen(STREAM) == 2500


def test_produce_file_stopped_by_redis_says_what_was_confirmed_sent(
    tmp_path: Path, own_redis: Any, r: redis.Redis
) -> None:
    r.config_set("maxmemory", "4mb")  # noeviction: Redis refuses writes once full (OOM)
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps({"counter": f"c-{i:0>60}"}) + "\n" for i in range(60_000)))
    proc = cli(own_redis.url, "produce", "--file", str(path))
    assert proc.returncode == ExitCode.FAILURE
    (line,) = proc.stderr.strip().splitlines()
    found = re.match(
        r"stream-counter: stopped after (\d+) events confirmed \(every valid line up to line "
        r"(\d+)\); the next 1000 may be partly added: .*maxmemory",
        line,
    )
    assert found, line
    confirmed = int(found.group(1))
    assert 0 < confirmed == int(found.group(2)) < 60_000
    assert confirmed <= r.xlen(STREAM) <= confirmed + 1000


def test_produce_file_that_cannot_be_read_exits_2_with_one_line(
    tmp_path: Path, redis_server: Any, r: redis.Redis
) -> None:
    proc = cli(redis_server.url, "produce", "--file", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == ExitCode.CONFIG
    (line,) = proc.stderr.strip().splitlines()
    assert "cannot read" in line
    assert "No such file" in line
    assert r.exists(STREAM) == 0


def test_produce_events_sends_n_events_round_robin_with_known_totals(
    redis_server: Any, r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    proc = cli(redis_server.url, "produce", "--events", "2500", "--counters", "7")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stdout.startswith(f"sent 2500 events to {STREAM} over load:0 .. load:6 in ")
    turn_until(make_consumer(), lambda: drained(r), turns=500)
    names = {f"load:{j}" for j in range(7)}
    assert values(r, names) == {f"load:{j}": 2500 // 7 + (j < 2500 % 7) for j in range(7)}


def test_produce_events_at_a_rate_takes_the_time_that_rate_needs(
    redis_server: Any, r: redis.Redis
) -> None:
    start = time.monotonic()
    proc = cli(redis_server.url, "produce", "--events", "60", "--counters", "2", "--rate", "100")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert time.monotonic() - start >= 0.5  # 60 events at 100/s: 0.6 s, less the first chunk
    assert r.xlen(STREAM) == 60


def test_produce_an_empty_event_id_is_refused_not_dropped(
    redis_server: Any, r: redis.Redis
) -> None:
    # Dropped, the retry it was meant to dedupe would be counted twice.
    proc = cli(redis_server.url, "produce", "a", "--event-id", "")
    assert proc.returncode == ExitCode.CONFIG
    assert proc.stderr.strip() == "stream-counter: invalid event: field 'event_id' is empty"
    assert r.exists(STREAM) == 0


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["a", "--file", "x.jsonl"],
        ["--file", "x.jsonl", "--events", "3"],
        ["--counters", "3"],
        ["--file", "x.jsonl", "--decr"],
        ["--events", "0", "--counters", "1"],
        ["--events", "5", "--counters", "0"],
        ["--events", "5", "--counters", "1", "--rate", "0"],
        ["--events", "5", "--counters", "1", "--rate", "nan"],
    ],
)
def test_produce_usage_errors_exit_2_with_one_line_and_send_nothing(
    redis_server: Any, r: redis.Redis, args: list[str]
) -> None:
    proc = cli(redis_server.url, "produce", *args)
    assert proc.returncode == ExitCode.CONFIG, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert r.exists(STREAM) == 0


# -- the README's producers ----------------------------------------------------------------


def readme_blocks(language: str) -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Producing events", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def test_the_readmes_redis_cli_and_python_producers_send_events_a_worker_counts(
    own_redis: Any, r: redis.Redis, make_consumer: MakeConsumer
) -> None:
    (cli_lines,) = [b for b in readme_blocks("sh") if "redis-cli" in b]
    for line in cli_lines.strip().splitlines():
        args = shlex.split(line.replace("redis-cli", f"redis-cli -p {own_redis.port}", 1))
        assert subprocess.run(args, capture_output=True, check=False).returncode == 0, line
    (python,) = readme_blocks("python")
    exec(python.replace("redis://localhost:6379/0", f"redis://127.0.0.1:{own_redis.port}/0"))
    turn_until(make_consumer(), lambda: drained(r), turns=500)
    assert values(r, {"pageviews", "stock:sku-42"}) == {"pageviews": 6, "stock:sku-42": -3}
    assert values(r, {f"c{i}" for i in range(10)}) == {f"c{i}": 1_000 for i in range(10)}


def test_the_readmes_node_and_go_producers_use_the_contracts_fields_only() -> None:
    contract = {"counter", "op", "amount", "event_id"}
    (js,) = readme_blocks("js")
    (go,) = readme_blocks("go")
    js_fields = set(re.findall(r"(\w+): \"", js)) - {"url"}
    go_fields = set(re.findall(r"\"(\w+)\": ", go))
    assert js_fields == contract, js_fields
    assert go_fields == contract, go_fields
