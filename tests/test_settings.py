"""Configuration: where settings come from, how bad ones are refused, and that secrets stay
secret (in error messages, in redacted URLs and in the worker's own log)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import SERVER, free_port

from config import ENV_PREFIX, LogFormat, LogLevel, Settings, redact_url, settings_table
from worker.cli import build_parser, load_settings
from worker.errors import ExitCode
from worker.logs import scrub

ROOT = Path(__file__).parent.parent
PASSWORD = "s3cr3t-pw"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STREAM_COUNTER_* variable of the outer environment leaks into a test."""
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def _cli(*args: str, timeout: float = 20, **env: str) -> subprocess.CompletedProcess[str]:
    """``stream-counter ARGS`` in a subprocess; ``env`` is STREAM_COUNTER_<KEY>=value."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    full.update({ENV_PREFIX + k.upper(): v for k, v in env.items()})
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=full,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Listener:
    """A plain TCP server on a free loopback port that records (and closes) connections."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


# -- where settings come from -------------------------------------------------------------


def test_defaults_without_any_environment_variable() -> None:
    s = Settings()
    assert s.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"
    assert s.stream == "events"
    assert s.group == "stream-counter"
    assert s.dead_letter_stream is None
    assert s.dead_letter == "events:dead"
    assert s.batch_size == 1000
    assert s.block_ms == 1000
    assert s.claim_idle_ms == 30_000
    assert s.max_deliveries == 5
    assert s.lock_ttl_ms == 10_000
    assert s.lock_wait_ms == 2_000
    assert s.dedupe_window_ms == 86_400_000
    assert s.shutdown_grace_ms == 10_000
    assert s.log_level is LogLevel.INFO
    assert s.log_format is None


def test_env_vars_with_prefix_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "REDIS_URL": "redis://10.1.2.3:6390/4",
        "STREAM": "orders",
        "GROUP": "g1",
        "CONSUMER": "c-7",
        "DEAD_LETTER_STREAM": "rejects",
        "BATCH_SIZE": "17",
        "BLOCK_MS": "200",
        "CLAIM_IDLE_MS": "2345",
        "MAX_DELIVERIES": "9",
        "LOCK_TTL_MS": "555",
        "LOCK_WAIT_MS": "0",
        "DEDUPE_WINDOW_MS": "60000",
        "SHUTDOWN_GRACE_MS": "1500",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
    }
    for key, value in env.items():
        monkeypatch.setenv(ENV_PREFIX + key, value)
    s = Settings()
    assert s.redis_url.get_secret_value() == "redis://10.1.2.3:6390/4"
    assert (s.stream, s.group, s.consumer) == ("orders", "g1", "c-7")
    assert s.dead_letter == "rejects"
    assert (s.batch_size, s.block_ms, s.claim_idle_ms, s.max_deliveries) == (17, 200, 2345, 9)
    assert (s.lock_ttl_ms, s.lock_wait_ms, s.dedupe_window_ms) == (555, 0, 60000)
    assert s.shutdown_grace_ms == 1500
    assert s.log_level is LogLevel.WARNING
    assert s.log_format is LogFormat.CONSOLE


def test_flag_overrides_the_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_COUNTER_BATCH_SIZE", "10")
    monkeypatch.setenv("STREAM_COUNTER_STREAM", "from-env")
    monkeypatch.setenv("STREAM_COUNTER_BLOCK_MS", "300")
    args = build_parser().parse_args(["run", "--batch-size", "20", "--stream", "from-flag"])
    s = load_settings(args)
    assert s.batch_size == 20
    assert s.stream == "from-flag"
    assert s.block_ms == 300  # no flag: the env var still counts
    assert s.dead_letter == "from-flag:dead"


def test_common_flags_override_env_for_get_and_produce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_COUNTER_REDIS_URL", "redis://env-host:6379/0")
    for argv in (["get", "a"], ["produce", "a"]):
        args = build_parser().parse_args([*argv, "--redis-url", "redis://flag-host:1/2"])
        assert load_settings(args).redis_url.get_secret_value() == "redis://flag-host:1/2"


def test_dead_letter_defaults_to_stream_colon_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_COUNTER_STREAM", "orders")
    assert Settings().dead_letter == "orders:dead"
    monkeypatch.setenv("STREAM_COUNTER_DEAD_LETTER_STREAM", "elsewhere")
    assert Settings().dead_letter == "elsewhere"


def test_default_consumer_is_host_pid_and_unique_per_process() -> None:
    here = Settings().consumer
    assert here == f"{socket.gethostname()}-{os.getpid()}"
    code = "import os; from config import Settings; s = Settings(); print(s.consumer, os.getpid())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout.split()
    other, other_pid = out
    assert other == f"{socket.gethostname()}-{other_pid}"
    assert other != here


@pytest.mark.parametrize(("raw", "level"), [("debug", "DEBUG"), ("Warning", "WARNING")])
def test_log_level_is_case_insensitive(
    monkeypatch: pytest.MonkeyPatch, raw: str, level: str
) -> None:
    monkeypatch.setenv("STREAM_COUNTER_LOG_LEVEL", raw)
    assert Settings().log_level is LogLevel(level)


# -- one source: the fields' descriptions make the CLI's help and the README's table -------


def test_readme_configuration_table_is_the_one_the_settings_describe() -> None:
    readme = (ROOT / "README.md").read_text()
    assert settings_table() in readme, (
        "README.md's configuration table differs from config.Settings: paste "
        "config.settings_table() into it"
    )


def test_run_help_shows_every_setting_with_its_flag_variable_and_meaning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for d in Settings.describe():
        assert d.flag in shown
        assert f"[{d.env}]" in shown
        assert " ".join(d.meaning.replace("`", "").split()) in shown


# -- invalid configuration: exit 2, one line naming the variable, Redis untouched ----------

INVALID = [
    pytest.param({"batch_size": "abc"}, (), "STREAM_COUNTER_BATCH_SIZE", id="batch-size-abc"),
    pytest.param({"batch_size": "0"}, (), "STREAM_COUNTER_BATCH_SIZE", id="batch-size-0"),
    pytest.param({}, ("--block-ms", "-1"), "--block-ms", id="flag-block-ms-negative"),
    pytest.param({"log_format": "xml"}, (), "STREAM_COUNTER_LOG_FORMAT", id="log-format-xml"),
    pytest.param(
        {"max_deliveries": "0"}, (), "STREAM_COUNTER_MAX_DELIVERIES", id="max-deliveries-0"
    ),
    pytest.param(
        {"claim_idle_ms": "8000", "lock_ttl_ms": "10000", "lock_wait_ms": "1000"},
        (),
        "STREAM_COUNTER_CLAIM_IDLE_MS",
        id="claim-idle-not-above-lock-ttl",
    ),
    pytest.param(
        {"batch_size": "5"}, ("--batch-size", "1001"), "--batch-size", id="flag-beats-valid-env"
    ),
]


@pytest.mark.parametrize(("env", "flags", "named"), INVALID)
def test_invalid_config_exits_2_naming_the_variable_before_touching_redis(
    listener: Listener, env: dict[str, str], flags: tuple[str, ...], named: str
) -> None:
    proc = _cli("run", *flags, redis_url=listener.url, **env)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert named in lines[0]
    assert lines[0].startswith("stream-counter: invalid configuration:")
    time.sleep(0.1)
    assert listener.accepted == 0


def test_listener_control_a_valid_config_does_connect(listener: Listener) -> None:
    """Guards the test above: the listener really sees a client that gets past config."""
    proc = _cli("get", "x", redis_url=listener.url)
    assert proc.returncode == ExitCode.UNAVAILABLE, proc.stderr
    assert listener.accepted >= 1


@pytest.mark.parametrize(
    "url", ["http://x", "redis://", "redis://127.0.0.1:99999/0", "unix:///tmp/r.sock"]
)
def test_invalid_redis_url_exits_2_naming_the_url_variable(url: str) -> None:
    proc = _cli("run", redis_url=url)
    assert proc.returncode == ExitCode.CONFIG, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "STREAM_COUNTER_REDIS_URL" in lines[0]


def test_invalid_redis_url_flag_is_named_by_the_flag() -> None:
    proc = _cli("get", "a", "--redis-url", "http://x", redis_url="redis://127.0.0.1:1/0")
    assert proc.returncode == ExitCode.CONFIG
    assert "--redis-url" in proc.stderr
    assert "STREAM_COUNTER_REDIS_URL" not in proc.stderr


# -- settings that cannot work: refused at start, one line per broken rule -----------------

SMALLEST = {  # every bound at its edge, all together: accepted
    "claim_idle_ms": "1000",
    "lock_ttl_ms": "100",
    "lock_wait_ms": "250",
    "block_ms": "1",
    "shutdown_grace_ms": "1251",
    "max_deliveries": "2",
    "dedupe_window_ms": "1000",
    "batch_size": "1",
}

CANNOT_WORK = [
    pytest.param({"max_deliveries": "1"}, ["MAX_DELIVERIES", "after any crash"], id="one-delivery"),
    pytest.param({"claim_idle_ms": "999"}, ["CLAIM_IDLE_MS", "1000"], id="claim-idle-below-1s"),
    pytest.param({"lock_ttl_ms": "99"}, ["LOCK_TTL_MS", "100"], id="lock-ttl-below-100ms"),
    pytest.param(
        {"lock_ttl_ms": "1000"}, ["CLAIM_IDLE_MS", "LOCK_TTL_MS"], id="ttl-not-below-claim"
    ),
    pytest.param(
        {"lock_wait_ms": "251", "shutdown_grace_ms": "2000"},
        ["LOCK_WAIT_MS", "CLAIM_IDLE_MS / 4"],
        id="wait-above-claim/4",
    ),
    pytest.param(
        {"shutdown_grace_ms": "1250"}, ["SHUTDOWN_GRACE_MS", "BLOCK_MS + "], id="grace-too-short"
    ),
    pytest.param({"shutdown_grace_ms": "0"}, ["SHUTDOWN_GRACE_MS"], id="grace-0"),
    pytest.param({"dedupe_window_ms": "999"}, ["DEDUPE_WINDOW_MS", "1000"], id="window-below-1s"),
    pytest.param(
        {"stream": "orders", "dead_letter_stream": "orders"},
        ["DEAD_LETTER_STREAM", "forever"],
        id="dead-letters-into-the-stream-read",
    ),
]


def test_every_bound_at_its_edge_is_accepted() -> None:
    s = Settings(**SMALLEST)
    assert (s.claim_idle_ms, s.lock_ttl_ms, s.lock_wait_ms) == (1000, 100, 250)
    assert s.conflicts() == []


@pytest.mark.parametrize(("change", "words"), CANNOT_WORK)
def test_setting_that_cannot_work_is_refused_at_start_with_one_line_saying_why(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    words: list[str],
) -> None:
    for key, value in {**SMALLEST, **change}.items():
        monkeypatch.setenv(ENV_PREFIX + key.upper(), value)
    with pytest.raises(SystemExit) as exited:
        load_settings(build_parser().parse_args(["run"]))
    assert exited.value.code == ExitCode.CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("stream-counter: invalid configuration: STREAM_COUNTER_")
    for word in words:
        assert word in line
    assert "Value error" not in line


def test_several_broken_rules_are_each_refused_on_their_own_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["run", "--lock-ttl-ms", "5000", "--claim-idle-ms", "4000", "--stream", "s"]
    flags += ["--dead-letter-stream", "s", "--shutdown-grace-ms", "2000"]
    with pytest.raises(SystemExit):
        load_settings(build_parser().parse_args(flags))
    lines = capsys.readouterr().err.strip().splitlines()
    prefix = "stream-counter: invalid configuration: "
    assert all(line.startswith(prefix) for line in lines)
    named = [line.removeprefix(prefix).split(" ")[0] for line in lines]
    assert named == [
        "STREAM_COUNTER_CLAIM_IDLE_MS",  # 4000, not above LOCK_TTL_MS 5000
        "STREAM_COUNTER_LOCK_WAIT_MS",  # 2000 (default), above 4000 / 4
        "STREAM_COUNTER_SHUTDOWN_GRACE_MS",  # 2000, below 1000 + 2000 + 1000
        "STREAM_COUNTER_DEAD_LETTER_STREAM",
    ]


# -- secrets -------------------------------------------------------------------------------


def test_password_in_url_not_shown_when_another_field_is_invalid(listener: Listener) -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:{listener.port}/0"
    proc = _cli("run", redis_url=url, batch_size="abc", max_deliveries="0")
    assert proc.returncode == ExitCode.CONFIG
    assert "STREAM_COUNTER_BATCH_SIZE" in proc.stderr
    assert "STREAM_COUNTER_MAX_DELIVERIES" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert listener.accepted == 0


@pytest.mark.parametrize(
    "url",
    [
        f"http://user:{PASSWORD}@host:6379/0",
        f"redis://:{PASSWORD}@127.0.0.1:99999/0",
        f"redis://:{PASSWORD}@127.0.0.1:6x79/0",
        f"redis://:{PASSWORD}@",
    ],
)
def test_password_not_shown_when_the_url_itself_is_invalid(url: str) -> None:
    proc = _cli("run", redis_url=url)
    assert proc.returncode == ExitCode.CONFIG
    assert "STREAM_COUNTER_REDIS_URL" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_password_not_shown_when_a_url_is_given_to_the_wrong_field() -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:6379/0"
    proc = _cli("run", "--batch-size", url)
    assert proc.returncode == ExitCode.CONFIG
    assert "--batch-size" in proc.stderr
    assert PASSWORD not in proc.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"redis://user:{PASSWORD}@host:6379/0",
            "redis://user:***@host:6379/0",
        ),
        (f"redis://:{PASSWORD}@host:6379/0", "redis://:***@host:6379/0"),
        (f"redis://:{PASSWORD}@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (f"redis://u:{PASSWORD}@[2001:db8::7]/3", "redis://u:***@[2001:db8::7]/3"),
        (
            f"rediss://default:{PASSWORD}@cache.example.com:6380/1?ssl_cert_reqs=none",
            "rediss://default:***@cache.example.com:6380/1?ssl_cert_reqs=none",
        ),
        ("redis://:p%40ss%3Aw0rd@host/0", "redis://:***@host/0"),
        ("redis://:p@ss@host/0", "redis://:***@host/0"),
        # a lone token in the user part, and a password given as a parameter
        (f"redis://{PASSWORD}@host:6379/0", "redis://***@host:6379/0"),
        (f"redis://host:6379/0?password={PASSWORD}&db=1", "redis://host:6379/0?password=***&db=1"),
    ],
)
def test_redact_url_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert Settings(redis_url=url).redacted_url == shown


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://host:6379/0?db=1", "rediss://[::1]:6380"]
)
def test_redact_url_keeps_a_url_without_password(url: str) -> None:
    assert redact_url(url) == url


def test_secret_url_is_not_in_repr_or_dump() -> None:
    s = Settings(redis_url=f"redis://:{PASSWORD}@host/0")
    assert PASSWORD not in repr(s)
    assert PASSWORD not in str(s.model_dump())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"Error connecting to redis://:{PASSWORD}@10.0.0.1:6379/0: refused",
            "Error connecting to redis://:***@10.0.0.1:6379/0: refused",
        ),
        (
            f"a rediss://admin:{PASSWORD}@h/0 and REDIS://x:{PASSWORD}2@h2 end",
            "a rediss://admin:***@h/0 and REDIS://x:***@h2 end",
        ),
        (f"url=redis://u:{PASSWORD}@[::1]:6379", "url=redis://u:***@[::1]:6379"),
        ("nothing secret in redis://host:6379/0", "nothing secret in redis://host:6379/0"),
    ],
)
def test_scrub_removes_url_passwords_from_text(text: str, expected: str) -> None:
    assert scrub(text) == expected
    assert PASSWORD not in scrub(text)


def test_scrub_hides_a_password_that_contains_an_at_sign() -> None:
    out = scrub("cannot use redis://:p@ss-tail-secret@host:6379/0")
    assert "tail-secret" not in out


# -- a worker against a Redis with requirepass ---------------------------------------------


@pytest.fixture
def auth_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server with ``requirepass``; yields its port."""
    if shutil.which(SERVER) is None:
        pytest.skip("needs redis-server on PATH")
    port = free_port()
    args = [
        SERVER,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(tmp_path),
        "--requirepass", PASSWORD,
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield port
    finally:
        proc.kill()
        proc.wait()


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_worker_with_password_connects_and_never_logs_it(
    auth_redis: int, spawn_worker: Any
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{auth_redis}/0"
    worker = spawn_worker(url, block_ms=200)
    worker.wait_for_log('"connected"')
    client = redis.Redis(host="127.0.0.1", port=auth_redis, password=PASSWORD)
    client.xadd("events", {"counter": "pw-test"})
    deadline = time.monotonic() + 10
    while client.get("sc:{pw-test}:v") != b"1":
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)
    time.sleep(0.5)
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == ExitCode.OK
    log = worker.log()
    events = [e["event"] for e in _json_lines(log)]
    assert "connected" in events
    assert "stopped" in events
    assert f"redis://:***@127.0.0.1:{auth_redis}/0" in log  # logged, but redacted
    assert PASSWORD not in log


@pytest.mark.parametrize("user", ["", "default"])
def test_worker_with_wrong_password_exits_3_without_logging_it(
    auth_redis: int, spawn_worker: Any, user: str
) -> None:
    wrong = "wr0ng-pw-9876"
    worker = spawn_worker(f"redis://{user}:{wrong}@127.0.0.1:{auth_redis}/0", block_ms=200)
    assert worker.wait(15) == ExitCode.REDIS
    log = worker.log()
    assert "redis cannot run this worker" in log
    assert wrong not in log
    assert PASSWORD not in log
