"""The command line: ``produce`` and ``get`` against a real Redis, a worker run end to end,
graceful and forced shutdown, and a worker that outlives Redis being down or restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import STREAM, beat, cli, cli_env, free_port, push, values, wait_drained, wait_until

from worker import acl, counters
from worker.errors import ExitCode

ROOT = Path(__file__).parent.parent
FAST = {"block_ms": 200}


def cli_many(url: str, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run several CLI commands at once (they are independent); (rc, stdout, stderr) each."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "worker.cli", *args],
            env=cli_env(url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=30)
        out.append((p.returncode, stdout, stderr))
    return out


def log_events(worker: Any, name: str) -> list[dict[str, Any]]:
    found = []
    for line in worker.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                found.append(entry)
    return found


def wait_serving(worker: Any) -> None:
    """Connected, and through at least one read (so it sits in a blocking XREADGROUP)."""
    worker.wait_for_log('"connected"')
    time.sleep(0.3)
    assert worker.proc.poll() is None, worker.log()


@contextmanager
def paused(server: Any) -> Iterator[None]:
    """Redis frozen with SIGSTOP: connections stay open but nothing is answered."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


# -- produce -------------------------------------------------------------------------------


def test_produce_prints_the_entry_id_and_adds_counter_field(
    redis_server: Any, r: redis.Redis
) -> None:
    proc = cli(redis_server.url, "produce", "page-views")
    assert proc.returncode == ExitCode.OK, proc.stderr
    entries = r.xrange(STREAM)
    assert len(entries) == 1
    entry_id, fields = entries[0]
    assert proc.stdout.strip() == entry_id.decode()
    assert fields == {b"counter": b"page-views"}


def test_produce_decr_amount_event_id_become_fields(redis_server: Any, r: redis.Redis) -> None:
    proc = cli(
        redis_server.url,
        "produce", "stock", "--decr", "--amount", "7", "--event-id", "k1", "--stream", "other",
    )  # fmt: skip
    assert proc.returncode == ExitCode.OK, proc.stderr
    [(entry_id, fields)] = r.xrange("other")
    assert proc.stdout.strip() == entry_id.decode()
    assert fields == {b"counter": b"stock", b"op": b"decr", b"amount": b"7", b"event_id": b"k1"}
    assert r.exists(STREAM) == 0


@pytest.mark.parametrize("amount", ["0", "abc", "-3", str(2**63), ""])
def test_produce_invalid_amount_exits_2_and_adds_nothing(
    redis_server: Any, r: redis.Redis, amount: str
) -> None:
    proc = cli(redis_server.url, "produce", "x", "--amount", amount)
    assert proc.returncode == ExitCode.CONFIG
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "invalid event" in lines[0]
    assert "amount" in lines[0]
    assert r.exists(STREAM) == 0


def test_produce_to_a_key_that_is_not_a_stream_exits_1_with_one_line(
    redis_server: Any, r: redis.Redis
) -> None:
    r.set(STREAM, "not a stream")
    proc = cli(redis_server.url, "produce", "x")
    assert proc.returncode == ExitCode.FAILURE
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("stream-counter: cannot add the event:")
    assert "WRONGTYPE" in line


def test_produce_when_redis_is_unreachable_exits_5() -> None:
    port = free_port()
    proc = cli(f"redis://:pw-hidden-1@127.0.0.1:{port}/0", "produce", "x")
    assert proc.returncode == ExitCode.UNAVAILABLE
    assert f"redis://:***@127.0.0.1:{port}/0" in proc.stderr
    assert "pw-hidden-1" not in proc.stderr


# -- get -----------------------------------------------------------------------------------


def test_get_prints_name_tab_value_and_missing_counter_as_zero(
    redis_server: Any, r: redis.Redis
) -> None:
    r.set(counters.value_key("a"), 42)
    r.set(counters.value_key("neg"), -5)
    proc = cli(redis_server.url, "get", "a", "b", "neg")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stdout.splitlines() == ["a\t42", "b\t0", "neg\t-5"]


def test_get_json_prints_one_object_name_to_int(redis_server: Any, r: redis.Redis) -> None:
    r.set(counters.value_key("a"), 42)
    proc = cli(redis_server.url, "get", "--json", "a", "b")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert proc.stdout.count("\n") == 1
    assert json.loads(proc.stdout) == {"a": 42, "b": 0}


def test_get_when_nothing_listens_exits_5_naming_the_redacted_url() -> None:
    port = free_port()
    proc = cli(f"redis://admin:pw-hidden-2@127.0.0.1:{port}/0", "get", "a")
    assert proc.returncode == ExitCode.UNAVAILABLE
    assert proc.stdout == ""
    assert f"redis://admin:***@127.0.0.1:{port}/0" in proc.stderr
    assert "pw-hidden-2" not in proc.stderr


def test_get_non_integer_value_exits_1_with_a_message(redis_server: Any, r: redis.Redis) -> None:
    r.set(counters.value_key("bad"), "abc")
    proc = cli(redis_server.url, "get", "bad")
    assert proc.returncode == ExitCode.FAILURE
    assert proc.stdout == ""
    assert "cannot read counters" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_get_value_key_of_wrong_type_exits_1_not_zero(redis_server: Any, r: redis.Redis) -> None:
    r.rpush(counters.value_key("listy"), "x")
    proc = cli(redis_server.url, "get", "listy")
    assert proc.returncode == ExitCode.FAILURE, proc.stdout


def test_get_against_unresponsive_redis_exits_5_without_traceback(own_redis: Any) -> None:
    with paused(own_redis):
        # BLOCK_MS=1 makes the client's socket timeout its minimum (BLOCK_MS + 10 s).
        proc = cli(own_redis.url, "get", "a", block_ms="1")
    assert "Traceback" not in proc.stderr
    assert proc.returncode == ExitCode.UNAVAILABLE


# -- end to end ----------------------------------------------------------------------------


def test_events_produced_with_cli_are_counted_exactly_by_a_worker(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    url = redis_server.url
    results = cli_many(
        url,
        [
            ["produce", "a"],
            ["produce", "a"],
            ["produce", "a", "--amount", "10"],
            ["produce", "b", "--decr", "--amount", "4"],
            ["produce", "b", "--amount", "1"],
            ["produce", "c", "--event-id", "once"],
            ["produce", "c", "--event-id", "once"],  # a producer retry: counted once
        ],
    )
    assert [rc for rc, _, _ in results] == [0] * 7, results
    worker = spawn_worker(url, **FAST)
    wait_drained(r, timeout=20)
    proc = cli(url, "get", "--json", "a", "b", "c", "never")
    assert proc.returncode == ExitCode.OK, proc.stderr
    assert json.loads(proc.stdout) == {"a": 12, "b": -3, "c": 1, "never": 0}
    assert worker.proc.poll() is None


# -- status --------------------------------------------------------------------------------


def test_status_json_shows_a_drained_group_its_dead_letters_and_the_live_replica(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    for i in range(20):
        push(r, f"c{i % 3}", 1)
    r.xadd(STREAM, {"counter": "x", "amount": "-1"})  # invalid: dead-lettered
    worker = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, timeout=20)
    proc = cli(redis_server.url, "status", "--json")
    assert proc.returncode == ExitCode.OK, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["length"], status["lag"], status["lag_exact"]) == (21, 0, True)
    assert (status["pending"], status["oldest_pending_age_ms"]) == (0, None)
    assert status["dead_letter_length"] == 1
    assert status["live_replicas"] == ["worker-0"]
    assert [(c["name"], c["pending"], c["live"]) for c in status["consumers"]] == [
        ("worker-0", 0, True)
    ]
    assert worker.proc.poll() is None


def test_status_shows_entries_pending_for_a_dead_consumer_and_their_age(
    redis_server: Any, r: redis.Redis
) -> None:
    push(r, "a", 1)
    push(r, "a", 1)
    r.xgroup_create(STREAM, "stream-counter", id="0")
    r.xreadgroup("stream-counter", "dead", {STREAM: ">"}, count=1)
    status = json.loads(cli(redis_server.url, "status", "--json").stdout)
    assert (status["lag"], status["pending"], status["live_replicas"]) == (1, 1, [])
    assert status["consumers"][0]["name"] == "dead"
    assert status["consumers"][0]["live"] is False
    assert 0 <= status["oldest_pending_age_ms"] < 60_000


def test_status_on_a_terminal_is_a_readable_table(redis_server: Any, r: redis.Redis) -> None:
    push(r, "a", 1)
    r.xgroup_create(STREAM, "stream-counter", id="0")
    r.xreadgroup("stream-counter", "w1", {STREAM: ">"}, count=1)
    proc = cli(redis_server.url, "status")
    assert proc.returncode == ExitCode.OK, proc.stderr
    for words in ("stream", "events (1 entries)", "lag", "pending", "1 (oldest", "consumers"):
        assert words in proc.stdout
    assert "w1" in proc.stdout


def test_status_of_a_missing_stream_exits_1_with_one_line(redis_server: Any) -> None:
    proc = cli(redis_server.url, "status")
    assert proc.returncode == ExitCode.FAILURE
    assert proc.stderr.strip().splitlines() == ["stream-counter: stream 'events' does not exist"]


def test_status_when_redis_is_unreachable_exits_5_without_the_password() -> None:
    port = free_port()
    proc = cli(f"redis://:pw-hidden-2@127.0.0.1:{port}/0", "status")
    assert proc.returncode == ExitCode.UNAVAILABLE
    assert "pw-hidden-2" not in proc.stderr + proc.stdout
    assert f"redis://:***@127.0.0.1:{port}/0" in proc.stderr


# -- check (container health) ----------------------------------------------------------------


def test_check_is_healthy_while_the_named_replica_runs_and_not_after_it_stops(
    redis_server: Any, spawn_worker: Any
) -> None:
    worker = spawn_worker(redis_server.url, **FAST)
    worker.wait_for_log('"connected"')
    wait_until(lambda: cli(redis_server.url, "check", consumer="worker-0").returncode == 0, 10)
    proc = cli(redis_server.url, "check", consumer="worker-0")
    assert proc.stdout.startswith("healthy: worker-0 beat ")
    worker.signal(signal.SIGTERM)
    assert worker.wait() == ExitCode.OK
    proc = cli(redis_server.url, "check", consumer="worker-0")
    assert proc.returncode == 1
    assert proc.stdout.strip() == "unhealthy: no live replica named 'worker-0'"


def test_check_without_a_name_looks_for_a_replica_of_this_host(
    redis_server: Any, r: redis.Redis
) -> None:
    r.xgroup_create(STREAM, "stream-counter", id="0", mkstream=True)
    assert cli(redis_server.url, "check").returncode == 1
    beat(r, f"{socket.gethostname()}-4242", 60_000)  # as its loop does
    proc = cli(redis_server.url, "check")
    assert proc.returncode == 0, proc.stdout
    beat(r, "another-host-1", 60_000)
    assert "another-host" not in cli(redis_server.url, "check").stdout


def test_check_without_the_group_or_redis_is_unhealthy_in_one_line() -> None:
    port = free_port()
    proc = cli(f"redis://:pw-hidden-3@127.0.0.1:{port}/0", "check")
    assert proc.returncode == 1
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith("unhealthy: cannot read Redis at redis://:***@")
    assert "pw-hidden-3" not in proc.stdout + proc.stderr


def test_the_image_runs_check_as_its_health_check_in_exec_form() -> None:
    text = (ROOT / "Dockerfile").read_text()
    joined = text.replace("\\\n", " ")
    (line,) = [x for x in joined.splitlines() if x.startswith("HEALTHCHECK")]
    assert line.rstrip().endswith('CMD ["stream-counter", "check"]')


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_worker_gracefully_with_exit_0(
    redis_server: Any, r: redis.Redis, spawn_worker: Any, sig: signal.Signals
) -> None:
    worker = spawn_worker(redis_server.url, **FAST)
    wait_serving(worker)
    push(r, "s", 3)
    wait_drained(r, timeout=10)
    started = time.monotonic()
    worker.signal(sig)
    assert worker.wait(5) == ExitCode.OK, worker.log()
    assert time.monotonic() - started < 2
    [stopped] = log_events(worker, "stopped")
    assert stopped["applied"] == 1
    [exiting] = log_events(worker, "exiting")
    assert exiting["signal"] == sig.name
    assert values(r, ["s"]) == {"s": 3}


def test_second_sigterm_forces_exit_4_of_a_worker_stuck_on_paused_redis(
    own_redis: Any, spawn_worker: Any
) -> None:
    worker = spawn_worker(own_redis.url, **FAST)  # default grace: 10 s
    wait_serving(worker)
    with paused(own_redis):
        time.sleep(0.3)  # the blocking read can no longer return
        worker.signal(signal.SIGTERM)
        time.sleep(0.7)
        assert worker.proc.poll() is None, "worker was not stuck: the test proves nothing"
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(5) == ExitCode.FORCED
        assert time.monotonic() - started < 1
    assert "second signal (SIGTERM): exiting now" in worker.log()
    assert not log_events(worker, "stopped")


def test_grace_period_forces_exit_4_of_a_worker_stuck_on_paused_redis(
    own_redis: Any, spawn_worker: Any
) -> None:
    # The smallest grace accepted: BLOCK_MS + LOCK_WAIT_MS + 1000.
    worker = spawn_worker(own_redis.url, shutdown_grace_ms=1300, lock_wait_ms=100, **FAST)
    wait_serving(worker)
    with paused(own_redis):
        time.sleep(0.3)
        started = time.monotonic()
        worker.signal(signal.SIGTERM)
        assert worker.wait(10) == ExitCode.FORCED
        elapsed = time.monotonic() - started
    assert 1.25 <= elapsed < 3.0, elapsed
    assert "grace period over: exiting now" in worker.log()


# -- Redis down or restarted ---------------------------------------------------------------


def test_worker_started_while_redis_is_down_retries_then_counts(
    own_redis: Any, spawn_worker: Any
) -> None:
    own_redis.kill()
    worker = spawn_worker(own_redis.url, **FAST)
    wait_until(
        lambda: len(log_events(worker, "redis unavailable; retrying")) >= 3,
        timeout=15,
        what="three reconnect attempts",
    )
    assert worker.proc.poll() is None, worker.log()
    attempts = [e["attempt"] for e in log_events(worker, "redis unavailable; retrying")]
    assert attempts == list(range(1, len(attempts) + 1))
    assert not log_events(worker, "connected")

    own_redis.start()  # same port
    client = own_redis.client()
    push(client, "late", 2)
    push(client, "late", 5)
    push(client, "late", -1)
    wait_drained(client, timeout=20)
    assert values(client, ["late"]) == {"late": 6}
    assert log_events(worker, "connected")
    assert worker.proc.poll() is None, worker.log()


def test_worker_survives_redis_restart_without_persistence(
    own_redis: Any, spawn_worker: Any
) -> None:
    worker = spawn_worker(own_redis.url, **FAST)
    client = own_redis.client()
    wait_serving(worker)
    push(client, "before", 1)
    wait_drained(client, timeout=10)

    own_redis.restart()  # no AOF, no RDB: stream, group and counters are gone
    client = own_redis.client()
    push(client, "after", 4)
    push(client, "after", 3)
    push(client, "after", -2)
    wait_drained(client, timeout=20)
    assert values(client, ["before", "after"]) == {"before": 0, "after": 5}
    assert log_events(worker, "redis unavailable; retrying")
    wait_until(lambda: bool(log_events(worker, "redis reachable again")), timeout=5)
    assert worker.proc.poll() is None, worker.log()


def test_the_readme_gives_the_acls_of_a_replica_and_of_an_operator() -> None:
    readme = (ROOT / "README.md").read_text()
    rules = " ".join(acl.rules("events", "events:dead"))
    assert f"ACL SETUSER stream-counter on >PASSWORD {rules}\n" in readme
    rules = " ".join(acl.rules("events", "events:dead", operator=True))
    assert f"ACL SETUSER stream-counter-ops on >PASSWORD {rules}\n" in readme


def test_the_acl_of_a_stream_named_with_glob_characters_grants_that_stream_only(
    r: redis.Redis,
) -> None:
    r.execute_command("ACL", "SETUSER", "globs", "on", ">pw", *acl.rules("ev*", "ev?:dead"))
    try:

        def may(*command: str) -> bool:
            return r.execute_command("ACL", "DRYRUN", "globs", *command) == b"OK"

        for granted in (["XLEN", "ev*"], ["XLEN", "ev?:dead"], ["ZSCORE", "{ev*}:replicas", "x"]):
            assert may(*granted), granted
        refused = (["XLEN", "events"], ["XLEN", "evx:dead"], ["ZSCORE", "{evx}:replicas", "x"])
        for command in refused:
            assert not may(*command), command
    finally:
        r.execute_command("ACL", "DELUSER", "globs")


def test_the_password_in_the_url_never_appears_in_a_workers_log_or_status(
    redis_server: Any, r: redis.Redis, spawn_worker: Any
) -> None:
    secret = redis_server.url.split(":")[2].split("@")[0]  # the suite's ACL user's password
    assert secret
    push(r, "a", 1)
    worker = spawn_worker(redis_server.url, **FAST)
    wait_drained(r, timeout=20)
    shown = (
        cli(redis_server.url, "status", "--json").stdout + cli(redis_server.url, "status").stdout
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait() == ExitCode.OK
    assert "***" in worker.log()  # the URL is logged, redacted
    assert secret not in worker.log() + shown
