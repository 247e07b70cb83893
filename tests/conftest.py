"""Real Redis servers for the tests, and worker processes to run against them.

Where a Redis comes from, in this order:
1. ``STREAM_COUNTER_TEST_REDIS_URL``: a server you run (it is FLUSHALLed before each test;
   tests that kill, pause or restart Redis are skipped);
2. a server binary (``helpers.SERVER``: the one ``STREAM_COUNTER_TEST_SERVER`` names, else
   ``redis-server`` on PATH, else the embedded valkey-server): one fresh server per test on a
   free loopback port;
3. testcontainers (Docker): one ``redis:7`` container for the session, flushed per test;
4. otherwise every Redis test is skipped, saying how to get one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
import structlog.testing
from helpers import SERVER, STREAM, Logs, MakeConsumer, free_port

from config import Settings
from worker import acl
from worker.connection import connect, ensure_group
from worker.consumer import Consumer

ACL_USER, ACL_PASSWORD = "stream-counter", "pw-acl-7"
OPERATOR_USER, OPERATOR_PASSWORD = "stream-counter-ops", "pw-ops-7"
OTHER_STREAMS = ("other", "s1", "s2")
HOW_TO_GET_REDIS = (
    "no Redis for the tests: install redis-server (e.g. `apt-get install redis-server`), "
    "or start Docker for testcontainers, or set STREAM_COUNTER_TEST_REDIS_URL"
)
TESTS = Path(__file__).parent


def acl_rules(*, operator: bool = False) -> list[str]:
    """worker/acl.py's rules for the suite's stream, and the keys of the few tests that use
    streams of their own."""
    rules = acl.rules(STREAM, f"{STREAM}:dead", operator=operator)
    for other in OTHER_STREAMS:
        rules += (f"~{k}" for k in acl.key_patterns(other, f"{other}:dead"))
    return rules


@dataclass
class RedisServer:
    """A redis-server process this test owns: it can be killed, paused and restarted."""

    workdir: Path
    appendonly: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    controllable: bool = True

    @property
    def url(self) -> str:
        """As the user that worker/acl.py describes: everything a test runs against this
        server through its URL proves that ACL is enough."""
        return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{self.port}/0"

    @property
    def operator_url(self) -> str:
        """As the operator's user (a replica's ACL and what `dlq` needs)."""
        return f"redis://{OPERATOR_USER}:{OPERATOR_PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            SERVER,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.workdir / "redis.log"),
            "--user", ACL_USER, "on", f">{ACL_PASSWORD}", *acl_rules(),  # there from the start
            "--user", OPERATOR_USER, "on", f">{OPERATOR_PASSWORD}", *acl_rules(operator=True),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.client().ping()
            except redis.ConnectionError:
                time.sleep(0.02)
                continue
            return
        raise RuntimeError(f"{SERVER} did not start on port {self.port}")

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


@dataclass
class ExternalRedis:
    url: str
    controllable: bool = False

    @property
    def operator_url(self) -> str:
        return self.url

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)


def _flushed(server: ExternalRedis) -> ExternalRedis:
    server.client().flushall()
    return server


@pytest.fixture(scope="session")
def _container_url() -> Iterator[str | None]:
    if os.environ.get("STREAM_COUNTER_TEST_REDIS_URL") or shutil.which(SERVER):
        yield None
        return
    try:
        from testcontainers.redis import RedisContainer

        container = RedisContainer("redis:7")
        container.start()
    except Exception as exc:  # no Docker engine, no image: say how to get a Redis
        pytest.skip(f"{HOW_TO_GET_REDIS} (testcontainers: {exc})")
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    yield f"redis://{host}:{port}/0"
    container.stop()


@pytest.fixture
def redis_server(
    tmp_path: Path, _container_url: str | None
) -> Iterator[RedisServer | ExternalRedis]:
    """A Redis for this test (see the module docstring for where it comes from)."""
    external = os.environ.get("STREAM_COUNTER_TEST_REDIS_URL") or _container_url
    if external:
        yield _flushed(ExternalRedis(external))
        return
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(redis_server: RedisServer | ExternalRedis) -> RedisServer:
    """A redis-server the test may kill, pause and restart."""
    if not isinstance(redis_server, RedisServer):
        pytest.skip("this test kills or restarts Redis: it needs redis-server on PATH")
    return redis_server


@pytest.fixture
def aof_redis(tmp_path: Path, _container_url: str | None) -> Iterator[RedisServer]:
    """A redis-server with AOF (appendfsync always), for restart tests."""
    if os.environ.get("STREAM_COUNTER_TEST_REDIS_URL") or _container_url:
        pytest.skip("this test restarts Redis: it needs redis-server on PATH")
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def r(redis_server: RedisServer | ExternalRedis) -> redis.Redis:
    """A plain bytes client on the test's Redis."""
    return redis_server.client()


# -- worker processes ---------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """``stream-counter run`` (or the fault-injecting harness) as a separate process."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(
                    f"worker exited ({self.proc.returncode}) before {text!r}:\n"
                    + self.log()[-3000:]
                )
            time.sleep(0.05)
        raise AssertionError(
            f"no {text!r} in the worker log after {timeout}s:\n" + self.log()[-3000:]
        )

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Any]:
    """Start worker processes; every one still running at the end is killed."""
    started: list[WorkerProcess] = []

    def spawn(
        url: str,
        *flags: str,
        fault: dict[str, str] | None = None,
        protocol: int | None = None,
        **settings: str | int,
    ) -> WorkerProcess:
        n = len(started)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_COUNTER_")}
        env["STREAM_COUNTER_REDIS_URL"] = url
        env.setdefault("STREAM_COUNTER_LOG_FORMAT", "json")
        env["STREAM_COUNTER_CONSUMER"] = f"worker-{n}"
        env["STREAM_COUNTER_LOG_LEVEL"] = "DEBUG"
        for key, value in settings.items():
            env[f"STREAM_COUNTER_{key.upper()}"] = str(value)
        if fault:
            env.update(fault)
            cmd = [sys.executable, str(TESTS / "faulty_worker.py"), "run", *flags]
        elif protocol is not None:  # a replica of another version
            env["WORKER_PROTOCOL"] = str(protocol)
            cmd = [sys.executable, str(TESTS / "other_version_worker.py"), "run", *flags]
        else:
            cmd = [sys.executable, "-m", "worker.cli", "run", *flags]
        log_path = tmp_path / f"worker-{n}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc, log_path)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Every log line of the consumers the test makes, as structlog event dicts."""
    structlog.reset_defaults()  # no level filter or output another test configured
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def make_consumer(redis_server: Any, logs: Logs) -> MakeConsumer:
    """A Consumer driven in the test's process, one turn at a time; its log lines go to
    ``logs``."""

    def make(**overrides: Any) -> Consumer:
        metrics = overrides.pop("metrics", None)
        options: dict[str, Any] = {
            "redis_url": redis_server.url,
            "consumer": "live",
            "block_ms": 20,
            "claim_idle_ms": 1000,
            "lock_ttl_ms": 100,
            "lock_wait_ms": 50,
        }
        options.update(overrides)
        settings = Settings(**options)
        log = structlog.get_logger("stream-counter").bind(consumer=settings.consumer)
        consumer = Consumer(connect(settings), settings, log, metrics=metrics)
        ensure_group(consumer.client, settings.stream, settings.group)
        return consumer

    return make
